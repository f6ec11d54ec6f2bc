"""The Modbus source inside a running hub: simulated devices (real pymodbus TCP servers on free loopback ports)
polled by the hub, their readings stored by sender and read back as the market system reads them; devices
that stop and come back, answer with exceptions, or name DERs the hub does not let them write.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import RunningHub, write_config
from helpers import records
from test_sources import submit

from hubd.auth.registry import Registry
from hubd.broker import EmbeddedBroker, free_port
from hubd.config import ModbusSourceConfig
from hubd.model import RawMessage, Reading, format_time, now_ms
from hubd.sources.modbus import sender_of
from hubd.sources.modbus.simulate import BATTERY_802, INVERTER_103, Device, DeviceThread, sunspec_image

COMMON = {"Mn": "Acme Power", "Md": "AP-10", "SN": "SN-0042", "Vr": "3.1.4", "DA": 1}
IMAGE = sunspec_image([(1, COMMON), (103, INVERTER_103), (713, {"SoC": 655, "Pct_SF": -1}), (802, BATTERY_802)])


def modbus(name: str, port: int, **settings: Any) -> dict[str, Any]:
    return {"kind": "modbus", "name": name, "host": "127.0.0.1", "port": port, "poll_s": 0.2, **settings}


@pytest.fixture
def site(tmp_path: Path, broker: EmbeddedBroker) -> Iterator[Callable[..., RunningHub]]:
    """``site(sources, ders)``: a hub with these sources and these DERs added (before it starts polling)."""
    hubs: list[RunningHub] = []

    def make(sources: list[dict[str, Any]], ders: tuple[str, ...] = (), **overrides: Any) -> RunningHub:
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
def devices() -> Iterator[Callable[..., tuple[DeviceThread, Device]]]:
    threads: list[DeviceThread] = []

    def serve(holding: dict[int, int], inputs: dict[int, int] | None = None) -> tuple[DeviceThread, Device]:
        device = Device({1: (holding, inputs or {})}, free_port())
        thread = DeviceThread([device])
        thread.__enter__()
        threads.append(thread)
        return thread, device

    yield serve
    for thread in threads:
        thread.__exit__()


def until(check: Callable[[], Any], seconds: float = 10.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {check}")


def stored(hub: RunningHub, *der_ids: str) -> list[dict[str, Any]]:
    """The readings of these DERs in the store, as the market system's query returns them."""
    password = hub.consumer("market-x") if not hasattr(hub, "_market") else hub._market  # type: ignore[attr-defined]
    hub._market = password  # type: ignore[attr-defined]
    body = {"client_id": "market-x", "password": password, "der_ids": list(der_ids)}
    body |= {"start": format_time(now_ms() - 600_000), "end": format_time(now_ms() + 60_000), "limit": 10000}
    answer = hub.rr(f"{hub.prefix}/query", body)
    assert answer["ok"], answer
    return list(answer["rows"])


def events(hub: RunningHub, event: str, source: str) -> list[dict[str, Any]]:
    return [r for r in records(hub, event) if r.get("source") == source]


def test_a_sunspec_inverter_and_battery_are_polled_stored_and_described(
    site: Any, devices: Any, problems: list[str]
) -> None:
    _, device = devices(IMAGE)
    hub = site([modbus("site-a", device.port, profile="sunspec", ders={"INV-1": [103], "BAT-1": [713, 802]})],
               ("INV-1", "BAT-1"))  # fmt: skip
    rows = until(lambda: (r := stored(hub, "INV-1", "BAT-1")) and len({x["der_id"] for x in r}) == 2 and r)
    latest = {row["der_id"]: row for row in rows}
    assert latest["INV-1"]["power_kw"] == 3.21 and latest["INV-1"]["energy_kwh"] == 12345.678
    assert latest["INV-1"]["power_factor"] == 0.985 and latest["INV-1"]["frequency_hz"] == 50.02
    assert latest["BAT-1"]["soc_pct"] == 65.5  # 713 is named first for BAT-1
    assert latest["BAT-1"]["power_kw"] == 1.5
    # the common model, recorded on each DER and shown by `hubd der show`
    shown = orjson.loads(hub.cli("der", "show", "INV-1").output)
    assert (shown["maker"], shown["model"], shown["serial"], shown["version"]) == (
        "Acme Power",
        "AP-10",
        "SN-0042",
        "3.1.4",
    )
    (described,) = [r for r in records(hub, "der.described") if r["der_id"] == "INV-1"]
    assert described["serial"] == "SN-0042"
    (discovered,) = events(hub, "modbus.discovered", "site-a")
    assert discovered["ders"] == {"INV-1": ["103"], "BAT-1": ["713", "802"]}
    assert [r["state"] for r in events(hub, "modbus.state", "site-a")] == ["MPPT", "CONNECTED"]
    polls = until(lambda: len(stored(hub, "INV-1")) >= 3 and stored(hub, "INV-1"))
    assert len(events(hub, "modbus.online", "site-a")) == 1  # once, not per poll
    assert len(events(hub, "modbus.state", "site-a")) == 2
    # each poll one instant: both DERs' readings of one poll share their measurement time
    battery_times = {row["measured_at"] for row in stored(hub, "BAT-1")}
    assert len({row["measured_at"] for row in polls} & battery_times) >= 3
    listed = hub.cli("source", "list").output
    assert listed.startswith(
        f"site-a\tmodbus\t127.0.0.1:{device.port} unit 1\tprofile sunspec\tBAT-1=713+802, INV-1=103"
    )
    status = until(lambda: (s := orjson.loads(hub.cli("source", "status", "site-a").output))["polls"] and s)
    assert status["online"] is True and status["health"] == "up" and status["problems"] == []
    assert status["states"] == {"103": "MPPT", "802": "CONNECTED"}
    hub.stop()  # while it polls: a poll waiting for its commit ends quietly
    assert [line for line in problems if line.startswith("ERROR")] == []


