"""The vendor-cloud source inside a running hub, against aiohttp servers that speak the vendors' published JSON
shapes (the one stand-in the tests allow: no vendor cloud runs here). Each test checks what an operator would
see: every interval stored exactly once with the vendor's value, the cursor where it must be, the audit trail
saying each outage, quota and clock problem once, and no secret anywhere.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningHub, write_config
from helpers import records

from hubd.broker import EmbeddedBroker
from hubd.model import format_time, now_ms
from hubd.sources.cloud.simulate import CloudThread, SimulatedCloud, power_w

API_KEY = "se-key-7f3a9c"  # must never appear in a log, audit record, status or quarantine entry
QUARTER_MS = 900_000


def quarters_back(n: int) -> int:
    """The start (epoch ms) of the quarter hour ``n`` quarters before the current one."""
    return (now_ms() // QUARTER_MS - n) * QUARTER_MS


def cloud_source(cloud: SimulatedCloud, key_file: Path, **settings: Any) -> dict[str, Any]:
    return {
        "kind": "cloud",
        "name": "se",
        "profile": "solaredge.site_power",
        "base_url": cloud.url,
        "sites": {"1001": "PV-C1"},
        "secrets": {"api_key": str(key_file)},
        "poll_s": 0.2,
        "retry_min_s": 0.05,
        "retry_max_s": 0.2,
        "timeout_s": 1.0,
        "lookback_s": 0,
        **settings,
    }


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "se.key"
    path.write_text(API_KEY + "\n")
    return path


@pytest.fixture
def site(tmp_path: Path, broker: EmbeddedBroker) -> Iterator[Callable[..., RunningHub]]:
    hubs: list[RunningHub] = []

    def make(sources: list[dict[str, Any]], ders: tuple[str, ...] = ("PV-C1",), **overrides: Any) -> RunningHub:
        path = write_config(tmp_path / f"hubd-{len(hubs)}.yaml", broker, sources=sources, **overrides)
        hub = RunningHub(path, broker)
        for der_id in ders:
            assert hub.cli("der", "add", der_id).exit_code == 0
        hub.start()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        hub.stop()


@pytest.fixture
def cloud() -> Iterator[SimulatedCloud]:
    with CloudThread(SimulatedCloud(["1001", "1002"], api_key=API_KEY)) as running:
        yield running


def stored(hub: RunningHub, der_id: str = "PV-C1") -> list[tuple[int, float, str, Any]]:
    db = sqlite3.connect(hub.config.readings_path)
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(readings)")}
        flag = "clock_flag" if "clock_flag" in columns else "NULL"
        return db.execute(
            f"SELECT measured_at, power_kw, source_id, {flag} FROM readings WHERE der_id = ? ORDER BY measured_at",
            (der_id,),
        ).fetchall()
    finally:
        db.close()


def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {check.__doc__ or check}")


def every_quarter(start_ms: int, end_ms: int) -> list[int]:
    return list(range(start_ms, end_ms + 1, QUARTER_MS))


def assert_exactly(hub: RunningHub, site: str, start_ms: int, end_ms: int, der_id: str = "PV-C1") -> None:
    """The store holds each quarter hour from start to end once, with the cloud's value for it."""
    rows = [row for row in stored(hub, der_id) if start_ms <= row[0] <= end_ms]
    assert [row[0] for row in rows] == every_quarter(start_ms, end_ms)
    assert [row[1] for row in rows] == [power_w(site, at // 1000) / 1000 for at in every_quarter(start_ms, end_ms)]


def no_secret_in(hub: RunningHub) -> None:
    config = hub.config
    for file in [config.audit_path, *config.data_path.glob("sources/*.json"), config.registry_path]:
        if file.exists():
            assert API_KEY.encode() not in file.read_bytes(), file


def test_a_site_is_collected_from_its_start_each_interval_once(site: Any, cloud: SimulatedCloud, key_file: Path) -> None:
    start = quarters_back(200)  # two days back: windows of a day are stepped through
    hub = site([cloud_source(cloud, key_file, start=format_time(start))])
    last_complete = quarters_back(1)  # the current quarter hour is not over: not asked for yet
    wait_for(lambda: len(stored(hub)) >= 200)
    assert_exactly(hub, "1001", start, last_complete)
    assert {row[2] for row in stored(hub)} == {"se"}  # provenance: the source, not the vendor's name
    requests = [path for _, path in cloud.requests]
    assert all("api_key" not in path for path in requests)
    assert len(requests) >= 3  # 200 quarter hours: three windows of a day at most
    no_secret_in(hub)
    status = hub.cli("source", "status", "se")
    assert status.exit_code == 0 and '"online": true' in status.output


def test_list_names_cloud_sources(site: Any, cloud: SimulatedCloud, key_file: Path) -> None:
    hub = site([cloud_source(cloud, key_file)])
    listed = hub.cli("source", "list")
    assert listed.exit_code == 0, listed.output
    assert "se\tcloud\t" in listed.output and "1001=PV-C1" in listed.output
