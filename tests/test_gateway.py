"""A gateway system bound to DERs writes their readings with its own password (docs/protocol.md, Authentication).

Driven as an operator and a gateway would: ``hubd system add/bind/unbind`` and ``mosquitto_rr`` on the data
topic; read back as the market system does.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import RunningHub
from helpers import T0, Site, at, last_seq, outcomes, quarantined, records

from hubd.decode.native import _decode_fast, decode_native, decode_native_slow
from hubd.decode.registry import Limits
from hubd.model import parse_time


@pytest.fixture
def site(hub: RunningHub) -> Site:
    return Site.on(hub)


def gateway(hub: RunningHub, name: str = "gw-1", *der_ids: str) -> str:
    """Create a gateway system, bind it to ``der_ids``; its password."""
    made = hub.cli("system", "add", name, "--role", "gateway")
    assert made.exit_code == 0, made.output
    if der_ids:
        bound = hub.cli("system", "bind", name, *der_ids)
        assert bound.exit_code == 0, bound.output
    return made.output.strip()


def message(name: str, password: str, *readings: dict[str, Any]) -> dict[str, Any]:
    return {"source_id": "gw-site-3", "gateway": {"name": name, "password": password}, "readings": list(readings)}


def reading(der_id: str, seconds: int, power_kw: float) -> dict[str, Any]:
    return {"der_id": der_id, "measured_at": at(seconds), "power_kw": power_kw}


def stored(site: Site) -> list[tuple[str, float]]:
    rows = site.query(start=T0, end=at(86_400), der_ids=["PV-1", "PV-2", "PV-3"], limit=1000)["rows"]
    return [(row["der_id"], row["power_kw"]) for row in rows]


def test_a_gateway_writes_the_ders_bound_to_it_and_no_others(hub: RunningHub, site: Site) -> None:
    assert hub.cli("der", "add", "PV-3").exit_code == 0  # allowlisted, never registered: no password of its own
    password = gateway(hub, "gw-1", "PV-1", "PV-3")
    since = last_seq(hub)
    sent = [reading("PV-1", 60, 1.5), reading("PV-2", 60, 2.5), reading("PV-3", 60, 3.5), reading("NOPE-2", 60, 1)]
    answer = site.send(message("gw-1", password, *sent))
    assert answer["accepted"] == 2
    assert [(r["index"], r["error"]["code"]) for r in answer["rejected"]] == [(1, "not_allowed"), (3, "unknown_der")]
    assert "gateway gw-1 is not bound to DER PV-2" in answer["rejected"][0]["error"]["message"]
    assert stored(site) == [("PV-1", 1.5), ("PV-3", 3.5)]
    (failed,) = records(hub, "auth.failed", since)  # one record for the message's refusals
    assert (failed["outcome"], failed["codes"]) == ("mixed", {"not_allowed": 1, "unknown_der": 1})
    assert [(r["index"], r["der_id"]) for r in failed["refusals"]] == [(1, "PV-2"), (3, "NOPE-2")]
    (kept,) = records(hub, "data.stored", since)
    assert kept["source_id"] == "gw-site-3" and kept["readings"] == 2
    assert "\tgateway\tactive\t2 DERs" in hub.cli("system", "list").output


def test_a_gateway_is_checked_after_a_restart_and_unbinding_counts_at_once(hub: RunningHub, site: Site) -> None:
    password = gateway(hub, "gw-1", "PV-1")
    hub.restart()  # nothing verified in memory: the first message waits for bcrypt
    assert site.send(message("gw-1", password, reading("PV-1", 120, 1.0)))["accepted"] == 1
    unbound = hub.cli("system", "unbind", "gw-1", "PV-1")
    assert unbound.exit_code == 0 and "1 DER unbound" in unbound.output
    answer = site.send(message("gw-1", password, reading("PV-1", 180, 9.0)))
    assert answer["accepted"] == 0 and answer["rejected"][0]["error"]["code"] == "not_allowed"
    assert stored(site) == [("PV-1", 1.0)]
    assert [r["event"] for r in records(hub, "system.")][-2:] == ["system.bound", "system.unbound"]


@pytest.mark.parametrize(
    ("who", "code"),
    [
        ("wrong password", "bad_credentials"),
        ("unknown", "bad_credentials"),
        ("revoked", "bad_credentials"),
        ("a consumer", "not_allowed"),
    ],
)
def test_a_gateway_that_cannot_prove_itself_writes_nothing(hub: RunningHub, site: Site, who: str, code: str) -> None:
    password = gateway(hub, "gw-1", "PV-1")
    name = "gw-1"
    if who == "wrong password":
        password += "x"
    elif who == "unknown":
        name = "gw-9"
    elif who == "revoked":
        assert hub.cli("system", "revoke", "gw-1").exit_code == 0
    else:
        name, password = "market-1", site.market
    since = last_seq(hub)
    answer = site.send(message(name, password, reading("PV-1", 240, 1.0), {"der_id": "PV-1"}))
    assert answer["ok"] and answer["accepted"] == 0
    # The malformed reading keeps its own refusal; the good one gets the gateway's.
    assert [(r["index"], r["error"]["code"]) for r in answer["rejected"]] == [(0, code), (1, "bad_request")]
    assert outcomes(hub, "auth.failed", since) == [code]
    assert stored(site) == []
    assert (
        site.send({"readings": [{"der_id": "PV-1", "password": site.pv1, "measured_at": at(300), "power_kw": 4}]})[
            "accepted"
        ]
        == 1
    )  # the DER's own password still works


@pytest.mark.parametrize(
    "stated",
    [
        {"name": "gw-1"},
        {"name": "gw 1", "password": "x"},
        {"name": "gw-1", "password": ""},
        "gw-1",
        {"name": "gw-1", "password": "p", "x": 1},
    ],
)
def test_a_malformed_gateway_is_a_decode_error_and_kept(hub: RunningHub, site: Site, stated: Any) -> None:
    gateway(hub, "gw-1", "PV-1")
    body = {"gateway": stated, "readings": [reading("PV-1", 360, 1.0)]}
    answer = site.send(body)
    assert answer["ok"] is False and answer["error"]["code"] == "decode_error"
    assert "gateway" in answer["error"]["message"]
    assert [entry["code"] for entry in quarantined(hub).values()] == ["decode_error"]
    site.keeps_serving(site.window())


def test_the_binding_commands_refuse_what_cannot_be_bound(hub: RunningHub, site: Site) -> None:
    gateway(hub, "gw-1")
    for args, said in [
        (("market-1", "PV-1"), "'market-1' is not a gateway system"),
        (("gw-9", "PV-1"), "'gw-9' is not a gateway system"),
        (("gw-1", "PV-1", "NOPE-1"), "unknown DER NOPE-1"),
    ]:
        result = hub.cli("system", "bind", *args)
        assert result.exit_code == 1 and said in result.output and "Traceback" not in result.output
    assert "\t0 DERs" in hub.cli("system", "list").output  # the refused command bound nothing, not even PV-1


def test_both_decoding_paths_agree_on_a_gateways_message() -> None:
    limits = Limits(parse_time(at(86_400)), 300_000, 10_000)
    body = message("gw-1", "secret", reading("PV-1", 60, 1.5), {**reading("PV-2", 60, 2.0), "password": "ignored"})
    payload = json.dumps(body).encode()
    fast, slow = _decode_fast(payload, limits), decode_native_slow(payload, limits)
    assert fast is not None  # the fast path takes a gateway's message too
    assert fast.gateway == slow.gateway == ("gw-1", "secret")
    assert [(r.der_id, r.values, r.password) for r in fast.items] == [  # type: ignore[union-attr]
        ("PV-1", {"power_kw": 1.5}, None),
        ("PV-2", {"power_kw": 2.0}, None),
    ]
    assert repr(fast.items) == repr(slow.items)
    # Without a gateway, a reading without a password is still refused.
    del body["gateway"]
    (refused, _) = decode_native(json.dumps(body).encode(), limits).items
    assert getattr(refused, "code", None) is not None and "password is missing" in str(refused)
