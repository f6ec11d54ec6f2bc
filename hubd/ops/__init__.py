"""Operating the hub: what an operator's tools see of it, read from the same parts the hub runs on.

- ``notify``: systemd's notification protocol (ready, stopping, watchdog, a one-line status);
- ``metrics``: Prometheus metrics, read from the hub's own counters and state at scrape time;
- ``health``: the checks behind ``/healthz``, ``/readyz`` and ``hubd status``;
- ``fleet``: the fleet, energy and quarantine as the status page shows them, aggregated in SQL;
- ``page`` and ``login``: the status page and who may open it; ``http``: the listener that serves it all;
- ``status``: ``hubd status``, the same summary for a terminal.

``Ops`` (``hubd.ops.run``) starts and stops them with the hub; nothing on the data path depends on them.
"""
