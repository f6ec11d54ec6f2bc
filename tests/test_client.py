"""``hubd.client.HubClient``, the small request/response client, against a real hub and a real Mosquitto.

Used as an edge terminal or a market system uses it: register, send, query, and meet the refusals and the
failures such a user meets (a wrong password, a broker that is not there, a hub that does not answer).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from conftest import INITIAL_PASSWORD, RunningHub
from helpers import records

from hubd.broker import EmbeddedBroker, free_port
from hubd.client import HubClient

T0 = "2026-11-27T00:00:00Z"
T1 = "2026-11-28T00:00:00Z"


def allow(hub: RunningHub, *der_ids: str) -> None:
    for der_id in der_ids:
        result = hub.cli("der", "add", der_id, "--type", "pv", "--area", "feeder-3")
        assert result.exit_code == 0, result.output


def at(minute: int) -> str:
    return f"2026-11-27T09:{minute:02d}:00+09:00"


def test_register_send_and_read_back(hub: RunningHub) -> None:
    allow(hub, "PV-C1")
    market = hub.consumer()

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with HubClient(hub.broker.url, "edge") as edge:
            registered = await edge.request(
                f"{hub.prefix}/register", {"der_id": "PV-C1", "password": INITIAL_PASSWORD, "type": "pv"}
            )
            readings = [
                {"der_id": "PV-C1", "password": registered["password"], "measured_at": at(m), "power_kw": m / 10}
                for m in (5, 0, 10)  # out of order
            ]
            sent = await edge.request(f"{hub.prefix}/data", {"source_id": "edge-c", "readings": readings})
            again = await edge.request(f"{hub.prefix}/data", {"source_id": "edge-c", "readings": readings[:1]})
        async with HubClient(hub.broker.url, "market") as system:
            rows = await system.request(
                f"{hub.prefix}/query", {"client_id": "market-1", "password": market, "start": T0, "end": T1}
            )
        return registered, sent, again, rows

    registered, sent, again, rows = asyncio.run(scenario())
    assert registered["ok"] is True and registered["der_id"] == "PV-C1"
    assert len(registered["password"]) == 24
    assert sent == {"ok": True, "accepted": 3, "rejected": []}
    assert again == {"ok": True, "accepted": 1, "rejected": []}
    assert rows["ok"] is True and rows["next_cursor"] is None
    assert [(r["der_id"], r["measured_at"], r["power_kw"]) for r in rows["rows"]] == [
        ("PV-C1", "2026-11-27T00:00:00.000Z", 0.0),
        ("PV-C1", "2026-11-27T00:05:00.000Z", 0.5),
        ("PV-C1", "2026-11-27T00:10:00.000Z", 1.0),
    ]


def test_answers_go_to_the_request_that_asked_when_many_are_in_flight(hub: RunningHub) -> None:
    der_ids = [f"PV-M{i}" for i in range(6)]
    allow(hub, *der_ids)

    async def scenario() -> list[dict[str, Any]]:
        async with HubClient(hub.broker.url, "edge") as edge:
            return await asyncio.gather(
                *(
                    edge.request(f"{hub.prefix}/register", {"der_id": d, "password": INITIAL_PASSWORD, "type": "pv"})
                    for d in der_ids
                )
            )

    answers = asyncio.run(scenario())
    assert [a["der_id"] for a in answers] == der_ids
    assert all(a["ok"] for a in answers)
    assert len({a["password"] for a in answers}) == len(der_ids)


def test_wrong_passwords_are_answered_with_their_codes(hub: RunningHub) -> None:
    allow(hub, "PV-W1", "PV-W2")
    pv = hub.register("PV-W1")
    hub.consumer()

    async def scenario() -> tuple[dict[str, Any], ...]:
        async with HubClient(hub.broker.url, "edge") as edge:
            register = await edge.request(
                f"{hub.prefix}/register", {"der_id": "PV-W2", "password": "not-the-initial-one", "type": "pv"}
            )
            data = await edge.request(
                f"{hub.prefix}/data",
                {
                    "source_id": "edge-w",
                    "readings": [
                        {"der_id": "PV-W1", "password": "not-its-password", "measured_at": at(1), "power_kw": 1.0},
                        {"der_id": "PV-W1", "password": pv, "measured_at": at(2), "power_kw": 2.0},
                    ],
                },
            )
            query = await edge.request(
                f"{hub.prefix}/query", {"client_id": "market-1", "password": "not-its-password", "start": T0, "end": T1}
            )
            garbage = await edge.request(f"{hub.prefix}/data", b"\xff not json")
        return register, data, query, garbage

    register, data, query, garbage = asyncio.run(scenario())
    assert register["ok"] is False and register["error"]["code"] == "bad_credentials"
    assert "password" not in register
    assert data["ok"] is True and data["accepted"] == 1
    (refused,) = data["rejected"]
    assert (refused["index"], refused["der_id"], refused["error"]["code"]) == (0, "PV-W1", "bad_credentials")
    assert query["ok"] is False and query["error"]["code"] == "bad_credentials"
    assert "rows" not in query
    assert garbage["ok"] is False and garbage["error"]["code"] == "decode_error"
    assert hub.cli("audit", "verify").exit_code == 0


def test_a_vendor_payload_with_the_credentials_in_user_properties(hub: RunningHub) -> None:
    allow(hub, "PV-V1")
    pv = hub.register("PV-V1")
    body = {
        "power": {
            "timeUnit": "QUARTER_OF_AN_HOUR",
            "unit": "W",
            "values": [
                {"date": "2026-11-27 09:00:00", "value": 1500.0},
                {"date": "2026-11-27 09:15:00", "value": None},
            ],
        }
    }

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with HubClient(hub.broker.url, "connector") as cloud:
            topic = f"{hub.prefix}/data/solaredge.site_power"
            good = await cloud.request(topic, body, properties={"der_id": "PV-V1", "password": pv})
            bad = await cloud.request(topic, body, properties={"der_id": "PV-V1", "password": "not-its-password"})
        return good, bad

    good, bad = asyncio.run(scenario())
    assert good == {"ok": True, "accepted": 1, "rejected": []}
    assert bad["accepted"] == 0 and [r["error"]["code"] for r in bad["rejected"]] == ["bad_credentials"]


def test_a_published_message_reaches_the_hub_even_when_the_client_leaves_at_once(hub: RunningHub) -> None:
    allow(hub, "PV-F1")
    pv = hub.register("PV-F1")
    market = hub.consumer()

    async def scenario() -> list[dict[str, Any]]:
        async with HubClient(hub.broker.url, "edge") as edge:
            reading = {"der_id": "PV-F1", "password": pv, "measured_at": at(7), "power_kw": 0.7}
            edge.publish(f"{hub.prefix}/data", {"source_id": "edge-f", "readings": [reading]})
        # No answer was asked for: the market system looks until the reading is there.
        async with HubClient(hub.broker.url, "market") as system:
            deadline = time.monotonic() + 20
            while True:
                answer = await system.request(
                    f"{hub.prefix}/query", {"client_id": "market-1", "password": market, "start": T0, "end": T1}
                )
                if answer["rows"] or time.monotonic() > deadline:
                    return list(answer["rows"])

    rows = asyncio.run(scenario())
    assert [(r["der_id"], r["measured_at"], r["power_kw"]) for r in rows] == [
        ("PV-F1", "2026-11-27T00:07:00.000Z", 0.7)
    ]


def test_no_broker_at_the_address_is_a_prompt_connection_error() -> None:
    port = free_port()

    async def scenario() -> None:
        async with HubClient(f"mqtt://127.0.0.1:{port}", "edge"):
            pass

    began = time.monotonic()
    with pytest.raises(OSError, match=str(port)):
        asyncio.run(scenario())
    assert time.monotonic() - began < 5


def test_a_broker_without_a_hub_is_a_timeout_after_the_time_asked_for(broker: EmbeddedBroker) -> None:
    async def scenario() -> float:
        async with HubClient(broker.url, "edge") as edge:
            began = time.monotonic()
            with pytest.raises(TimeoutError):
                await edge.request("hub/v1/register", {"der_id": "PV-X", "password": INITIAL_PASSWORD}, timeout=1.0)
            return time.monotonic() - began

    waited = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert 1.0 <= waited < 5


def test_a_broker_that_goes_away_fails_the_waiting_request_at_once(broker: EmbeddedBroker) -> None:
    ask = {"der_id": "PV-X", "password": INITIAL_PASSWORD}

    async def scenario() -> tuple[float, str, str]:
        async with HubClient(broker.url, "edge") as edge:
            waiting = asyncio.create_task(edge.request("hub/v1/register", ask, timeout=30))
            await asyncio.to_thread(broker.stop_sync)
            began = time.monotonic()
            with pytest.raises(ConnectionError) as lost:
                await waiting
            waited = time.monotonic() - began
            with pytest.raises(ConnectionError) as later:
                await edge.request("hub/v1/register", ask, timeout=30)
        return waited, str(lost.value), str(later.value)

    waited, lost, later = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert waited < 5, "the request failed when the connection went, not at its 30 s timeout"
    assert f"127.0.0.1:{broker.port}" in lost and "lost" in lost
    assert f"127.0.0.1:{broker.port}" in later and "not connected" in later


def test_a_reading_not_answered_is_sent_again_and_stored_once(hub: RunningHub) -> None:
    """The broker's PUBACK only says the broker has the message: an edge knows a reading is stored when the
    hub answers. A request that timed out is sent again, and the store, idempotent on DER and time, keeps one."""
    password = hub.register("PV-R1")
    market = hub.consumer()
    data = {"source_id": "edge-r", "readings": [{"der_id": "PV-R1", "password": password, "measured_at": at(5),
                                                 "power_kw": 2.5}]}  # fmt: skip

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with HubClient(hub.broker.url, "edge") as edge:
            await asyncio.to_thread(hub.stop)  # the broker stays up and takes the message; no hub answers
            with pytest.raises(TimeoutError):
                await edge.request(f"{hub.prefix}/data", data, timeout=1.0)
            await asyncio.to_thread(hub.start)
            resent = await edge.request(f"{hub.prefix}/data", data)
        async with HubClient(hub.broker.url, "market") as system:
            rows = await system.request(
                f"{hub.prefix}/query", {"client_id": "market-1", "password": market, "start": T0, "end": T1}
            )
        return resent, rows

    resent, rows = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert resent == {"ok": True, "accepted": 1, "rejected": []}
    # The first sending was kept by the broker for the hub's session and stored too when the hub came back:
    # two writes of the reading, one reading stored.
    assert sum(int(r["readings"]) for r in records(hub, "data.stored")) == 2
    assert [(r["der_id"], r["measured_at"], r["power_kw"]) for r in rows["rows"]] == [
        ("PV-R1", "2026-11-27T00:05:00.000Z", 2.5)
    ]
