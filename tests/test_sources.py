"""The source contract: a sender the operator configured for some DERs, and the supervisor's restarts.

A configured source (a polled device, a cloud account) hands the pipeline decoded readings tagged with its
sender; auth lets it write its own DERs' readings without passwords and nothing else. These tests hand such
messages to a running hub's pipeline, as a source would, and read the result back as the market system does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import RunningHub
from helpers import T0, Site, at, records

from hubd import audit as audit_trail
from hubd.audit import AuditLog
from hubd.model import RawMessage, Reading, Sender, now_ms, parse_time
from hubd.sources import Health, Pipeline, Supervisor

METER = Sender("modbus", "meter-7", frozenset({"PV-1"}))


def submit(hub: RunningHub, raw: RawMessage) -> Any:
    """Hand ``raw`` to the running hub's pipeline as a source does; the outcome it replies with."""
    assert hub._hub is not None and hub._loop is not None
    ingest = hub._hub.ingest

    async def handed() -> Any:
        outcome = asyncio.get_running_loop().create_future()
        ingest.submit(raw, outcome.set_result)
        return await outcome

    return asyncio.run_coroutine_threadsafe(handed(), hub._loop).result(10)


def polled(sender: Sender, *readings: Reading) -> RawMessage:
    return RawMessage(sender.name, "modbus", b"", now_ms(), sender=sender, readings=list(readings))


def test_a_configured_source_writes_its_own_ders_without_passwords(hub: RunningHub) -> None:
    site = Site.on(hub)
    measured = parse_time(at(60))
    answer, _ = submit(hub, polled(METER, Reading("PV-1", measured, {"power_kw": 2.5})))
    assert answer == {"ok": True, "accepted": 1, "rejected": []}
    rows = site.query(start=T0, end=at(3600))["rows"]
    assert [(r["der_id"], r["power_kw"]) for r in rows] == [("PV-1", 2.5)]
    (stored,) = [r for r in records(hub, "data.stored") if r.get("source_id") == "meter-7"]
    assert stored["readings"] == 1


def test_a_configured_sources_readings_are_versioned_by_when_the_hub_read_them(hub: RunningHub) -> None:
    """A reading the hub read earlier, committed after a later read of the same DER and time, does not replace it;
    an MQTT message without a send time does not replace it either (docs/protocol.md, Storing)."""
    site = Site.on(hub)
    measured = parse_time(at(240))
    later = polled(METER, Reading("PV-1", measured, {"power_kw": 2.0}))
    earlier = RawMessage(
        "meter-7",
        "modbus",
        b"",
        later.received_at - 5000,
        sender=METER,
        readings=[Reading("PV-1", measured, {"power_kw": 1.0})],
    )
    assert submit(hub, later)[0]["accepted"] == 1
    assert submit(hub, earlier)[0]["accepted"] == 1
    unversioned = {"readings": [{"der_id": "PV-1", "password": site.pv1, "measured_at": at(240), "power_kw": 3.0}]}
    assert hub.rr(f"{hub.prefix}/data", unversioned)["accepted"] == 1
    rows = site.query(start=at(240), end=at(241), der_ids=["PV-1"])["rows"]
    assert [r["power_kw"] for r in rows] == [2.0]