def test_a_device_that_stops_and_comes_back_is_audited_once_each_way(site: Any, devices: Any) -> None:
    thread, device = devices(IMAGE)
    source = modbus("site-b", device.port, profile="sunspec", der="INV-2", reconnect_max_s=0.4, timeout_s=0.5)
    hub = site([source], ("INV-2",))
    until(lambda: stored(hub, "INV-2"))
    thread.stop(device)
    until(lambda: events(hub, "modbus.offline", "site-b"))
    (polled,) = [s for s in hub._hub.sources.sources if s.name == "site-b"]  # type: ignore[union-attr]
    assert polled.health == "down" and "127.0.0.1" in polled.last_error  # type: ignore[attr-defined]
    time.sleep(1.5)  # several polls fail while it is away
    stopped_at = now_ms()
    thread.start(device)
    until(lambda: len(events(hub, "modbus.online", "site-b")) == 2)
    after = until(lambda: [r for r in stored(hub, "INV-2") if r["measured_at"] > format_time(stopped_at) and r])
    assert after[0]["power_kw"] == 3.21
    time.sleep(0.6)
    assert len(events(hub, "modbus.offline", "site-b")) == 1
    assert len(events(hub, "modbus.online", "site-b")) == 2  # first contact, and coming back
    (offline,) = events(hub, "modbus.offline", "site-b")
    assert offline["outcome"] == "error" and "127.0.0.1" in offline["reason"]
    # the status page's view of the source: up again, its last good poll, no error
    assert polled.health == "up" and polled.last_error is None  # type: ignore[attr-defined]
    assert polled.last_success >= stopped_at  # type: ignore[attr-defined]


def test_exceptions_are_audited_once_and_other_devices_keep_being_polled(
    site: Any, devices: Any, tmp_path: Path, problems: list[str]
) -> None:
    maps = tmp_path / "data" / "drivers" / "modbus"
    maps.mkdir(parents=True)
    (maps / "far.yaml").write_text("quantities:\n  power_kw: {address: 900, unit: W}\n", encoding="utf-8")
    (maps / "later.yaml").write_text("quantities:\n  power_kw: {adress: 1}\n", encoding="utf-8")  # no source uses it
    _, broken = devices({0: 1})  # has no register 900: "illegal data address"
    _, good = devices(IMAGE)
    hub = site(
        [modbus("broken", broken.port, map="far", der="M-1"), modbus("good", good.port, profile="sunspec", der="PV-7")],
        ("M-1", "PV-7"),
    )
    until(lambda: len(stored(hub, "PV-7")) >= 5)
    (problem,) = events(hub, "modbus.problem", "broken")
    assert problem["reason"] == "holding registers 900+1: exception 2 (illegal data address)"
    assert len(events(hub, "modbus.online", "broken")) == 1  # it answers: online, with a problem
    assert len(events(hub, "modbus.discovered", "broken")) == 1  # though it is prepared again after each
    assert stored(hub, "M-1") == []
    refused = f"WARNING register map refused: {maps / 'later.yaml'}: quantities.power_kw.adress: unknown key"
    assert refused + "\n" in problems


