"""Time you can settle on: the hub's clock against NTP, the sources' clocks checked and corrected over MQTT,
their skew estimated from the data itself, and the readings of a clock known to be off flagged.

One job per module: ``state`` holds what is known of each clock (and is what the data path, the services, the
CLI and the status page read), ``ntp`` measures the hub's own clock, ``edges`` checks and sets the sources'
clocks over MQTT, ``skew`` estimates a source's offset passively from the times of its readings.
"""
