"""Drivers: one module per protocol. A driver emits RawMessages and sends answers; it never decodes."""
