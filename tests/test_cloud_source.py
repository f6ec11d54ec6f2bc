"""The vendor-cloud source inside a running hub, against aiohttp servers that speak the vendors' published JSON
shapes (the one stand-in the tests allow: no vendor cloud runs here). Each test checks what an operator would
see: every interval stored exactly once with the vendor's value, the cursor where it must be, the audit trail
saying each outage, quota and clock problem once, and no secret anywhere.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import RunningHub, write_config
from helpers import records

from hubd.broker import EmbeddedBroker
from hubd.model import format_time, now_ms
from hubd.sources.cloud.simulate import LOCAL, CloudThread, SimulatedCloud, power_w

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


def write_key(tmp_path: Path) -> Path:
    path = tmp_path / "se.key"
    path.write_text(API_KEY + "\n")
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write_key(tmp_path)


@pytest.fixture
def site(tmp_path: Path, broker: EmbeddedBroker) -> Iterator[Callable[..., RunningHub]]:
    yield from hubs_with(tmp_path, broker)


def hubs_with(tmp_path: Path, broker: EmbeddedBroker) -> Iterator[Callable[..., RunningHub]]:
    """``make(sources, ders)``: hubs with these sources and these DERs added (before they start collecting)."""
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


def test_a_site_is_collected_from_its_start_each_interval_once(
    site: Any, cloud: SimulatedCloud, key_file: Path
) -> None:
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
    # a backfill beside the running hub: the day asked again, replaced in the store, the cursor left alone
    cursor_before = json.loads(status.output)["cursors"]["1001"]
    day = ["--start", format_time(start), "--end", format_time(start + 86_400_000)]
    backfilled = hub.cli("source", "backfill", "se", *day)
    assert backfilled.exit_code == 0, backfilled.output
    assert "backfilled 96 readings in 1 windows" in backfilled.output
    assert len([row for row in stored(hub) if row[0] <= last_complete]) == 200
    assert records(hub, "cloud.backfill")[0]["source"] == "se"
    after = json.loads(hub.cli("source", "status", "se").output)["cursors"]["1001"]
    assert after >= cursor_before


def test_list_and_test_show_a_cloud_source(site: Any, cloud: SimulatedCloud, key_file: Path) -> None:
    hub = site([cloud_source(cloud, key_file, poll_s=60)])
    listed = hub.cli("source", "list")
    assert listed.exit_code == 0, listed.output
    assert "se\tcloud\t" in listed.output and "1001=PV-C1" in listed.output
    asked = len(cloud.requests)
    tried = hub.cli("source", "test", "se")  # the last window asked and decoded from here, nothing stored
    assert tried.exit_code == 0, tried.output
    assert '"readings": 4' in tried.output and '"der_id": "PV-C1"' in tried.output
    assert API_KEY not in tried.output and "api_key" not in tried.output
    assert len(cloud.requests) == asked + 1
    cloud.script = [503]
    failed = hub.cli("source", "test", "se")
    assert failed.exit_code == 1 and "HTTP 503" in failed.output


def test_an_exhausted_daily_budget_stops_asking_until_the_next_day(
    site: Any, cloud: SimulatedCloud, key_file: Path
) -> None:
    start = quarters_back(4 * 96)  # four windows of a day to collect, two requests allowed
    source = cloud_source(cloud, key_file, start=format_time(start), daily_requests=2)
    hub = site([source])
    wait_for(lambda: records(hub, "cloud.quota"))
    time.sleep(0.6)  # three more polls' time: none of them asks
    assert len(cloud.requests) == 2
    quota = records(hub, "cloud.quota")
    assert len(quota) == 1 and "daily budget of 2 requests" in quota[0]["reason"]
    assert_exactly(hub, "1001", start, start + 2 * 96 * QUARTER_MS - QUARTER_MS)  # the two windows asked for
    assert len(stored(hub)) == 2 * 96
    hub.restart()  # the budget is kept in the state file: a restart does not spend it again
    time.sleep(0.6)
    assert len(cloud.requests) == 2


def test_429_with_retry_after_is_waited_for(site: Any, cloud: SimulatedCloud, key_file: Path) -> None:
    start = quarters_back(8)
    cloud.script = [(429, 1)]
    hub = site([cloud_source(cloud, key_file, start=format_time(start))])
    wait_for(lambda: len(stored(hub)) >= 8)
    (refused_at, _), (next_at, _) = cloud.requests[:2]
    assert next_at - refused_at >= 0.95  # Retry-After: 1, not poll_s (0.2) nor retry_min_s (0.05)
    assert len(records(hub, "cloud.rate_limited")) == 1
    assert not records(hub, "cloud.offline")  # a 429 is the vendor's limit, not an outage
    assert_exactly(hub, "1001", start, quarters_back(1))


def test_a_burst_of_5xx_is_one_outage_and_one_recovery(site: Any, cloud: SimulatedCloud, key_file: Path) -> None:
    start = quarters_back(8)
    cloud.script = [500, 502, 503, 500]
    hub = site([cloud_source(cloud, key_file, start=format_time(start))])
    wait_for(lambda: len(stored(hub)) >= 8 and records(hub, "cloud.online"))
    offline, online = records(hub, "cloud.offline"), records(hub, "cloud.online")
    assert len(offline) == 1 and "HTTP 500" in offline[0]["reason"]
    assert len(online) == 1 and online[0]["seq"] > offline[0]["seq"]
    assert_exactly(hub, "1001", start, quarters_back(1))
    # the waits grew: retry_min_s 0.05 doubled up to retry_max_s 0.2, with jitter
    gaps = [b - a for (a, _), (b, _) in zip(cloud.requests, cloud.requests[1:5], strict=False)]
    assert gaps[0] < gaps[2] + 0.05 and all(gap >= 0.03 for gap in gaps)


def test_an_answer_slower_than_the_timeout_is_an_outage_then_collected(
    site: Any, cloud: SimulatedCloud, key_file: Path
) -> None:
    start = quarters_back(8)
    cloud.script = ["slow"]
    cloud.slow_s = 1.5
    hub = site([cloud_source(cloud, key_file, start=format_time(start), timeout_s=0.3)])
    wait_for(lambda: len(stored(hub)) >= 8 and records(hub, "cloud.online"))
    offline = records(hub, "cloud.offline")
    assert len(offline) == 1 and "no answer within 0.3 s" in offline[0]["reason"]
    assert len(records(hub, "cloud.online")) == 1
    assert_exactly(hub, "1001", start, quarters_back(1))


@pytest.mark.parametrize(
    ("answer", "reason"), [("garbage", "is not JSON"), ("wrong shape", "no list at $.power.values")]
)
def test_a_body_its_format_cannot_read_is_quarantined_with_its_request_and_asked_again(
    site: Any, cloud: SimulatedCloud, key_file: Path, answer: str, reason: str
) -> None:
    start = quarters_back(8)
    cloud.script = [answer]
    hub = site([cloud_source(cloud, key_file, start=format_time(start))])
    wait_for(lambda: len(stored(hub)) >= 8)
    kept = records(hub, "data.quarantined")
    assert len(kept) == 1 and kept[0]["source_id"] == "se"
    assert kept[0]["topic"].startswith(f"GET {cloud.url}/site/1001/power?startTime=")
    listed = hub.cli("quarantine", "list")
    assert "/site/1001/power" in listed.output and reason in listed.output
    assert_exactly(hub, "1001", start, quarters_back(1))
    no_secret_in(hub)


def test_sites_failing_at_once_each_have_their_own_outage_quarantine_and_retry_after(site: Any, key_file: Path) -> None:
    """One poll, one account: site 1001 answers 500, 1002 429 with Retry-After: 3, 1003 HTML; 1004 is fine."""
    sites = ["1001", "1002", "1003", "1004"]
    with CloudThread(SimulatedCloud(sites, api_key=API_KEY)) as cloud:
        cloud.site_script = {"1001": [500], "1002": [(429, 3)], "1003": ["garbage"]}
        start = quarters_back(8)
        source = cloud_source(cloud, key_file, start=format_time(start), retry_min_s=2.0, retry_max_s=2.0)
        source["sites"] = {s: f"PV-{s}" for s in sites}
        hub = site([source], ders=tuple(f"PV-{s}" for s in sites))

        def waiting() -> Any:
            """source status names each failing site and what it waits for"""
            shown = json.loads(hub.cli("source", "status", "se").output)
            return len(records(hub, "cloud.offline")) == 2 and shown

        shown = wait_for(waiting)
        assert shown["online"] is False
        assert "site 1001: GET" in shown["reason"] and "HTTP 500" in shown["reason"]
        assert "site 1003: " in shown["reason"] and "is not JSON" in shown["reason"]
        assert shown["sites"]["1002"]["waiting"].startswith("rate_limited until 20")
        assert shown["sites"]["1001"]["waiting"].startswith("backoff until 20")
        assert shown["sites"]["1004"] == {"online": True, "reason": None, "waiting": None}
        assert "site 1002: rate_limited until" in shown["waiting"] and "site 1003: backoff until" in shown["waiting"]
        wait_for(lambda: all(len(stored(hub, f"PV-{s}")) >= 8 for s in sites), timeout=15)
        offline = {r["site"]: r["reason"] for r in records(hub, "cloud.offline")}
        assert offline.keys() == {"1001", "1003"} and "HTTP 500" in offline["1001"]
        assert {r["site"] for r in records(hub, "cloud.online")} == {"1001", "1003"}
        limited = records(hub, "cloud.rate_limited")
        assert [(r["site"], r["wait_s"]) for r in limited] == [("1002", 3.0)]
        kept = records(hub, "data.quarantined")
        assert len(kept) == 1 and "/site/1003/power" in kept[0]["topic"]
        asked_1002 = [at for at, path in cloud.requests if path.startswith("/site/1002/")]
        assert asked_1002[1] - asked_1002[0] >= 2.95  # Retry-After: 3, not the backoff (2 ± 25 %)
        for s in sites:
            assert_exactly(hub, s, start, quarters_back(1), f"PV-{s}")
        assert json.loads(hub.cli("source", "status", "se").output)["waiting"] is None


def test_the_same_bad_answer_at_every_retry_is_quarantined_once_per_outage(
    site: Any, cloud: SimulatedCloud, key_file: Path
) -> None:
    start = quarters_back(8)
    cloud.script = ["garbage", "garbage", "garbage"]
    hub = site([cloud_source(cloud, key_file, start=format_time(start))])
    wait_for(lambda: len(stored(hub)) >= 8 and records(hub, "cloud.online"))
    assert len(cloud.requests) >= 4  # three bad answers, then the good one
    assert len(records(hub, "data.quarantined")) == 1
    assert len(records(hub, "cloud.offline")) == 1
    assert_exactly(hub, "1001", start, quarters_back(1))


def test_a_cloud_whose_date_runs_two_minutes_slow_is_flagged(site: Any, key_file: Path, tmp_path: Path) -> None:
    with CloudThread(SimulatedCloud(["1001"], api_key=API_KEY, clock_offset_s=-120)) as slow:
        hub = site([cloud_source(slow, key_file, start=format_time(quarters_back(8)))])
        wait_for(lambda: len(stored(hub)) >= 8)
        flagged = records(hub, "time.flagged")
        assert len(flagged) == 1 and flagged[0]["source_id"] == "se"
        assert -121.0 < flagged[0]["offset_s"] < -119.0
        assert {row[3] for row in stored(hub)} == {"check"}  # every reading from it carries the flag
        shown = wait_for(lambda: (out := hub.cli("time", "sources")).exit_code == 0 and " off " in out.output and out)
        line = next(line for line in shown.output.splitlines() if line.startswith("se "))
        assert line.split()[1:3] == ["off", "check"] and -121.0 < float(line.split()[3]) < -119.0


def test_a_cloud_on_time_is_not_flagged(site: Any, cloud: SimulatedCloud, key_file: Path) -> None:
    hub = site([cloud_source(cloud, key_file, start=format_time(quarters_back(8)))])
    wait_for(lambda: len(stored(hub)) >= 8)
    time.sleep(0.3)
    assert not records(hub, "time.flagged")
    assert {row[3] for row in stored(hub)} == {None}
    wait_for(lambda: '"source_id":"se","state":"ok"' in hub.cli("time", "sources", "--json").output)


def test_hubd_killed_mid_collection_resumes_at_its_cursor_and_stores_each_interval_once(
    tmp_path: Path, broker: EmbeddedBroker, key_file: Path
) -> None:
    """A real ``hubd run`` process, SIGKILLed while it collects ten days window by window, then started again."""
    with CloudThread(SimulatedCloud(["1001"], api_key=API_KEY)) as cloud:
        cloud.delay_s = 0.25  # each answer takes a while: the kill lands mid-collection
        start = (now_ms() // 86_400_000 - 10) * 86_400_000
        source = cloud_source(cloud, key_file, start=format_time(start), lookback_s=1800)
        config = write_config(tmp_path / "hubd.yaml", broker, sources=[source], http={"bind": None})
        hub = RunningHub(config, broker)
        assert hub.cli("der", "add", "PV-C1").exit_code == 0
        command = [str(Path(sys.executable).parent / "hubd"), "--config", str(config), "run"]

        def cursor() -> int | None:
            db = sqlite3.connect(hub.config.registry_path)
            try:
                row = db.execute("SELECT committed_until FROM cloud_cursor WHERE source = 'se'").fetchone()
            except sqlite3.OperationalError:
                return None
            finally:
                db.close()
            return None if row is None else int(row[0])

        first = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: (cursor() or 0) >= start + 3 * 86_400_000, timeout=20)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        killed_at = cursor()
        assert killed_at is not None and killed_at < start + 10 * 86_400_000  # killed before the end
        assert all(row[0] < killed_at + 86_400_000 for row in stored(hub))  # at most the window in hand
        asked_before = len(cloud.requests)
        cloud.delay_s = 0.0
        second = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        try:
            last = quarters_back(1)
            wait_for(lambda: len(stored(hub)) >= (last - start) // QUARTER_MS + 1, timeout=30)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0
        assert_exactly(hub, "1001", start, last)
        resumed = cloud.requests[asked_before][1]  # the first window asked after the restart
        local = datetime.fromtimestamp((killed_at - 1_800_000) / 1000, ZoneInfo("Asia/Tokyo")).strftime(LOCAL)
        assert f"startTime={local}" in resumed  # its cursor less the look-back: nothing skipped or redone


def test_sites_are_collected_side_by_side_within_the_concurrency_limit(site: Any, key_file: Path) -> None:
    sites = ["1001", "1002", "1003", "1004"]
    with CloudThread(SimulatedCloud(sites, api_key=API_KEY)) as cloud:
        cloud.delay_s = 0.2
        start = quarters_back(2 * 96)  # three windows per site
        source = cloud_source(cloud, key_file, start=format_time(start), concurrency=2)
        source["sites"] = {s: f"PV-{s}" for s in sites}
        hub = site([source], ders=tuple(f"PV-{s}" for s in sites))
        wait_for(lambda: all(len(stored(hub, f"PV-{s}")) >= 2 * 96 for s in sites), timeout=15)
        assert cloud.most_at_once == 2  # never more than the limit, and the limit used
        for s in sites:
            assert_exactly(hub, s, start, quarters_back(1), f"PV-{s}")


def test_late_corrections_inside_the_look_back_replace_and_older_ones_are_not_asked(
    site: Any, cloud: SimulatedCloud, key_file: Path
) -> None:
    start = quarters_back(12)
    hub = site([cloud_source(cloud, key_file, start=format_time(start), lookback_s=3600, poll_s=0.3)])
    wait_for(lambda: len(stored(hub)) >= 12)
    recent, old = quarters_back(2), quarters_back(10)  # inside the hour of look-back, and well before it
    cloud.late[("1001", recent // 1000)] = 4321.0
    cloud.late[("1001", old // 1000)] = 1234.0
    wait_for(lambda: dict((row[0], row[1]) for row in stored(hub))[recent] == 4.321)
    rows = dict((row[0], row[1]) for row in stored(hub))
    assert rows[old] == power_w("1001", old // 1000) / 1000  # outside the look-back: not asked again
    assert len(stored(hub)) == len(rows) == (quarters_back(1) - start) // QUARTER_MS + 1  # replaced, not added


def test_a_short_secret_is_masked_by_its_parameter_not_by_its_letters(tmp_path: Path) -> None:
    """A one-letter key must not turn "Cannot connect" into "Cann*** c***nnect"; a long one is masked anywhere."""
    import asyncio
    import socket

    from hubd.config import parse_config
    from hubd.sources.cloud.client import CloudClient, Unreachable, _no_secrets
    from hubd.sources.cloud.profile import SHIPPED, parse_profile

    with socket.socket() as closed:  # a port nothing listens on: the connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    source = {"kind": "cloud", "name": "se", "profile": "solaredge.site_power", "sites": {"1001": "PV-C1"}}
    config = parse_config({"sources": [source | {"base_url": f"http://127.0.0.1:{port}", "timeout_s": 2}]})
    profile = parse_profile(SHIPPED / "solaredge.site_power.yaml")
    client = CloudClient(config.sources[0], profile, {"api_key": "o"})  # type: ignore[arg-type]

    async def ask() -> str:
        try:
            async for _ in client.window(profile.requests[0], "1001", quarters_back(4), quarters_back(0)):
                pass
        except Unreachable as exc:
            return str(exc)
        finally:
            await client.close()
        raise AssertionError("a refused connection must be an outage")

    said = asyncio.run(ask())
    assert "Cannot connect to host" in said and "***" not in said and "api_key" not in said, said
    assert _no_secrets("GET http://h/p?api_key=o&x=1: Name or service not known", {"api_key": "o"}, ("api_key",)) == (
        "GET http://h/p?api_key=***&x=1: Name or service not known"
    )
    assert (
        _no_secrets(f"refused {API_KEY} at {API_KEY[::-1]}", {"api_key": API_KEY}) == f"refused *** at {API_KEY[::-1]}"
    )
