"""Helpers for the bad-input tests: talking to a running hub as a user would, and reading what it left behind.

Everything goes through the real Mosquitto clients, the ``hubd`` CLI or files a user can read (the audit log).
A ``Site`` is a hub with two registered DERs and the market system; many cases share one site, so each case
takes its own time window and reads only the audit records written since it began.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import RunningHub, write_config

from hubd import audit as audit_trail
from hubd.broker import EmbeddedBroker, free_port

T0 = "2025-06-01T00:00:00Z"  # a fixed time safely in the past: the hub refuses times far in the future
T0_MS = 1748736000000
DAY_S = 86400


def at(seconds: int) -> str:
    """``T0`` plus ``seconds``, in RFC 3339 with an offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0_MS // 1000 + seconds))


def stamp(seconds: int) -> str:
    """``at(seconds)`` as the hub returns it: UTC with milliseconds."""
    return at(seconds)[:-1] + ".000Z"


def reading(der_id: str, password: str, measured_at: Any = T0, **values: Any) -> dict[str, Any]:
    return {"der_id": der_id, "password": password, "measured_at": measured_at, **(values or {"power_kw": 1.0})}


# -- talking to the hub ---------------------------------------------------------------------------------------


def rr_bytes(hub: RunningHub, topic: str, payload: bytes, tmp_path: Path, timeout: int = 20) -> dict[str, Any]:
    """MQTT v5 request/response for payloads ``mosquitto_rr -m`` cannot carry (NUL bytes, megabytes).

    A persistent ``mosquitto_sub`` session subscribes to the answer topic and leaves (``-E``), so the broker
    keeps the answer for it; ``mosquitto_pub -f`` sends the file with a response topic and correlation data;
    the same session then comes back to collect the answer. No sleeping, no race.
    """
    answer_topic = f"test/answers/{os.getpid()}/{time.monotonic_ns()}"
    client = f"test-rr-{time.monotonic_ns()}"
    mqtt = ["-h", "127.0.0.1", "-p", str(hub.broker.port), "-V", "mqttv5", "-q", "1"]
    session = ["-c", "-i", client, "-t", answer_topic]
    subprocess.run(["mosquitto_sub", *mqtt, *session, "-x", "60", "-E"], check=True, timeout=timeout)
    file = tmp_path / f"payload-{time.monotonic_ns()}.bin"
    file.write_bytes(payload)
    properties = ["-D", "publish", "response-topic", answer_topic, "-D", "publish", "correlation-data", "c-1"]
    subprocess.run(
        ["mosquitto_pub", *mqtt, "-t", topic, "-f", str(file), *properties],
        check=True,
        timeout=timeout,
    )
    out = subprocess.run(
        ["mosquitto_sub", *mqtt, *session, "-x", "0", "-C", "1", "-W", str(timeout)],
        capture_output=True,
        timeout=timeout + 5,
        check=False,
    )
    assert out.returncode == 0, f"no answer on {answer_topic}: {out.stderr.decode()}"
    return dict(json.loads(out.stdout))


def rr_on(hub: RunningHub, topic: str, body: dict[str, Any], answer_topic: str) -> dict[str, Any]:
    """``mosquitto_rr`` with a fixed response topic: the same requester, as the hub sees it, every time."""
    mqtt = ["-h", "127.0.0.1", "-p", str(hub.broker.port), "-q", "1"]
    out = subprocess.run(
        ["mosquitto_rr", *mqtt, "-t", topic, "-e", answer_topic, "-m", json.dumps(body), "-W", "10"],
        capture_output=True,
        timeout=15,
        check=False,
    )
    assert out.returncode == 0, f"mosquitto_rr failed ({out.returncode}): {out.stderr.decode()}"
    return dict(json.loads(out.stdout))


# -- what the hub left behind ---------------------------------------------------------------------------------


def last_seq(hub: RunningHub) -> int:
    last = audit_trail.tail(hub.config.audit_path, 1)
    return int(str(last[-1]["seq"])) if last else 0


def records(hub: RunningHub, event: str | None = None, since: int = 0) -> list[dict[str, Any]]:
    """Audit records (oldest first) after seq ``since``, optionally of one event type (or prefix)."""
    found = audit_trail.tail(hub.config.audit_path, 1_000_000, event=event)
    return [dict(r) for r in found if int(str(r["seq"])) > since]


