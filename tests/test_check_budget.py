"""The data path's budget of bcrypt checks per DER, against a real hub and a real Mosquitto.

A flood of readings with ever new wrong passwords for one DER must cost at most a few bcrypt calls, be refused
``rate_limited`` past them, and hold up neither that DER's own known password nor any other DER.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from conftest import RunningHub
from helpers import at, reading, records

from hubd.auth import credentials
from hubd.client import HubClient

CHECKS = 5


def codes(answer: dict[str, Any]) -> list[str]:
    return [r["error"]["code"] for r in answer["rejected"]]


def test_a_flood_of_wrong_passwords_costs_at_most_the_budget_of_checks(
    hub_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub: RunningHub = hub_factory(auth={"rate_limit": {"der_checks": CHECKS, "der_window_s": 60}})
    pv1 = hub.register("PV-1")  # registration leaves the issued password known to memory
    hub.register("PV-2")
    rotated = hub.cli("der", "rotate", "PV-2")  # a password memory does not know yet: bcrypt must judge it
    assert rotated.exit_code == 0, rotated.output
    pv2 = rotated.output.strip()
    checked: list[str] = []
    lock = threading.Lock()
    original = credentials.bcrypt_check

    def counted(password: str, stored_hash: str) -> bool:
        with lock:
            checked.append(password)
        return original(password, stored_hash)

    monkeypatch.setattr(credentials, "bcrypt_check", counted)
    data = f"{hub.prefix}/data"

    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        async with HubClient(hub.broker.url, "edge") as edge:
            first = await edge.request(data, {"source_id": "edge-1", "readings": [reading("PV-1", pv1, at(0))]})
            wrong = [
                edge.request(data, {"source_id": "flood", "readings": [reading("PV-1", f"wrong-{i:02d}", at(i))]})
                for i in range(20)
            ]
            right = edge.request(data, {"source_id": "edge-1", "readings": [reading("PV-1", pv1, at(100))]})
            *flood, during = await asyncio.gather(*wrong, right)
            other = await edge.request(data, {"source_id": "edge-2", "readings": [reading("PV-2", pv2, at(0))]})
        return first, flood, during, other

    first, flood, during, other = asyncio.run(scenario())
    assert first["accepted"] == 1
    refused = [code for answer in flood for code in codes(answer)]
    assert len(refused) == 20 and all(answer["accepted"] == 0 for answer in flood)
    assert refused.count("bad_credentials") == CHECKS
    assert refused.count("rate_limited") == 20 - CHECKS
    assert len([p for p in checked if p.startswith("wrong-")]) == CHECKS  # no bcrypt call past the budget
    # The DER's known password, sent in the middle of the flood, is accepted; another DER's new one is checked.
    assert during == {"ok": True, "accepted": 1, "rejected": []}
    assert other == {"ok": True, "accepted": 1, "rejected": []}
    assert checked.count(pv2) == 1
    # Every refusal is audited, the budget's among them.
    audited: dict[str, int] = {}
    for record in records(hub, "auth.failed"):
        for code, count in record["codes"].items():
            audited[code] = audited.get(code, 0) + count
    assert audited == {"bad_credentials": CHECKS, "rate_limited": 20 - CHECKS}


def counting_bcrypt(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords bcrypt is asked to judge, in order (the real check still runs)."""
    checked: list[str] = []
    lock = threading.Lock()
    original = credentials.bcrypt_check

    def counted(password: str, stored_hash: str) -> bool:
        with lock:
            checked.append(password)
        return original(password, stored_hash)

    monkeypatch.setattr(credentials, "bcrypt_check", counted)
    return checked


def test_a_source_that_names_ever_other_ders_is_held_by_its_own_budget(
    hub_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotating DER ids dodges the per-DER budget (3 tries each of 5 allowed) but not the source's (6): past it the
    source's new passwords are refused rate_limited without a bcrypt call, audited, while another source's new
    password for one of the same DERs is still checked and accepted."""
    hub: RunningHub = hub_factory(
        auth={"rate_limit": {"der_checks": 5, "der_window_s": 60, "source_checks": 6, "source_window_s": 60}}
    )
    ders = [f"PV-{i}" for i in range(4)]
    for der_id in ders:
        hub.register(der_id)
    rotated = hub.cli("der", "rotate", "PV-3")  # a new password memory does not know
    assert rotated.exit_code == 0, rotated.output
    checked = counting_bcrypt(monkeypatch)
    data = f"{hub.prefix}/data"
    wrong = [reading(ders[i % 4], f"wrong-{i:02d}", at(i)) for i in range(12)]

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with HubClient(hub.broker.url, "edge") as edge:
            flood = await edge.request(data, {"source_id": "rotator", "readings": wrong})
            more = await edge.request(data, {"source_id": "rotator", "readings": [reading("PV-0", "wrong-x", at(50))]})
            other = await edge.request(
                data, {"source_id": "edge-2", "readings": [reading("PV-3", rotated.output.strip(), at(60))]}
            )
        return flood, more, other

    flood, more, other = asyncio.run(scenario())
    assert flood["accepted"] == 0
    assert codes(flood).count("bad_credentials") == 6 and codes(flood).count("rate_limited") == 6
    assert codes(more) == ["rate_limited"]
    assert "source rotator" in more["rejected"][0]["error"]["message"]
    assert len([p for p in checked if p.startswith("wrong-")]) == 6
    assert other == {"ok": True, "accepted": 1, "rejected": []}
    audited = [r for r in records(hub, "auth.failed") if r["source_id"] == "rotator"]
    assert sum(r["codes"].get("rate_limited", 0) for r in audited) == 7


def test_after_the_window_a_der_gets_checks_again_and_known_wrong_passwords_cost_none(
    hub_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget is a sliding window, not a lockout: once der_window_s has passed the DER's new passwords are
    checked again. A wrong password already judged is answered bad_credentials from memory, past the budget too."""
    hub: RunningHub = hub_factory(auth={"rate_limit": {"der_checks": 2, "der_window_s": 1.0}})
    hub.register("PV-1")
    rotated = hub.cli("der", "rotate", "PV-1")
    assert rotated.exit_code == 0, rotated.output
    checked = counting_bcrypt(monkeypatch)
    data = f"{hub.prefix}/data"

    async def send(edge: HubClient, password: str, second: int) -> str:
        answer = await edge.request(data, {"source_id": "edge-1", "readings": [reading("PV-1", password, at(second))]})
        return "accepted" if answer["accepted"] else str(codes(answer)[0])

    async def scenario() -> list[str]:
        async with HubClient(hub.broker.url, "edge") as edge:
            seen = [await send(edge, password, i) for i, password in enumerate(("wrong-a", "wrong-b", "wrong-c"))]
            seen.append(await send(edge, "wrong-a", 3))  # already judged: from memory
            seen.append(await send(edge, rotated.output.strip(), 4))  # the right one, but the budget is spent
            await asyncio.sleep(1.2)
            seen.append(await send(edge, "wrong-d", 5))
            seen.append(await send(edge, rotated.output.strip(), 6))
            return seen

    seen = asyncio.run(scenario())
    assert seen == [
        "bad_credentials",
        "bad_credentials",
        "rate_limited",
        "bad_credentials",
        "rate_limited",
        "bad_credentials",
        "accepted",
    ]
    assert checked == ["wrong-a", "wrong-b", "wrong-d", rotated.output.strip()]