class Silent:
    """A device that takes the connection and never answers (a hung device, a gateway whose target is gone)."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # until the hub gives up and closes
            writer.close()

        self._server = await asyncio.start_server(hold, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


def test_a_device_that_never_answers_goes_offline_once_and_delays_no_other(site: Any, devices: Any) -> None:
    silent = Silent()
    with DeviceThread([silent]):  # type: ignore[list-item]  # a plain asyncio server, not a pymodbus one
        _, good = devices(IMAGE)
        hub = site(
            [
                modbus("hung", silent.port, profile="sunspec", der="X-1", timeout_s=0.3, reconnect_max_s=0.6),
                modbus("good", good.port, profile="sunspec", der="PV-8"),
            ],
            ("X-1", "PV-8"),
        )
        first = until(lambda: stored(hub, "PV-8"))[0]["measured_at"]
        time.sleep(2.0)  # ten polls of the good device while the hung one times out again and again
        later = [r for r in stored(hub, "PV-8") if r["measured_at"] >= first]
        assert len(later) >= 8, later  # polled every 0.2 s all along
        (offline,) = events(hub, "modbus.offline", "hung")
        assert "no answer" in offline["reason"], offline
        assert events(hub, "modbus.online", "hung") == []


def test_a_short_read_is_a_problem_audited_once(site: Any, tmp_path: Path) -> None:
    device = Device({1: (IMAGE, {})}, free_port(), short_by=1)  # each answer one register short
    with DeviceThread([device]):
        hub = site([modbus("short", device.port, profile="sunspec", der="S-1")], ("S-1",))
        (problem,) = until(lambda: events(hub, "modbus.problem", "short"))
        assert problem["reason"] == "holding registers 40000+2: 1 register in the answer"
        time.sleep(1.0)
        assert len(events(hub, "modbus.problem", "short")) == 1
        assert len(events(hub, "modbus.online", "short")) == 1  # it answers, though not usably
    assert stored(hub, "S-1") == []


def test_a_der_the_hub_does_not_know_is_refused_and_said_once(site: Any, devices: Any) -> None:
    _, device = devices(IMAGE)
    hub = site([modbus("site-c", device.port, profile="sunspec", der="NOT-ADDED")])
    (problem,) = until(lambda: events(hub, "modbus.problem", "site-c"))
    assert problem["reason"] == "NOT-ADDED: refused unknown_der: DER NOT-ADDED is not known to this hub"
    time.sleep(1.0)  # five more polls: held back, not refused and audited again at each
    refusals = [r for r in records(hub, "auth.failed") if r.get("source_id") == "site-c"]
    assert len(refusals) == 1 and len(events(hub, "modbus.problem", "site-c")) == 1


def test_a_source_may_write_only_its_configured_ders(site: Any, devices: Any) -> None:
    _, device = devices(IMAGE)
    hub = site([modbus("site-d", device.port, profile="sunspec", der="INV-4")], ("INV-4", "OTHER-1"))
    config = hub.config.sources[0]
    assert isinstance(config, ModbusSourceConfig)
    sender = sender_of(config)
    assert sender.ders == frozenset({"INV-4"})
    raw = RawMessage(
        "site-d", "modbus", b"", now_ms(), sender=sender, readings=[Reading("OTHER-1", now_ms(), {"power_kw": 1.0})]
    )
    answer, _ = submit(hub, raw)
    assert answer["accepted"] == 0
    assert answer["rejected"][0]["error"]["code"] == "not_allowed"
    assert stored(hub, "OTHER-1") == []


def test_source_test_polls_once_and_prints_what_it_found(tmp_path: Path, broker: EmbeddedBroker, devices: Any) -> None:
    thread, device = devices(IMAGE)
    path = write_config(
        tmp_path / "hubd.yaml", broker, sources=[modbus("inv", device.port, profile="sunspec", der="PV-1")]
    )
    hub = RunningHub(path, broker)  # not started: `source test` needs only the config
    result = hub.cli("source", "test", "inv")
    assert result.exit_code == 0, result.output
    shown = orjson.loads(result.output)
    assert shown["readings"][0]["der_id"] == "PV-1" and shown["readings"][0]["power_kw"] == 3.21
    assert shown["described"]["PV-1"]["serial"] == "SN-0042"
    assert [m.split()[0] for m in shown["discovered"]["models"]] == ["1", "103", "713", "802"]
    assert shown["states"] == {"103": "MPPT", "802": "CONNECTED"}
    thread.stop(device)
    result = hub.cli("source", "test", "inv")
    assert result.exit_code == 1 and "inv: cannot connect to 127.0.0.1" in result.output
    result = hub.cli("source", "test", "nope")
    assert result.exit_code == 1 and "no source nope in the config (sources: inv)" in result.output


def test_a_missing_or_bad_map_stops_the_hub_naming_it(tmp_path: Path, broker: EmbeddedBroker) -> None:
    path = write_config(tmp_path / "hubd.yaml", broker, sources=[modbus("m", 1502, map="nowhere", der="M-1")])
    hub = RunningHub(path, broker)
    result = hub.cli("run")
    assert result.exit_code == 78
    assert "sources[0].map: no nowhere.yaml in " in result.output
    maps = tmp_path / "data" / "drivers" / "modbus"
    maps.mkdir(parents=True)
    (maps / "nowhere.yaml").write_text("quantities:\n  power_kw: {address: 1, type: int12}\n", encoding="utf-8")
    result = hub.cli("run")
    assert result.exit_code == 78
    assert f"sources[0].map: {maps / 'nowhere.yaml'}: quantities.power_kw.type: Invalid enum value 'int12'" in (
        " ".join(result.output.split())
    )


def test_config_errors_name_the_source_key(tmp_path: Path) -> None:
    from hubd.config import ConfigError, parse_config

    base = {"kind": "modbus", "name": "a", "host": "h"}
    cases = [
        ({"profile": "sunspec", "der": "X", "hots": 1}, "sources[0].hots: unknown key"),
        ({"kind": "ftp"}, "sources[0].kind: must be 'modbus' or 'cloud', got 'ftp'"),
        ({"der": "X"}, "sources[0]: give either profile: sunspec or map"),
        ({"map": "m", "ders": {"X": [103]}}, "sources[0].ders: DERs by SunSpec model need profile: sunspec"),
        ({"profile": "sunspec", "der": "X", "unit_id": 300}, "sources[0].unit_id: must be 0 … 255, got 300"),
        ({"profile": "sunspec", "ders": {"X": ["103x"]}}, "sources[0].ders.X: '103x' is no SunSpec model"),
    ]
    for source, message in cases:
        with pytest.raises(ConfigError) as refused:
            parse_config({"sources": [base | source]})
        assert message in str(refused.value)
    twice = {"kind": "modbus", "name": "a", "host": "h", "profile": "sunspec", "der": "X"}
    with pytest.raises(ConfigError, match=r"sources\[1\].name: 'a' names another source too"):
        parse_config({"sources": [twice, twice]})


def test_an_older_state_file_gains_the_serial_and_version_columns(tmp_path: Path) -> None:
    path = tmp_path / "hub.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE ders (der_id TEXT PRIMARY KEY, type TEXT NOT NULL DEFAULT 'other', name TEXT, maker TEXT,"
        " model TEXT, capacity_kw REAL, lat REAL, lon REAL, area TEXT, status TEXT NOT NULL, password_hash TEXT,"
        " added_at INTEGER NOT NULL, registered_at INTEGER);"
        "INSERT INTO ders (der_id, maker, status, added_at) VALUES ('PV-1', 'Set By Operator', 'allowed', 1);"
    )
    old.close()
    registry = Registry(path)
    try:
        changed = registry.describe("PV-1", {"maker": "Acme", "model": "AP-10", "serial": "S-1", "version": "2"})
        assert changed == {"model": "AP-10", "serial": "S-1", "version": "2"}  # the operator's maker stays
        der = registry.der("PV-1")
        assert der is not None and (der.maker, der.serial, der.version) == ("Set By Operator", "S-1", "2")
        assert registry.describe("PV-1", {"serial": "S-1"}) == {}  # nothing changed, nothing to audit
    finally:
        registry.close()


def test_the_documented_example_polls_the_simulated_gateway(tmp_path: Path, broker: EmbeddedBroker) -> None:
    """docs/operations.md's hubd.yaml against `python -m hubd.sources.modbus.simulate` (on a free port here)."""
    from hubd.sources.modbus.simulate import demo_site

    text = (Path(__file__).parent.parent / "docs" / "operations.md").read_text(encoding="utf-8")
    example = text.split("This `hubd.yaml` polls it:\n\n```yaml\n")[1].split("```")[0]
    device = Device({1: (demo_site(), {})}, free_port())
    path = tmp_path / "hubd.yaml"
    path.write_text(example.replace("port: 1502", f"port: {device.port}"), encoding="utf-8")
    hub = RunningHub(path, broker)
    with DeviceThread([device]):
        assert hub.cli("der", "add", "INV-0001", "--type", "pv").exit_code == 0
        result = hub.cli("source", "test", "site-1")
    assert result.exit_code == 0, result.output
    shown = orjson.loads(result.output)
    assert [r["der_id"] for r in shown["readings"]] == ["INV-0001", "BAT-0001"]
    assert shown["described"]["BAT-0001"]["serial"] == "BAT0001"  # the battery's own common model
    assert shown["described"]["INV-0001"]["serial"] == "INV0001"