def test_a_configured_source_is_refused_for_other_ders_unknown_and_revoked(hub: RunningHub) -> None:
    site = Site.on(hub)
    since = len(records(hub))
    measured = parse_time(at(120))
    answer, _ = submit(
        hub,
        polled(
            Sender("modbus", "meter-7", frozenset({"PV-1", "PV-9"})),
            Reading("PV-2", measured, {"power_kw": 1.0}),  # another source's DER, though registered
            Reading("PV-9", measured, {"power_kw": 1.0}),  # bound, but unknown to the registry
            Reading("PV-1", measured, {"power_kw": 3.0}),
        ),
    )
    assert answer["accepted"] == 1
    codes = [(r["index"], r["der_id"], r["error"]["code"]) for r in answer["rejected"]]
    assert codes == [(0, "PV-2", "not_allowed"), (1, "PV-9", "unknown_der")]
    assert "modbus meter-7 is not bound to DER PV-2" in answer["rejected"][0]["error"]["message"]
    (failed,) = records(hub, "auth.failed", since)  # one record for the message's refusals
    assert (failed["outcome"], failed["codes"]) == ("mixed", {"not_allowed": 1, "unknown_der": 1})
    assert [(r["index"], r["der_id"]) for r in failed["refusals"]] == [(0, "PV-2"), (1, "PV-9")]
    assert hub.cli("der", "revoke", "PV-1").exit_code == 0
    hub._hub.auth.refresh()  # type: ignore[union-attr]  # as ingest does once per group of messages
    answer, _ = submit(hub, polled(METER, Reading("PV-1", measured + 1000, {"power_kw": 9.0})))
    assert answer["accepted"] == 0 and answer["rejected"][0]["error"]["code"] == "not_allowed"
    rows = site.query(start=T0, end=at(3600), der_ids=["PV-1", "PV-2"])["rows"]
    assert [(r["der_id"], r["power_kw"]) for r in rows] == [("PV-1", 3.0)]  # nothing of the refused


def test_an_edge_sender_still_needs_each_ders_password(hub: RunningHub) -> None:
    """A message without a configured sender is judged by the passwords in its readings, as over MQTT."""
    Site.on(hub)
    raw = RawMessage(
        "edge-1", "hub.v1", b"", now_ms(), readings=[Reading("PV-1", parse_time(at(180)), {"power_kw": 1})]
    )
    answer, _ = submit(hub, raw)
    assert answer["accepted"] == 0 and answer["rejected"][0]["error"]["code"] == "bad_credentials"


class FlakySource:
    """A source whose run fails the first ``failures`` times; counts its starts and stops."""

    kind = "test"

    def __init__(self, failures: int) -> None:
        self.name = "flaky"
        self.failures = failures
        self.starts = 0
        self.stops = 0
        self.running = asyncio.Event()
        self._up = False
        self._stopped = asyncio.Event()

    @property
    def health(self) -> Health:
        return "up" if self._up else "down"

    async def start(self, pipeline: Pipeline) -> None:
        self.starts += 1
        self._up = True
        self._stopped.clear()

    async def run(self) -> None:
        self.running.set()
        if self.failures:
            self.failures -= 1
            self._up = False
            raise ConnectionError("the device went away")
        await self._stopped.wait()

    async def stop(self) -> None:
        self.stops += 1
        self._up = False
        self._stopped.set()


def test_the_supervisor_restarts_a_failed_source_with_backoff_and_audits_it(tmp_path: Any) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    source = FlakySource(failures=2)

    async def scenario() -> tuple[Health, int]:
        supervisor = Supervisor([source], audit, backoff_s=(0.01, 0.05))
        await supervisor.start(pipeline=None)  # type: ignore[arg-type]  # this source hands nothing on
        for _ in range(200):
            if source.starts == 3 and source.health == "up":
                break
            await asyncio.sleep(0.01)
        health = source.health
        await supervisor.stop()
        return health, source.stops

    health, stops = asyncio.run(scenario())
    audit.close()
    assert health == "up" and source.starts == 3
    assert stops == 3  # before each restart, and at the end
    trail = audit_trail.tail(tmp_path / "audit.jsonl", 100)
    events = [(r["event"], r["outcome"]) for r in trail if r["event"].startswith("source.")]
    assert events == [
        ("source.failed", "error"),
        ("source.restarted", "ok"),
        ("source.failed", "error"),
        ("source.restarted", "ok"),
    ]


def test_a_source_that_cannot_start_stops_the_hub_from_starting(tmp_path: Any) -> None:
    class Unreachable(FlakySource):
        async def start(self, pipeline: Pipeline) -> None:
            raise ConnectionRefusedError("no device at 127.0.0.1:1502")

    audit = AuditLog(tmp_path / "audit.jsonl")
    supervisor = Supervisor([Unreachable(0)], audit)
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(supervisor.start(pipeline=None))  # type: ignore[arg-type]
    audit.close()
