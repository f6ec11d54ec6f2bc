"""A hub configured with ``store.backend: influxdb``, driven over MQTT while InfluxDB is killed mid-stream and
started again: every message is acknowledged, every reading published is in InfluxDB exactly once, the market
system reads them back through the hub, the spool's transitions are in the audit trail and its figures in
/metrics."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from conftest import RunningHub
from helpers import T0_MS, at, reading, records
from influx_server import InfluxServer, fresh_database, own_influxd  # noqa: F401 - the fixture
from test_ops_metrics import scrape
from test_ops_page import post_login, url_of

from hubd.ops.status import report_lines as status_lines

MESSAGES, PER_MESSAGE = 30, 20


def test_influxdb_killed_mid_stream_loses_and_repeats_nothing(hub_factory: Any, own_influxd: InfluxServer) -> None:  # noqa: F811
    database = fresh_database(own_influxd)
    influx = {"url": own_influxd.url, "database": database, "retry_s": 0.1, "write_timeout_s": 2.0}
    hub: RunningHub = hub_factory(store={"backend": "influxdb", "influxdb": influx})
    password = hub.register("PV-1")
    market = hub.consumer()
    for m in range(MESSAGES):
        if m == 10:
            own_influxd.kill()
        if m == 20:
            away = scrape(hub)  # what /metrics shows while InfluxDB is away: ten messages spooled
            with urllib.request.urlopen(url_of(hub) + "readyz", timeout=5) as response:
                ready = json.loads(response.read())  # /readyz and hubd status say so too
            own_influxd.start()
        readings = [
            reading("PV-1", password, at(m * PER_MESSAGE + i), power_kw=float(m * PER_MESSAGE + i))
            for i in range(PER_MESSAGE)
        ]
        answer = hub.rr(f"{hub.prefix}/data", {"source_id": "edge-1", "readings": readings})
        assert answer["ok"] and answer["accepted"] == PER_MESSAGE, answer  # acknowledged, from the spool or not
    deadline = time.monotonic() + 30
    while hub.cli("store", "status", "--json").output.find('"spooled_readings":0') < 0:
        assert time.monotonic() < deadline, hub.cli("store", "status").output
        time.sleep(0.1)
    assert away["hubd_spool_readings", ()] == 10 * PER_MESSAGE and away["hubd_spool_oldest_age_seconds", ()] > 0
    assert ready["ready"] and ready["checks"]["store"]["spooled_readings"] == 10 * PER_MESSAGE
    assert f"store:   writing (influxdb, spooling {10 * PER_MESSAGE} readings)" in status_lines(ready)
    back = scrape(hub)
    assert back["hubd_spool_readings", ()] == 0 and back["hubd_spool_oldest_age_seconds", ()] == 0
    assert back["hubd_spool_replayed_readings_total", ()] >= 10 * PER_MESSAGE
    points = own_influxd.query('SELECT "power_kw" FROM "readings"', database)[0]["values"]
    assert [t for t, _ in points] == [T0_MS + s * 1000 for s in range(MESSAGES * PER_MESSAGE)]  # once each
    assert [v for _, v in points] == [float(s) for s in range(MESSAGES * PER_MESSAGE)]
    spooling, replayed = records(hub, "store.spooling"), records(hub, "store.replayed")
    assert len(spooling) == 1 and spooling[0]["outcome"] == "error"
    # the messages sent while it was away were replayed, and those sent before the replay caught up (in order,
    # behind them); a batch spooled just as the replay ended may make a second record
    assert replayed and (20 - 10) * PER_MESSAGE <= sum(r["readings"] for r in replayed) < MESSAGES * PER_MESSAGE
    answer = hub.rr(
        f"{hub.prefix}/query",
        {
            "client_id": "market-1",
            "password": market,
            "start": at(0),
            "end": at(3600),
            "interval": "1m",
            "agg": {"power_kw": ["count", "max"]},
        },
    )
    assert answer["ok"], answer
    assert [row["power_kw_count"] for row in answer["rows"]] == [60] * 10
    assert answer["rows"][-1]["power_kw_max"] == 599.0

    # The status page with InfluxDB: PV-1's last reading is read from it (tests/test_influx_fleet.py)
    base = url_of(hub)
    viewer = hub.cli("system", "add", "viewer-1", "--role", "viewer").output.strip()
    _, cookie = post_login(base, "viewer-1", viewer)
    assert cookie is not None
    with urllib.request.urlopen(urllib.request.Request(base, headers={"Cookie": cookie.split(";")[0]})) as response:
        page = response.read().decode()
    assert response.status == 200 and "PV-1" in page and "never" not in page
