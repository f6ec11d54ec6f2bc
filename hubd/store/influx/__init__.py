"""The InfluxDB backend (``store.backend: influxdb``), spoken over the v1 HTTP API that InfluxDB 1.x serves,
2.x serves through its compatibility endpoints and 3.x serves too.

One job per module: ``lines`` turns readings into line protocol and back, ``client`` is the HTTP (async for
the sink, plain blocking for the query thread), ``versions`` keeps the store's replace rule, ``spool`` is the
on-disk queue used while InfluxDB cannot take writes, ``sink`` the write side and ``query`` the read side.
The schema is in docs/operations.md ("InfluxDB").
"""