def outcomes(hub: RunningHub, event: str, since: int = 0) -> list[str]:
    return [str(r["outcome"]) for r in records(hub, event, since)]


def quarantined(hub: RunningHub) -> dict[str, dict[str, str]]:
    """``hubd quarantine list`` parsed, by id: received_at, topic, code, size, reason."""
    result = hub.cli("quarantine", "list", "-n", "100000")
    assert result.exit_code == 0, result.output
    names = ("id", "received_at", "topic", "code", "size", "reason")
    entries = [dict(zip(names, line.split("\t"), strict=True)) for line in result.output.splitlines()]
    return {entry["id"]: entry for entry in entries}


def quarantined_bytes(hub: RunningHub, entry_id: object) -> bytes:
    result = hub.cli("quarantine", "show", str(entry_id), "--raw")
    assert result.exit_code == 0, result.output
    return result.stdout_bytes


# -- a hub with DERs and a market system --------------------------------------------------------------------------


@dataclass
class Site:
    """A running hub with PV-1 and PV-2 registered and the consumer system market-1."""

    hub: RunningHub
    pv1: str
    pv2: str
    market: str
    warm: int = 0  # the day warm_up stored one reading of PV-1 in
    _windows: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def on(cls, hub: RunningHub) -> Site:
        return cls(hub, hub.register("PV-1"), hub.register("PV-2"), hub.consumer())

    def window(self) -> int:
        """The start (seconds after T0) of a day no other case uses."""
        return next(self._windows) * DAY_S

    def send(self, body: dict[str, Any] | str | bytes) -> dict[str, Any]:
        return self.hub.rr(f"{self.hub.prefix}/data", body)

    def query(self, password: str | None = None, client_id: str = "market-1", **conditions: Any) -> dict[str, Any]:
        body = {"client_id": client_id, "password": self.market if password is None else password, **conditions}
        return self.hub.rr(f"{self.hub.prefix}/query", body)

    def stored(self, start_s: int, **conditions: Any) -> list[tuple[str, str]]:
        """(der_id, measured_at) of the readings stored in the day from ``start_s``, as the market sees them."""
        answer = self.query(start=at(start_s), end=at(start_s + DAY_S), limit=10000, **conditions)
        assert answer["ok"], answer
        return [(row["der_id"], row["measured_at"]) for row in answer["rows"]]

    def keeps_serving(self, start_s: int) -> None:
        """After bad input: a good reading from another DER is accepted (the answer follows the commit), and
        the audit chain still verifies."""
        body = {"source_id": "edge-ok", "readings": [reading("PV-2", self.pv2, at(start_s + DAY_S - 60))]}
        assert self.send(body) == {"ok": True, "accepted": 1, "rejected": []}
        report = audit_trail.verify(self.hub.config.audit_path)
        assert report.ok, report.reason


@contextmanager
def running_hub(base: Path, template: Path | None = None, **overrides: Any) -> Iterator[RunningHub]:
    """A broker (from ``template``, if given, instead of the embedded config) and a hub for a whole module (the
    fixtures in conftest are per test)."""
    broker = EmbeddedBroker(base / "broker-data", port=free_port(), template=template)
    broker.start_sync()
    try:
        hub = RunningHub(write_config(base / "hubd.yaml", broker, **overrides), broker)
        hub.start()
        try:
            yield hub
        finally:
            hub.stop()
    finally:
        broker.stop_sync()


def warm_up(site: Site) -> None:
    """Make the hub start its worker threads now, so a later test does not count them as its leaked threads:
    the store thread (a write and a query) and both bcrypt threads (two slow checks at once)."""
    start = site.warm = site.window()
    # Checks handed to the pool together start its second thread only if the first is still busy: with the
    # event loop busy elsewhere in between (the clock checks of a new source), it may not be; so until it runs.
    for attempt in range(20):
        wrong = [reading(der, f"Warm-up-wrong-{attempt}-{i}", at(start)) for i, der in enumerate(["PV-1", "PV-2"] * 2)]
        assert site.send({"source_id": "warm-up", "readings": wrong})["accepted"] == 0
        if any(thread.name == "hubd-bcrypt_1" for thread in threading.enumerate()):
            break
    assert site.send({"readings": [reading("PV-1", site.pv1, at(start))]})["accepted"] == 1
    assert site.stored(start) == [("PV-1", stamp(start))]
