"""The spine end to end, driven with the real Mosquitto clients as PROTOCOL.md says a user would."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

from conftest import RunningHub

from hubd import audit as audit_trail


def reading(der_id: str, password: str, at: str, **values: Any) -> dict[str, Any]:
    return {"der_id": der_id, "password": password, "measured_at": at, **(values or {"power_kw": 1.0})}


def query(hub: RunningHub, password: str, **conditions: Any) -> dict[str, Any]:
    body = {
        "client_id": "market-1",
        "password": password,
        "start": "2026-11-27T00:00:00Z",
        "end": "2026-11-28T00:00:00Z",
        **conditions,
    }
    return hub.rr("hub/v1/query", body)


def handled(on_message: Any, topic: str, payload: bytes) -> asyncio.Future[bool]:
    """Hand the hub one message as the driver does; the future says whether it is to be acknowledged."""
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    on_message(topic, payload, {}, done.set_result)
    return done


def test_register_send_resend_query_audit(hub: RunningHub) -> None:
    pv = hub.register("PV-0001", capacity_kw=5.5, location={"lat": 35.68, "lon": 139.76, "area": "feeder-12"})
    market = hub.consumer()
    first = [
        reading("PV-0001", pv, "2026-11-27T09:05:00+09:00", power_kw=3.21, energy_kwh=12345.678),
        reading("PV-0001", pv, "2026-11-27T00:00:00Z", power_kw=2.5),
    ]
    answer = hub.rr("hub/v1/data", {"source_id": "edge-9a", "readings": first})
    assert answer == {"ok": True, "accepted": 2, "rejected": []}
    # Re-sent with a new value: replaces, never duplicates.
    again = hub.rr(
        "hub/v1/data",
        {"source_id": "edge-9a", "readings": [reading("PV-0001", pv, "2026-11-27T00:05:00Z", power_kw=3.3)]},
    )
    assert again["accepted"] == 1

    rows = query(hub, market)["rows"]
    assert rows == [
        {"der_id": "PV-0001", "measured_at": "2026-11-27T00:00:00.000Z", "power_kw": 2.5},
        {"der_id": "PV-0001", "measured_at": "2026-11-27T00:05:00.000Z", "power_kw": 3.3},
    ]
    # The re-send replaced the whole reading: energy_kwh was not in it, so it is gone.
    assert "energy_kwh" not in rows[1]

    report = audit_trail.verify(hub.config.audit_path)
    assert report.ok, report.reason
    events = {r["event"] for r in audit_trail.tail(hub.config.audit_path, 1000)}
    assert {
        "register.ok",
        "password.issued",
        "data.received",
        "auth.ok",
        "data.stored",
        "query.received",
        "query.auth",
        "query.extracted",
    } <= events


def test_mqtt311_reply_to_and_request_id(hub: RunningHub) -> None:
    pv = hub.register("PV-0002")
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            str(hub.broker.port),
            "-V",
            "mqttv311",
            "-t",
            "edge/answers",
            "-C",
            "1",
            "-W",
            "10",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        time.sleep(0.3)  # let mosquitto_sub subscribe
        subprocess.run(
            [
                "mosquitto_pub",
                "-h",
                "127.0.0.1",
                "-p",
                str(hub.broker.port),
                "-V",
                "mqttv311",
                "-q",
                "1",
                "-t",
                "hub/v1/data",
                "-m",
                json.dumps(
                    {
                        "reply_to": "edge/answers",
                        "request_id": "r-7",
                        "readings": [reading("PV-0002", pv, "2026-11-27T01:00:00Z")],
                    }
                ),
            ],
            check=True,
            timeout=10,
        )
        out, _ = sub.communicate(timeout=15)
    finally:
        sub.kill()
    assert json.loads(out) == {"ok": True, "accepted": 1, "rejected": [], "request_id": "r-7"}


def test_open_mode_registration_records_the_type_the_der_sends(hub_factory: Any) -> None:
    hub = hub_factory(auth={"registration_mode": "open"})
    answer = hub.rr(
        "hub/v1/register",
        {
            "der_id": "ESS-9",
            "password": hub.initial_password,
            "type": "ess",
            "location": {"area": "feeder-3", "lat": 35.0, "lon": 139.0},
        },
    )
    assert answer["ok"], answer
    shown = json.loads(hub.cli("der", "show", "ESS-9").output)
    assert (shown["type"], shown["area"], shown["status"]) == ("ess", "feeder-3", "registered")
    assert shown["registered_at"].endswith("Z")  # a time a person can read, not epoch milliseconds


def test_a_cut_audit_trail_is_one_clear_line_not_a_traceback(hub: RunningHub) -> None:
    hub.register("PV-0003")
    hub.stop()
    audit = hub.config.audit_path
    lines = audit.read_bytes().splitlines(keepends=True)
    audit.write_bytes(b"".join(lines[:-2]))  # cut the last two records
    result = hub.cli("der", "list")
    assert result.exit_code == 1
    assert result.output.startswith("Error: audit trail:") and "Traceback" not in result.output
    assert hub.cli("audit", "verify").exit_code == 1


def test_a_bug_in_the_hub_is_answered_internal_kept_and_acknowledged(hub: RunningHub, monkeypatch: Any) -> None:
    from hubd.ingest import Ingest

    pv = hub.register("PV-0004")
    real = Ingest._precheck
    calls = {"n": 0}

    def failing_once(self: Ingest, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug")
        return real(self, *args)

    monkeypatch.setattr(Ingest, "_precheck", failing_once)
    body = {"readings": [reading("PV-0004", pv, "2026-11-27T02:00:00Z")]}
    answer = hub.rr("hub/v1/data", body)
    assert answer["ok"] is False and answer["error"]["code"] == "internal"
    assert "RuntimeError" in hub.cli("quarantine", "list").output
    assert hub.rr("hub/v1/data", body)["accepted"] == 1  # the hub goes on serving
    hub.restart()  # acknowledged: the broker does not deliver the failed message again
    records = audit_trail.tail(hub.config.audit_path, 1000, event="data.quarantined")
    assert [r["outcome"] for r in records] == ["internal"]


def test_messages_taken_in_together_fail_one_by_one(hub: RunningHub, monkeypatch: Any) -> None:
    """Messages of one loop turn are checked and committed as a group; a bug on one leaves the others stored."""
    from hubd.ingest import Ingest

    pv = hub.register("PV-0005")
    real_precheck, real_many = Ingest._precheck, Ingest._handle_many
    groups: list[int] = []

    def failing_for_one_source(self: Ingest, sender: Any, decoded: Any) -> Any:
        if decoded.source_id == "edge-bug":
            raise RuntimeError("a bug")
        return real_precheck(self, sender, decoded)

    async def recording(self: Ingest, raws: list[Any], answers: list[Any]) -> Any:
        groups.append(len(raws))
        return await real_many(self, raws, answers)

    monkeypatch.setattr(Ingest, "_precheck", failing_for_one_source)
    monkeypatch.setattr(Ingest, "_handle_many", recording)
    messages = [
        {"source_id": source, "readings": [reading("PV-0005", pv, f"2026-11-27T03:0{minute}:00Z")]}
        for minute, source in enumerate(("edge-a", "edge-bug", "edge-b"))
    ]
    assert hub._hub is not None and hub._loop is not None
    on_message = hub._hub.mqtt.on_message

    async def together() -> list[bool]:
        return await asyncio.gather(*(handled(on_message, "hub/v1/data", json.dumps(m).encode()) for m in messages))

    # Each is acknowledged: the two stored, and the one with the bug once it is kept in quarantine.
    assert asyncio.run_coroutine_threadsafe(together(), hub._loop).result(10) == [True, True, True]
    assert groups == [3]
    rows = query(hub, hub.consumer(), der_ids=["PV-0005"])["rows"]
    assert [r["measured_at"] for r in rows] == ["2026-11-27T03:00:00.000Z", "2026-11-27T03:02:00.000Z"]
    kept = audit_trail.tail(hub.config.audit_path, 1000, event="data.quarantined")
    assert [(r["outcome"], r["source_id"]) for r in kept] == [("internal", "unknown")]


def test_a_message_waiting_for_bcrypt_does_not_hold_back_its_group(hub: RunningHub, monkeypatch: Any) -> None:
    from hubd.auth.credentials import VerifiedCache

    fast, slow = hub.register("PV-0006"), hub.register("PV-0007")
    hub.restart()  # both passwords forgotten: the first reading of each needs bcrypt
    assert hub.rr("hub/v1/data", {"readings": [reading("PV-0006", fast, "2026-11-27T04:00:00Z")]})["accepted"] == 1
    real_check = VerifiedCache.check

    async def slow_check(self: VerifiedCache, *args: Any) -> Any:
        await asyncio.sleep(2.0)  # a bcrypt check at a high cost
        return await real_check(self, *args)

    monkeypatch.setattr(VerifiedCache, "check", slow_check)
    assert hub._hub is not None and hub._loop is not None
    on_message = hub._hub.mqtt.on_message
    messages = {
        "slow": {"readings": [reading("PV-0007", slow, "2026-11-27T04:01:00Z")]},
        "fast": {"readings": [reading("PV-0006", fast, "2026-11-27T04:01:00Z")]},
    }

    async def together() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        start, took = loop.time(), {}

        async def one(name: str) -> None:
            await handled(on_message, "hub/v1/data", json.dumps(messages[name]).encode())
            took[name] = loop.time() - start

        await asyncio.gather(one("slow"), one("fast"))
        return took

    took = asyncio.run_coroutine_threadsafe(together(), hub._loop).result(20)
    assert took["fast"] < 1.0 <= took["slow"]
    rows = query(hub, hub.consumer(), der_ids=["PV-0006", "PV-0007"], start="2026-11-27T04:01:00Z")["rows"]
    assert sorted(r["der_id"] for r in rows) == ["PV-0006", "PV-0007"]
