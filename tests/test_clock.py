"""Time you can settle on: the hub's clock against a real NTP server (chrony on loopback), edge terminals'
clocks checked and corrected over the real Mosquitto, passive skew, and the readings of bad clocks flagged.

The edge terminals are ``hubd.client.EdgeTerminal`` with a simulated clock (``TerminalClock``): 90 s fast,
90 s slow, drifting, or one that never answers a check. Their readings carry the times their own clocks say.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import INITIAL_PASSWORD, RunningHub
from helpers import reading, records
from prometheus_client.parser import text_string_to_metric_families

from hubd.client import EdgeTerminal, TerminalClock, load_passwords
from hubd.model import format_time

CHRONYD = shutil.which("chronyd") or "/usr/sbin/chronyd"
HUBD = [sys.executable, "-m", "hubd.cli"]


class Chrony:
    """A real NTP server: chronyd serving its own clock (``local stratum 8``) on a free loopback UDP port,
    from a config in a temporary folder, never touching the system clock (``-x``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_udp_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "chrony.conf").write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bindaddress 127.0.0.1",
                    "allow 127.0.0.1",
                    "local stratum 8",
                    "cmdport 0",
                    "bindcmdaddress /",
                    f"pidfile {folder}/chronyd.pid",
                    f"driftfile {folder}/chrony.drift",
                    "",
                ]
            )
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.folder / "chronyd.log").open("ab")
        self.process = subprocess.Popen(
            [CHRONYD, "-f", str(self.folder / "chrony.conf"), "-d", "-x", "-U"], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # serving once it answers a query
            if _answers(self.port):
                return
            assert self.process.poll() is None, (self.folder / "chronyd.log").read_text()
            time.sleep(0.1)
        raise RuntimeError("chronyd did not start serving")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    import ntplib  # type: ignore[import-untyped]

    try:
        ntplib.NTPClient().request("127.0.0.1", version=4, port=port, timeout=0.3)
    except (OSError, ntplib.NTPException):
        return False
    return True


@pytest.fixture
def chrony(tmp_path: Path) -> Iterator[Chrony]:
    if not os.path.exists(CHRONYD):
        pytest.fail("chronyd is not installed (Debian package chrony; ./dev installs it)")
    server = Chrony(tmp_path / "chrony")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def events(hub: RunningHub, event: str) -> list[dict[str, Any]]:
    return [r for r in records(hub, event) if r["event"] == event]


# -- the hub's clock -------------------------------------------------------------------------------------------


def test_the_hub_measures_its_clock_against_ntp_and_says_so(hub_factory: Any, chrony: Chrony) -> None:
    hub = hub_factory(time={"ntp": {"servers": [chrony.address], "poll_s": 1, "max_age_s": 3}})
    answer = wait_for(lambda: (a := hub.rr("hub/v1/time", {}))["ntp"]["synced"] and a, what="synced")
    ntp = answer["ntp"]
    assert ntp["server"] == chrony.address
    assert ntp["stratum"] == 8
    assert abs(ntp["offset_s"]) < 0.05  # the same host's clock
    assert 0 <= ntp["delay_s"] < 0.05
    assert ntp["reason"] is None
    assert ntp["checked_at"].endswith("Z")
    assert [r["server"] for r in events(hub, "time.synced")] == [chrony.address]
    status = hub.cli("time", "status")
    assert status.exit_code == 0, status.output
    assert "hub clock: synchronised" in status.output
    assert f"last good answer: {chrony.address}" in status.output
    assert "stratum 8" in status.output


def test_an_ntp_server_that_stops_is_an_audited_alarm(hub_factory: Any, chrony: Chrony) -> None:
    hub = hub_factory(time={"ntp": {"servers": [chrony.address], "poll_s": 0.5, "max_age_s": 2, "timeout_s": 0.3}})
    wait_for(lambda: hub.rr("hub/v1/time", {})["ntp"]["synced"], what="synced")
    assert events(hub, "time.alarm") == []
    chrony.stop()
    alarm = wait_for(lambda: events(hub, "time.alarm"), what="an alarm")
    assert len(alarm) == 1
    assert alarm[0]["outcome"] == "error"
    assert "no answer from an NTP server since" in alarm[0]["reason"]
    ntp = hub.rr("hub/v1/time", {})["ntp"]
    assert ntp["synced"] is False
    assert "no answer" in ntp["reason"]
    assert ntp["server"] == chrony.address  # the last good answer is still shown, with its time
    status = hub.cli("time", "status")
    assert status.exit_code == 1
    assert "NOT synchronised" in status.output
    time.sleep(1.5)
    assert len(events(hub, "time.alarm")) == 1  # said once, not at every poll
    chrony.start()  # back: synchronised again, audited
    wait_for(lambda: hub.rr("hub/v1/time", {})["ntp"]["synced"], what="synced again")
    assert len(events(hub, "time.synced")) == 2


def test_no_ntp_server_ever_answering_is_an_alarm_after_max_age(hub_factory: Any) -> None:
    silent = f"127.0.0.1:{_free_udp_port()}"  # nothing listens there
    hub = hub_factory(time={"ntp": {"servers": [silent], "poll_s": 0.5, "max_age_s": 1.5, "timeout_s": 0.3}})
    ntp = hub.rr("hub/v1/time", {})["ntp"]
    assert ntp["synced"] is False
    alarm = wait_for(lambda: events(hub, "time.alarm"), what="an alarm")
    assert "since the hub started" in alarm[0]["reason"]
    assert silent in alarm[0]["reason"]


def test_without_ntp_servers_the_hub_says_it_does_not_measure(hub: RunningHub) -> None:
    ntp = hub.rr("hub/v1/time", {})["ntp"]
    assert ntp["synced"] is False
    assert ntp["offset_s"] is None
    assert "no NTP server configured" in ntp["reason"]


# -- edge terminals --------------------------------------------------------------------------------------------

EDGES = {"tolerance_s": 2, "answer_timeout_s": 1, "samples": 3}


def run_terminal(hub: RunningHub, terminal: EdgeTerminal, work: Callable[[EdgeTerminal], Any]) -> Any:
    async def main() -> Any:
        async with terminal:
            return await work(terminal)

    return asyncio.run(main())


def register(hub: RunningHub, der_id: str) -> str:
    return hub.register(der_id)


def raw_rows(hub: RunningHub, der_id: str, **conditions: Any) -> list[dict[str, Any]]:
    """The DER's readings as the market system gets them (raw rows, any time)."""
    client_id, password = _market(hub)
    window = {"start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}
    body = {"client_id": client_id, "password": password, **window, "der_ids": [der_id], **conditions}
    answer = hub.rr("hub/v1/query", body)
    assert answer["ok"], answer
    return list(answer["rows"])


_MARKETS: dict[Path, tuple[str, str]] = {}


def _market(hub: RunningHub) -> tuple[str, str]:
    # By the hub's config file, not id(hub): a later test's hub may get the id of a finished one, and then
    # asked as a consumer its state file never had.
    if hub.config_path not in _MARKETS:
        _MARKETS[hub.config_path] = ("market-1", hub.consumer("market-1"))
    return _MARKETS[hub.config_path]


def test_a_terminal_90_s_fast_is_caught_told_to_correct_and_flagged_until_it_does(hub_factory: Any) -> None:
    hub = hub_factory(time={"edges": EDGES})
    password = register(hub, "PV-FAST")
    terminal = EdgeTerminal(hub.broker.url, "edge-fast", clock=TerminalClock(ahead_s=90))

    async def work(t: EdgeTerminal) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        # Its first reading is stamped 90 s in the future: flagged at once, from the data alone.
        first = await t.send([{"der_id": "PV-FAST", "password": password, "power_kw": 1.0}])
        # The hub checks it, finds it 90 s fast, tells it to correct, and checks again.
        for _ in range(100):
            if t.corrections:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the second check, after the correction
        second = await t.send([{"der_id": "PV-FAST", "password": password, "power_kw": 2.0}])
        return [first], [second]

    (first,), (second,) = run_terminal(hub, terminal, work)
    assert first["accepted"] == 1 and second["accepted"] == 1
    assert len(terminal.corrections) == 1
    assert 89 < terminal.corrections[0] < 91
    checked = events(hub, "time.checked")
    assert checked[0]["outcome"] == "off" and 89 < checked[0]["offset_s"] < 91
    assert checked[1]["outcome"] == "ok" and checked[1]["after_set"] is True and abs(checked[1]["offset_s"]) < 1
    assert [r["outcome"] for r in events(hub, "time.set")] == ["ok"]
    flagged = events(hub, "time.flagged")
    assert flagged[0]["outcome"] == "passive" and flagged[0]["source_id"] == "edge-fast"

    # Ordered by measured_at: the first reading's time, 90 s ahead, sorts after the corrected one.
    rows = sorted(raw_rows(hub, "PV-FAST"), key=lambda r: r["power_kw"])
    assert [r["power_kw"] for r in rows] == [1.0, 2.0]
    assert rows[0]["measured_at"] > rows[1]["measured_at"]
    assert rows[0]["clock_flag"] == "passive" and 85 < rows[0]["clock_offset_s"] < 91
    assert "clock_flag" not in rows[1] and "clock_offset_s" not in rows[1]
    # The corrected reading carries the true time: within a few seconds of the hub's clock.
    assert abs(_epoch(rows[1]["measured_at"]) - time.time()) < 10
    # Filtered on the flag.
    assert [r["power_kw"] for r in raw_rows(hub, "PV-FAST", clock_flagged=True)] == [1.0]
    assert [r["power_kw"] for r in raw_rows(hub, "PV-FAST", clock_flagged=False)] == [2.0]

    listing = hub.cli("time", "sources")
    assert listing.exit_code == 0
    line = next(x for x in listing.output.splitlines() if x.startswith("edge-fast"))
    assert " ok " in line and " 1" in line  # state ok after one correction


def test_a_slow_clock_is_found_by_a_check_and_its_readings_flagged(hub_factory: Any) -> None:
    # No set command: the clock stays 90 s slow, which the data alone cannot tell from late data.
    hub = hub_factory(time={"edges": {**EDGES, "set_clock": False}})
    password = register(hub, "PV-SLOW")
    terminal = EdgeTerminal(hub.broker.url, "edge-slow", clock=TerminalClock(ahead_s=-90))

    async def work(t: EdgeTerminal) -> list[dict[str, Any]]:
        answers = [await t.send([{"der_id": "PV-SLOW", "password": password, "power_kw": 1.0}])]
        for _ in range(100):
            if events(hub, "time.checked"):
                break
            await asyncio.sleep(0.1)
        answers.append(await t.send([{"der_id": "PV-SLOW", "password": password, "power_kw": 2.0}]))
        return answers

    run_terminal(hub, terminal, work)
    checked = events(hub, "time.checked")
    assert checked[0]["outcome"] == "off" and -91 < checked[0]["offset_s"] < -89
    assert checked[0]["rtt_s"] < 1
    assert events(hub, "time.set") == []
    assert terminal.corrections == []
    rows = raw_rows(hub, "PV-SLOW")
    assert "clock_flag" not in rows[0]  # before the check: a slow clock looks like late data
    assert rows[1]["clock_flag"] == "check" and -91 < rows[1]["clock_offset_s"] < -89


def test_a_drifting_clock_is_corrected_when_it_drifts_past_the_tolerance(hub_factory: Any) -> None:
    hub = hub_factory(time={"edges": {**EDGES, "interval_s": 1}})
    password = register(hub, "PV-DRIFT")
    # 0.4 s more every second: right at first, past the 2 s tolerance within seconds.
    terminal = EdgeTerminal(hub.broker.url, "edge-drift", clock=TerminalClock(drift_ppm=400_000))

    async def work(t: EdgeTerminal) -> None:
        await t.send([{"der_id": "PV-DRIFT", "password": password, "power_kw": 1.0}])
        for _ in range(150):
            if t.corrections:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)

    run_terminal(hub, terminal, work)
    outcomes = [(r["outcome"], r.get("after_set", False)) for r in events(hub, "time.checked")]
    assert outcomes[0] == ("ok", False)
    assert ("off", False) in outcomes
    assert ("ok", True) in outcomes  # corrected, and found right by the check after the set
    assert len(terminal.corrections) >= 1 and terminal.corrections[0] > 2


def test_a_terminal_that_never_answers_is_caught_passively(hub_factory: Any) -> None:
    hub = hub_factory(time={"edges": {**EDGES, "answer_timeout_s": 0.3}})
    password = register(hub, "PV-MUTE")
    terminal = EdgeTerminal(hub.broker.url, "edge-mute", clock=TerminalClock(ahead_s=90), answer_time=False)

    async def work(t: EdgeTerminal) -> None:
        for value in (1.0, 2.0):
            await t.send([{"der_id": "PV-MUTE", "password": password, "power_kw": value}])
        for _ in range(100):
            if events(hub, "time.checked"):
                break
            await asyncio.sleep(0.1)

    run_terminal(hub, terminal, work)
    assert [r["outcome"] for r in events(hub, "time.checked")] == ["unanswered"]
    assert events(hub, "time.set") == []
    rows = raw_rows(hub, "PV-MUTE")
    assert [r["clock_flag"] for r in rows] == ["passive", "passive"]
    assert all(85 < r["clock_offset_s"] < 91 for r in rows)
    listing = wait_for(
        lambda: (out := hub.cli("time", "sources", "--json").output) and '"unanswered"' in out and out,
        what="clock.json",
    )
    assert '"flag":"passive"' in listing
    # The operator's metrics carry the estimate the flags come from (docs/operations.md, Metrics).
    assert hub._hub is not None and hub._hub.ops.url is not None
    with urllib.request.urlopen(hub._hub.ops.url + "metrics") as response:
        offsets = {
            sample.labels["clock"]: sample.value
            for family in text_string_to_metric_families(response.read().decode())
            if family.name == "hubd_clock_offset_seconds"
            for sample in family.samples
        }
    assert 85 < offsets["edge-mute"] < 91
    assert "hub" not in offsets  # no NTP server configured: not measured, no made-up 0


def test_refuse_mode_refuses_readings_from_a_bad_clock(hub_factory: Any) -> None:
    hub = hub_factory(time={"edges": {**EDGES, "bad_clock": "refuse", "check": False}})
    password = register(hub, "PV-R")
    terminal = EdgeTerminal(hub.broker.url, "edge-refused", clock=TerminalClock(ahead_s=90))
    good = EdgeTerminal(hub.broker.url, "edge-good")
    answer = run_terminal(hub, terminal, lambda t: t.send([{"der_id": "PV-R", "password": password, "power_kw": 1.0}]))
    assert answer["accepted"] == 0
    (refused,) = answer["rejected"]
    assert refused["index"] == 0 and refused["error"]["code"] == "bad_request"
    assert "clock of source edge-refused" in refused["error"]["message"]
    # Another source's readings are taken as usual.
    other = run_terminal(hub, good, lambda t: t.send([{"der_id": "PV-R", "password": password, "power_kw": 2.0}]))
    assert other["accepted"] == 1
    assert [r["power_kw"] for r in raw_rows(hub, "PV-R")] == [2.0]
    assert any(r["outcome"] == "bad_request" for r in records(hub, "data.rejected"))


# -- the edge client on the command line ----------------------------------------------------------------------


def test_hubd_edge_registers_keeps_the_password_private_and_sends_csv_and_jsonl(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hub.cli("der", "add", "PV-E1", "--type", "pv").exit_code == 0
    passwords = tmp_path / "edge" / "passwords.json"
    passwords.parent.mkdir()
    monkeypatch.setenv("HUBD_INITIAL_PASSWORD", INITIAL_PASSWORD)
    broker = ["--broker", hub.broker.url]
    result = hub.cli("edge", "register", "PV-E1", "--passwords", str(passwords), *broker)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(passwords.stat().st_mode) == 0o600
    issued = load_passwords(passwords)["PV-E1"]
    assert len(issued) == 24
    assert issued not in result.output
    again = hub.cli("edge", "register", "PV-E1", "--passwords", str(passwords), *broker)
    assert again.exit_code == 1 and "already_registered" in again.output
    assert load_passwords(passwords)["PV-E1"] == issued  # a failed registration keeps the kept password

    csv_file = tmp_path / "readings.csv"
    csv_file.write_text(
        "der_id,measured_at,power_kw,energy_kwh\n"
        "PV-E1,2025-06-01T00:00:00Z,1.5,100.0\n"
        "PV-E1,2025-06-01T00:00:10Z,1.6,\n"
    )
    sent = hub.cli("edge", "send", str(csv_file), "--source-id", "edge-cli", "--passwords", str(passwords), *broker)
    assert sent.exit_code == 0, sent.output
    assert "accepted 2, rejected 0" in sent.output
    lines = '{"der_id": "PV-E1", "measured_at": "2025-06-01T00:00:20Z", "power_kw": 1.7}\n'
    lines += '{"der_id": "PV-E1", "measured_at": "2025-06-01T00:00:30Z", "power_kw": "high"}\n'
    piped = hub.cli("edge", "send", "-", "--source-id", "edge-cli", "--passwords", str(passwords), *broker, input=lines)
    assert piped.exit_code == 1
    assert "accepted 1, rejected 1" in piped.output
    rows = raw_rows(hub, "PV-E1")
    assert [(r["measured_at"], r["power_kw"]) for r in rows] == [
        ("2025-06-01T00:00:00.000Z", 1.5),
        ("2025-06-01T00:00:10.000Z", 1.6),
        ("2025-06-01T00:00:20.000Z", 1.7),
    ]
    assert rows[0]["energy_kwh"] == 100.0 and "energy_kwh" not in rows[1]


def _epoch(text: str) -> float:
    from hubd.model import parse_time

    return parse_time(text) / 1000


def test_format_time_round_trip() -> None:
    assert format_time(0) == "1970-01-01T00:00:00.000Z"


class ScriptTerminal:
    """An edge terminal made of the Mosquitto clients on MQTT 3.1.1, as an integrator's script might be: it
    sees no response topic, answers on ``reply_to`` with ``request_id``, keeps its clock ``ahead_s`` fast,
    sends readings stamped by that clock, and takes its time (``lag_s``) before a correction takes effect."""

    def __init__(self, hub: RunningHub, source_id: str, ahead_s: float, lag_s: float = 0.0) -> None:
        self.hub, self.source_id, self.ahead_s, self.lag_s = hub, source_id, ahead_s, lag_s
        self.told: list[float] = []
        mqtt = ["-h", "127.0.0.1", "-p", str(hub.broker.port), "-V", "mqttv311", "-q", "1"]
        self._mqtt = mqtt
        self._sub = subprocess.Popen(
            ["mosquitto_sub", *mqtt, "-t", f"hub/v1/time/+/{source_id}", "-v"], stdout=subprocess.PIPE, text=True
        )
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        time.sleep(0.3)  # subscribed

    def now(self) -> float:
        return time.time() + self.ahead_s

    def _serve(self) -> None:
        assert self._sub.stdout is not None
        for line in self._sub.stdout:
            topic, _, payload = line.strip().partition(" ")
            body = json.loads(payload)
            if "/time/set/" in topic:
                self.told.append(body["offset_s"])
                threading.Timer(self.lag_s, self._correct, [body["offset_s"]]).start()
                answer: dict[str, Any] = {"ok": True}
            else:
                answer = {"ok": True, "source_time": format_time(int(self.now() * 1000))}
            answer["request_id"] = body["request_id"]
            subprocess.run(["mosquitto_pub", *self._mqtt, "-t", body["reply_to"], "-m", json.dumps(answer)], check=True)

    def _correct(self, offset_s: float) -> None:
        self.ahead_s -= offset_s

    def send(self, der_id: str, password: str, value: float) -> None:
        measured = format_time(int(self.now() * 1000))
        body = {"source_id": self.source_id, "readings": [reading(der_id, password, measured, power_kw=value)]}
        assert self.hub.rr("hub/v1/data", body)["accepted"] == 1

    def close(self) -> None:
        self._sub.terminate()
        self._sub.wait(5)


def test_a_script_on_mqtt_311_90_s_fast_that_corrects_late_is_flagged_until_it_has(hub_factory: Any) -> None:
    hub = hub_factory(time={"edges": EDGES})
    password = register(hub, "PV-SCRIPT")
    terminal = ScriptTerminal(hub, "edge-script", ahead_s=90, lag_s=0.5)
    try:
        terminal.send("PV-SCRIPT", password, 1.0)
        wait_for(lambda: terminal.told, what="a set command")
        wait_for(lambda: [r for r in events(hub, "time.checked") if r["outcome"] == "ok"], what="a good check")
        terminal.send("PV-SCRIPT", password, 2.0)
    finally:
        terminal.close()
    assert 89 < terminal.told[0] < 91 and len(terminal.told) == 1
    after = [(r["outcome"], r.get("after_set")) for r in events(hub, "time.checked")]
    assert after[0] == ("off", None)
    assert after[-1] == ("ok", True)  # the check right after the set may still find it off: it waited
    rows = {r["power_kw"]: r for r in raw_rows(hub, "PV-SCRIPT")}
    assert rows[1.0]["clock_flag"] == "passive" and 85 < rows[1.0]["clock_offset_s"] < 91
    assert "clock_flag" not in rows[2.0]


def test_hubd_edge_serve_answers_the_hubs_checks(hub: RunningHub, tmp_path: Path) -> None:
    password = hub.register("PV-SERVE")
    serve = subprocess.Popen(
        [
            *HUBD,
            "edge",
            "serve",
            "--source-id",
            "edge-serve",
            "--broker",
            hub.broker.url,
            "--for",
            "8",
            "--clock-file",
            str(tmp_path / "clock.json"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)  # connected and subscribed
        body = {
            "source_id": "edge-serve",
            "readings": [reading("PV-SERVE", password, format_time(int(time.time() * 1000)))],
        }
        assert hub.rr("hub/v1/data", body)["accepted"] == 1
        (checked,) = wait_for(lambda: events(hub, "time.checked"), what="a check")
    finally:
        serve.wait(20)
    assert checked["outcome"] == "ok" and checked["source_id"] == "edge-serve"
    assert abs(checked["offset_s"]) < 1 and checked["rtt_s"] < 1
    assert serve.returncode == 0
    assert "answering time checks for edge-serve" in (serve.stderr.read() if serve.stderr else "")
