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
    original = credentials._bcrypt_check

    def counted(password: str, stored_hash: str) -> bool:
        with lock:
            checked.append(password)
        return original(password, stored_hash)

    monkeypatch.setattr(credentials, "_bcrypt_check", counted)
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
