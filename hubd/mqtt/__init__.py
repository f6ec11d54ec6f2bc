"""hubd's own MQTT v5 session (packets, session, driver): the MQTT source runs on it; it never decodes."""
