"""Bad input on the data and query paths (every case of the protocol's error codes).

Each case is driven through the real Mosquitto clients and checked for what a user would notice:
1. the answer carries the error code PROTOCOL.md documents;
2. the audit log records it (event and outcome) by the time the sender has its answer;
3. nothing is lost: an undecodable payload is in quarantine with its exact bytes, and the good readings of a
   message with a bad one are stored and can be queried back by the market system;
4. the daemon keeps serving: a good reading from another DER is accepted afterwards.

The many small cases share one hub (``shared``); each takes its own day of readings and reads only the audit
records written since it began. Cases that need their own configuration start their own hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import INITIAL_PASSWORD, RunningHub
from helpers import (
    DAY_S,
    T0,
    T0_MS,
    Site,
    at,
    last_seq,
    outcomes,
    quarantined,
    quarantined_bytes,
    reading,
    records,
    rr_bytes,
    running_hub,
    stamp,
    warm_up,
)
from loguru import logger

from hubd import decode
from hubd.cli import setup_logging
from hubd.decode.registry import Decoded, Limits
from hubd.model import Reading, now_ms


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    # The cases share one hub and send PV-1 many wrong passwords within a minute, each expecting its own
    # bad_credentials: the data path's budget of checks per DER (tests/test_check_budget.py) is set out of reach.
    with running_hub(tmp_path_factory.mktemp("shared"), auth={"rate_limit": {"der_checks": 10_000}}) as hub:
        site = Site.on(hub)
        assert hub.cli("der", "add", "PV-3").exit_code == 0  # on the allowlist, never registered
        warm_up(site)
        yield site


@pytest.fixture
def site(hub: RunningHub) -> Site:
    return Site.on(hub)


# -- payloads that cannot be decoded at all: answered, quarantined whole, audited ---------------------------

UNDECODABLE = [
    pytest.param("", b"\x00\x01\xfe\xff\x00 not JSON at all\r\n", "decode_error", id="binary-bytes"),
    pytest.param("", b"PV-1,2025-06-01T00:00:00Z,3.2", "decode_error", id="plain-text"),
    pytest.param("", b'{"source_id": "edge-1", "readings": [', "decode_error", id="truncated-json"),
    pytest.param("", b"", "decode_error", id="empty"),
    pytest.param("", '{"readings": []}'.encode("utf-16"), "decode_error", id="utf-16-json"),
    pytest.param("", b'{"readings": [], "note": "\\ud800"}', "decode_error", id="lone-surrogate"),
    pytest.param("", b'{"readings": [{"power_kw": NaN}], "note": "\\udc00"}', "decode_error", id="surrogate-and-nan"),
    pytest.param("", b"[1, 2, 3]", "decode_error", id="json-array"),
    pytest.param("", b'"readings"', "decode_error", id="json-string"),
    pytest.param("", b"null", "decode_error", id="json-null"),
    pytest.param("", b"42", "decode_error", id="json-number"),
    pytest.param("", b'{"source_id": "edge-1"}', "decode_error", id="no-readings"),
    pytest.param("", b'{"readings": {"der_id": "PV-1"}}', "decode_error", id="readings-not-a-list"),
    pytest.param("", b'{"source_id": 7, "readings": []}', "decode_error", id="source-id-wrong-type"),
    pytest.param("/acme.v9", b"PV-1;2025-06-01T00:00:00Z;3.2\n", "unknown_format", id="unknown-format-code"),
]


@pytest.mark.parametrize(("subtopic", "payload", "code"), UNDECODABLE)
def test_undecodable_payload_is_answered_quarantined_and_audited(
    shared: Site, tmp_path: Path, problems: list[str], subtopic: str, payload: bytes, code: str
) -> None:
    hub, start, since = shared.hub, shared.window(), last_seq(shared.hub)
    topic = f"{hub.prefix}/data{subtopic}"
    # mosquitto_rr -m cannot send NUL bytes or nothing at all; mosquitto_pub -f can (and is slower).
    answer = rr_bytes(hub, topic, payload, tmp_path) if b"\x00" in payload or not payload else hub.rr(topic, payload)
    assert answer["ok"] is False
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]

    (record,) = records(hub, "data.quarantined", since)
    assert (record["outcome"], record["topic"], record["size"]) == (code, topic, len(payload))
    entry = quarantined(hub)[str(record["quarantine_id"])]
    assert (entry["topic"], entry["code"]) == (topic, code)
    # Under limits.quarantine_max_bytes, kept whole: nothing received is lost, byte for byte.
    assert quarantined_bytes(hub, entry["id"]) == payload
    assert (record["kept"], record["sha256"]) == (len(payload), hashlib.sha256(payload).hexdigest())

    assert records(hub, "data.stored", since) == []
    shared.keeps_serving(start)
    assert problems == []


def test_a_quarantined_payload_is_kept_whole_but_shown_without_its_passwords(shared: Site) -> None:
    hub, start, since = shared.hub, shared.window(), last_seq(shared.hub)
    good = reading("PV-1", shared.pv1, at(start))
    payload = json.dumps({"source_id": "not an id!", "readings": [good]})  # a bad source id: the whole message
    assert shared.send(payload)["error"]["code"] == "decode_error"
    (record,) = records(hub, "data.quarantined", since)
    assert quarantined_bytes(hub, record["quarantine_id"]) == payload.encode()  # for replay, byte for byte
    shown = hub.cli("quarantine", "show", str(record["quarantine_id"]))
    assert shown.exit_code == 0, shown.output
    assert shared.pv1 not in shown.output
    assert '"password": "***"' in shown.output and '"der_id": "PV-1"' in shown.output
    # The data directory hubd made holds the payload: its own user's only.
    assert hub.config.data_path.stat().st_mode & 0o077 == 0


# -- readings judged one by one: the good ones stored, the bad one refused with its code ----------------------


def _future(seconds: int) -> str:
    return at((now_ms() - T0_MS) // 1000 + seconds)


Make = Callable[[Site, int], Any]  # (site, start of the case's day) -> the bad reading


def _with(**fields: Any) -> Make:
    """A reading of PV-1 an hour into the case's day, with ``fields`` changed (a callable gets the site)."""

    def make(site: Site, start: int) -> dict[str, Any]:
        item = reading("PV-1", site.pv1, at(start + 3600))
        item.update({k: v(site) if callable(v) else v for k, v in fields.items()})
        return {k: v for k, v in item.items() if v is not _DROP}

    return make


_DROP = object()

# (make the bad reading, expected code, the der_id the answer names — when the reading named one validly —,
#  the audit event)
BAD_READINGS = [
    pytest.param(_with(power_kw=math.nan), "bad_request", "PV-1", "data.rejected", id="nan"),
    pytest.param(_with(energy_kwh=math.inf), "bad_request", "PV-1", "data.rejected", id="infinity"),
    pytest.param(_with(voltage_v=-math.inf), "bad_request", "PV-1", "data.rejected", id="minus-infinity"),
    pytest.param(_with(power_kw=10**400), "bad_request", "PV-1", "data.rejected", id="integer-beyond-double"),
    pytest.param(_with(measured_at="2025-06-01T00:01:00"), "bad_request", "PV-1", "data.rejected", id="no-offset"),
    pytest.param(_with(measured_at="2025-06-01 00:01"), "bad_request", "PV-1", "data.rejected", id="no-offset-space"),
    pytest.param(_with(measured_at="yesterday"), "bad_request", "PV-1", "data.rejected", id="time-not-a-time"),
    pytest.param(_with(measured_at=True), "bad_request", "PV-1", "data.rejected", id="time-bool"),
    pytest.param(
        _with(measured_at=lambda s: _future(24 * 3600)), "bad_request", "PV-1", "data.rejected", id="far-future"
    ),
    pytest.param(
        _with(measured_at=lambda s: now_ms() + 3_600_000), "bad_request", "PV-1", "data.rejected", id="future-epoch-ms"
    ),
    pytest.param(_with(measured_at=-(10**15)), "bad_request", "PV-1", "data.rejected", id="time-before-year-1"),
    pytest.param(_with(measured_at=-(10**20)), "bad_request", "PV-1", "data.rejected", id="time-beyond-int64"),
    pytest.param(
        _with(measured_at="0001-01-01T00:00:00+09:00"), "bad_request", "PV-1", "data.rejected", id="time-in-year-0"
    ),
    pytest.param(_with(measured_at=_DROP), "bad_request", "PV-1", "data.rejected", id="missing-measured-at"),
    pytest.param(_with(der_id=_DROP), "bad_request", None, "data.rejected", id="missing-der-id"),
    pytest.param(_with(password=_DROP), "bad_request", "PV-1", "data.rejected", id="missing-password"),
    pytest.param(_with(der_id=17), "bad_request", None, "data.rejected", id="der-id-number"),
    pytest.param(_with(der_id="PV-1\n"), "bad_request", None, "data.rejected", id="der-id-trailing-newline"),
    pytest.param(_with(der_id="PV 1"), "bad_request", None, "data.rejected", id="der-id-space"),
    pytest.param(_with(password=1234), "bad_request", "PV-1", "data.rejected", id="password-number"),
    pytest.param(_with(power_kw="3.2"), "bad_request", "PV-1", "data.rejected", id="power-as-string"),
    pytest.param(_with(power_kw=True), "bad_request", "PV-1", "data.rejected", id="power-as-bool"),
    pytest.param(_with(power_kw=None), "bad_request", "PV-1", "data.rejected", id="no-quantity"),
    pytest.param(_with(power_mw=3.2), "bad_request", "PV-1", "data.rejected", id="unknown-field"),
    pytest.param(_with(power_factor=1.5), "bad_request", "PV-1", "data.rejected", id="power-factor-above-1"),
    pytest.param(_with(soc_pct=100.5), "bad_request", "PV-1", "data.rejected", id="soc-above-100"),
    pytest.param(_with(interval_s=300), "bad_request", "PV-1", "data.rejected", id="interval-without-energy"),
    pytest.param(lambda s, start: "PV-1", "bad_request", None, "data.rejected", id="reading-not-an-object"),
    pytest.param(_with(der_id="PV-404"), "unknown_der", "PV-404", "auth.failed", id="unknown-der"),
    pytest.param(_with(password="Wrong-password-1"), "bad_credentials", "PV-1", "auth.failed", id="wrong-password"),
    pytest.param(_with(password=lambda s: s.pv2), "bad_credentials", "PV-1", "auth.failed", id="another-ders-password"),
    pytest.param(
        _with(password=INITIAL_PASSWORD),
        "bad_credentials",
        "PV-1",
        "auth.failed",
        id="initial-password-as-data-password",
    ),
    pytest.param(
        _with(der_id="PV-3", password=INITIAL_PASSWORD),
        "bad_credentials",
        "PV-3",
        "auth.failed",
        id="allowlisted-but-not-registered",
    ),
]


@pytest.mark.parametrize(("make_bad", "code", "der_id", "event"), BAD_READINGS)
def test_bad_reading_is_refused_and_the_good_ones_stored(
    shared: Site, problems: list[str], make_bad: Make, code: str, der_id: str | None, event: str
) -> None:
    site, start = shared, shared.window()
    since = last_seq(site.hub)
    source = f"edge-{start}"
    good = [reading("PV-1", site.pv1, at(start)), reading("PV-2", site.pv2, at(start))]
    message = {"source_id": source, "readings": [good[0], make_bad(site, start), good[1]]}
    # Python's json writes NaN and Infinity as the bare literals senders put on the wire.
    answer = site.send(json.dumps(message, allow_nan=True))
    assert answer["ok"] is True, answer
    assert answer["accepted"] == 2
    (refused,) = answer["rejected"]
    assert (refused["index"], refused["der_id"], refused["error"]["code"]) == (1, der_id, code)
    assert refused["error"]["message"]

    (record,) = records(site.hub, event, since)
    assert (record["outcome"], record["source_id"], record["readings"], record["codes"]) == (code, source, 1, {code: 1})
    (described,) = record["refusals"]
    assert (described["index"], described["der_id"], described["code"]) == (1, der_id, code)
    assert described["reason"] == refused["error"]["message"]
    (stored_record,) = records(site.hub, "data.stored", since)
    assert (stored_record["source_id"], stored_record["readings"]) == (source, 2)
    assert records(site.hub, "data.quarantined", since) == []  # judged reading by reading, not quarantined

    # The good readings are stored, the bad one is not.
    assert site.stored(start) == [("PV-1", stamp(start)), ("PV-2", stamp(start))]
    site.keeps_serving(start)
    assert problems == []


def test_many_bad_readings_are_answered_one_by_one_and_audited_in_one_record(shared: Site) -> None:
    site, start, since = shared, shared.window(), last_seq(shared.hub)
    bad = [reading("PV-1", f"Wrong-password-{i}", at(start + i)) for i in range(5)]
    answer = site.send({"source_id": "edge-5", "readings": [*bad, reading("PV-2", site.pv2, at(start))]})
    assert answer["accepted"] == 1
    assert [(r["index"], r["error"]["code"]) for r in answer["rejected"]] == [(i, "bad_credentials") for i in range(5)]
    (failed,) = records(site.hub, "auth.failed", since)
    assert (failed["outcome"], failed["readings"], failed["codes"]) == ("bad_credentials", 5, {"bad_credentials": 5})
    assert (failed["der_count"], failed["der_ids"]) == (1, ["PV-1"])
    assert [(r["index"], r["code"], r["der_id"]) for r in failed["refusals"]] == [
        (i, "bad_credentials", "PV-1") for i in range(5)
    ]
    assert site.stored(start) == [("PV-2", stamp(start))]
    site.keeps_serving(start)


def test_message_with_only_bad_readings_is_answered_and_audited(shared: Site) -> None:
    site, start, since = shared, shared.window(), last_seq(shared.hub)
    answer = site.send({"source_id": "edge-none", "readings": [reading("PV-1", "Wrong-password-9", at(start))]})
    assert (answer["accepted"], answer["rejected"][0]["error"]["code"]) == (0, "bad_credentials")
    assert outcomes(site.hub, "auth.failed", since) == ["bad_credentials"]
    (received,) = records(site.hub, "data.received", since)
    assert (received["source_id"], received["outcome"], received["readings"]) == ("edge-none", "rejected", 1)
    assert site.stored(start) == []
    site.keeps_serving(start)


def test_ten_thousand_refused_readings_add_a_bounded_amount_to_the_audit_trail(shared: Site, tmp_path: Path) -> None:
    site, start, since = shared, shared.window(), last_seq(shared.hub)
    hub = site.hub
    unknown = [reading(f"PV-X{i}", "Any-password-1", at(start + i)) for i in range(5_000)]
    # A reason that quotes the sender's text (an unknown field's name) as long as it likes.
    long_names = [reading("PV-1", site.pv1, at(start + i), **{"x" * 300: 1.0}) for i in range(5_000)]
    payload = json.dumps({"source_id": "edge-refused", "readings": unknown + long_names}).encode()
    trail = hub.config.audit_path
    before = trail.stat().st_size
    answer = rr_bytes(hub, f"{hub.prefix}/data", payload, tmp_path)
    grown = trail.stat().st_size - before
    # The sender is told about every reading ...
    assert answer["accepted"] == 0 and len(answer["rejected"]) == 10_000
    assert [r["index"] for r in answer["rejected"]] == list(range(10_000))
    # ... the audit trail of a 2 MB message is one record per kind of refusal and the message's own.
    assert grown < 10_000, f"the audit trail grew {grown} bytes"
    events = [r["event"] for r in records(hub, since=since)]
    # (time.checked: the hub asks each new source for its clock, docs/protocol.md, Time)
    assert [e for e in events if not e.startswith("time.")] == ["auth.failed", "data.rejected", "data.received"]
    (failed,) = records(hub, "auth.failed", since)
    assert (failed["outcome"], failed["readings"], failed["der_count"]) == ("unknown_der", 5_000, 5_000)
    assert failed["der_ids"] == [f"PV-X{i}" for i in range(10)]
    (rejected,) = records(hub, "data.rejected", since)
    assert (rejected["outcome"], rejected["codes"]) == ("bad_request", {"bad_request": 5_000})
    assert [r["index"] for r in rejected["refusals"]] == list(range(5_000, 5_010))
    assert all(len(r["reason"]) <= 200 for r in rejected["refusals"])
    assert site.stored(start) == []
    site.keeps_serving(start)


# -- an MQTT 3.1.1 reply_to that is no topic: the message is refused and kept, nothing answered, the hub stays on -----

BAD_REPLY_TO = [
    pytest.param("answers/\u0000/x", id="nul"),
    pytest.param("answers/\u0001", id="control-character"),
    pytest.param("answers/\u0085", id="c1-control-character"),
    pytest.param("answers/\ufffe", id="non-character"),
    pytest.param("a" * 65_536, id="longer-than-a-topic"),
    pytest.param("answers/#", id="wildcard"),
    pytest.param("", id="empty"),
    pytest.param(["answers"], id="not-a-string"),
]


@pytest.mark.parametrize("reply_to", BAD_REPLY_TO)
def test_reply_to_that_is_no_topic_is_refused_and_does_not_cut_the_hub_off(
    shared: Site, problems: list[str], reply_to: Any
) -> None:
    site, start = shared, shared.window()
    hub = site.hub
    broker_log = hub.broker.log_path.stat().st_size
    since = last_seq(hub)
    body = {"source_id": "edge-311", "reply_to": reply_to, "request_id": "r-1"}
    hub.pub(f"{hub.prefix}/data", json.dumps(body | {"readings": [reading("PV-1", site.pv1, at(start))]}))
    hub.pub(f"{hub.prefix}/query", json.dumps(body | {"client_id": "market-1", "password": site.market, "start": T0}))
    # Fire and forget, as far as the sender can tell: refused bad_request, the data message kept whole.
    deadline = time.monotonic() + 10
    while len(records(hub, "data.quarantined", since) + records(hub, "request.refused", since)) < 2:
        assert time.monotonic() < deadline, "the messages were not refused"
        time.sleep(0.05)
    assert outcomes(hub, "data.quarantined", since) == outcomes(hub, "request.refused", since) == ["bad_request"]
    assert records(hub, "query.", since) == []
    assert site.stored(start) == []
    site.keeps_serving(start)
    with hub.broker.log_path.open("rb") as log:
        log.seek(broker_log)
        assert b"malformed" not in log.read()  # Mosquitto cuts off a client that publishes to such a topic
    assert problems == []


# -- size limits ------------------------------------------------------------------------------------------------


def padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` as JSON padded with trailing whitespace (still valid JSON) to exactly ``size`` bytes."""
    raw = json.dumps(body).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def test_oversized_payload_is_too_large_on_every_topic(hub_factory: Any) -> None:
    limit = 1024
    hub = hub_factory(limits={"max_payload_bytes": limit})
    site = Site.on(hub)
    start = site.window()
    message = {"source_id": "edge-big", "readings": [reading("PV-1", site.pv1, at(start + i)) for i in range(3)]}

    at_limit = padded(message, limit)
    assert site.send(at_limit) == {"ok": True, "accepted": 3, "rejected": []}

    over = padded(message | {"source_id": "edge-over"}, limit + 1)
    answer = site.send(over)
    assert answer["ok"] is False and answer["error"]["code"] == "too_large"
    (record,) = records(hub, "data.quarantined")
    assert (record["outcome"], record["size"]) == ("too_large", limit + 1)
    entry = quarantined(hub)[str(record["quarantine_id"])]
    assert entry["code"] == "too_large"
    assert quarantined_bytes(hub, entry["id"]) == over

    # Requests on the other topics are held to the same limit.
    answer = hub.rr(f"{hub.prefix}/register", padded({"der_id": "PV-2", "password": INITIAL_PASSWORD}, limit + 1))
    assert answer["error"]["code"] == "too_large"
    assert outcomes(hub, "register.failed") == ["too_large"]
    asked = {"client_id": "market-1", "password": site.market, "start": at(start), "end": at(start + DAY_S)}
    answer = hub.rr(f"{hub.prefix}/query", padded(asked, limit + 1))
    assert answer["error"]["code"] == "too_large"
    assert outcomes(hub, "query.received")[-1] == "too_large"

    assert site.stored(start) == [("PV-1", stamp(start + i)) for i in range(3)]
    site.keeps_serving(start)


def test_ten_thousand_readings_in_one_message_are_all_stored_and_answered(shared: Site, tmp_path: Path) -> None:
    site, start, since = shared, shared.window(), last_seq(shared.hub)
    hub = site.hub
    many = [reading("PV-1", site.pv1, at(start + i), power_kw=i / 10) for i in range(10_000)]
    payload = json.dumps({"source_id": "edge-10k", "readings": many}).encode()
    assert rr_bytes(hub, f"{hub.prefix}/data", payload, tmp_path) == {"ok": True, "accepted": 10_000, "rejected": []}
    (record,) = records(hub, "data.stored", since)
    assert (record["source_id"], record["readings"]) == ("edge-10k", 10_000)

    rows = site.query(start=at(start), end=at(start + DAY_S), der_ids=["PV-1"], limit=10_000)
    assert (rows["count"], rows["next_cursor"]) == (10_000, None)
    assert rows["rows"][0] == {"der_id": "PV-1", "measured_at": stamp(start), "power_kw": 0.0}
    assert rows["rows"][-1] == {"der_id": "PV-1", "measured_at": stamp(start + 9_999), "power_kw": 999.9}

    # One more than the default limit: refused whole, kept in quarantine, none of it stored.
    later = shared.window()
    too_many = [reading("PV-1", site.pv1, at(later + i)) for i in range(10_001)]
    payload = json.dumps({"source_id": "edge-10k", "readings": too_many}).encode()
    answer = rr_bytes(hub, f"{hub.prefix}/data", payload, tmp_path)
    assert answer["ok"] is False and answer["error"]["code"] == "too_large"
    (record,) = records(hub, "data.quarantined", since)
    assert record["outcome"] == "too_large"
    # 1.2 MB: kept up to limits.quarantine_max_bytes (64 KiB), with the size and hash of the whole.
    assert quarantined_bytes(hub, record["quarantine_id"]) == payload[: 64 * 1024]
    assert (record["size"], record["kept"]) == (len(payload), 64 * 1024)
    assert record["sha256"] == hashlib.sha256(payload).hexdigest()
    assert quarantined(hub)[str(record["quarantine_id"])]["size"] == f"{len(payload)} B, cut to {64 * 1024}"
    assert site.stored(later) == []
    site.keeps_serving(later)


# -- queries -------------------------------------------------------------------------------------------------------


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


BAD_QUERIES = [
    pytest.param({"start": lambda s: at(s + 3600), "end": lambda s: at(s)}, id="end-before-start"),
    pytest.param({"end": lambda s: at(s)}, id="end-equals-start"),
    pytest.param({"start": "2025-06-01T00:00:00"}, id="start-without-offset"),
    pytest.param({"end": "tomorrow"}, id="end-not-a-time"),
    pytest.param({"end": _DROP}, id="end-missing"),
    pytest.param({"end": 10**20}, id="end-beyond-int64"),
    pytest.param({"start": -(10**15)}, id="start-before-year-1"),
    pytest.param({"fields": ["power_mw"]}, id="unknown-field"),
    pytest.param({"fields": "power_kw"}, id="fields-not-a-list"),
    pytest.param({"colour": "red"}, id="unknown-condition"),
    pytest.param({"old_password": "hunter2-hunter2"}, id="password-like-condition"),
    pytest.param({"cursor": "not a cursor!"}, id="malformed-cursor"),
    pytest.param({"cursor": _cursor({"after": 1})}, id="cursor-wrong-shape"),
    pytest.param({"cursor": _cursor([2**64 - 1, "PV-1"])}, id="cursor-out-of-range"),
    pytest.param({"cursor": 5}, id="cursor-number"),
    pytest.param({"der_ids": [f"PV-{i}" for i in range(1001)]}, id="too-many-der-ids"),
    pytest.param({"der_ids": "PV-1"}, id="der-ids-not-a-list"),
    pytest.param({"limit": 0}, id="limit-zero"),
    pytest.param({"limit": "10"}, id="limit-string"),
    pytest.param({"limit": True}, id="limit-bool"),
]


@pytest.mark.parametrize("conditions", BAD_QUERIES)
def test_bad_query_conditions_are_bad_request(shared: Site, problems: list[str], conditions: dict[str, Any]) -> None:
    site, start, since = shared, shared.window(), last_seq(shared.hub)
    body: dict[str, Any] = {"start": at(start), "end": at(start + DAY_S)}
    body.update({k: v(start) if callable(v) else v for k, v in conditions.items()})
    answer = site.query(**{k: v for k, v in body.items() if v is not _DROP})
    assert answer["ok"] is False, answer
    assert answer["error"]["code"] == "bad_request"
    assert site.market not in json.dumps(answer)
    assert outcomes(site.hub, "query.failed", since) == ["bad_request"]
    (received,) = records(site.hub, "query.received", since)
    assert received["client_id"] == "market-1"
    # The market system goes on querying (the warm-up stored a reading), and the hub on taking data.
    assert site.stored(site.warm) == [("PV-1", stamp(site.warm))]
    site.keeps_serving(start)
    assert problems == []


def test_query_refused_for_wrong_password_unknown_client_and_gateway(shared: Site) -> None:
    site, start, since = shared, shared.window(), last_seq(shared.hub)
    hub = site.hub
    assert site.send({"readings": [reading("PV-1", site.pv1, at(start))]})["accepted"] == 1
    gateway = hub.cli("system", "add", "gw-1", "--role", "gateway")
    assert gateway.exit_code == 0, gateway.output

    day = {"start": at(start), "end": at(start + DAY_S)}
    for client_id, password, code in [
        ("market-1", "Wrong-password-1", "bad_credentials"),
        ("market-1", site.pv1, "bad_credentials"),  # a DER's password is no system's password
        ("market-9", site.market, "bad_credentials"),
        ("gw-1", gateway.output.strip(), "not_allowed"),
    ]:
        answer = site.query(password, client_id=client_id, **day)
        assert answer["ok"] is False and answer["error"]["code"] == code, (client_id, answer)
        assert "rows" not in answer
        auth = records(hub, "query.auth", since)[-1]
        assert (auth["client_id"], auth["outcome"]) == (client_id, code)
        assert outcomes(hub, "query.failed", since)[-1] == code

    for body, code in [
        ({"client_id": "market-1", **day}, "bad_request"),  # no password
        ({"password": site.market, **day}, "bad_request"),  # no client_id
        ({"client_id": 7, "password": site.market, **day}, "bad_request"),
        ({"client_id": "market-1", "password": ["x"], **day}, "bad_request"),
        (b"client_id=market-1", "decode_error"),
        (b'["market-1"]', "decode_error"),
    ]:
        answer = hub.rr(f"{hub.prefix}/query", body if isinstance(body, bytes) else json.dumps(body))
        assert answer["error"]["code"] == code, (body, answer)
        assert outcomes(hub, "query", since)[-1] == code
    assert records(hub, "query.extracted", since) == []

    assert site.stored(start) == [("PV-1", stamp(start))]
    site.keeps_serving(start)


# -- a vendor decoder that fails: the daemon survives, the payload is kept, no secret reaches the log -------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put loguru back as pytest had it after a test that set up hubd's own operational log."""
    try:
        yield
    finally:
        logger.remove()
        logger.add(sys.__stderr__)


@pytest.fixture
def crashing_format() -> Iterator[str]:
    """A vendor format whose decoder has a bug: it fails on a payload with too few fields."""
    code = "test.crashing"

    @decode.registry.register(code)
    def crashing(payload: bytes, limits: Limits) -> Decoded:
        der_id, measured_at, password, power = payload.decode().split(";")  # fails on 3 fields
        return Decoded(None, [Reading(der_id, int(measured_at), {"power_kw": float(power)}, password)])

    try:
        yield code
    finally:
        decode.registry._DECODERS.pop(code)


def test_failing_vendor_decoder_is_decode_error_and_leaks_nothing(
    site: Site, tmp_path: Path, crashing_format: str, restore_logging: None, capfd: pytest.CaptureFixture[str]
) -> None:
    setup_logging("DEBUG")  # hubd's operational log as `hubd run` sets it up: to stderr (here, into capfd)
    hub, start = site.hub, site.window()
    topic = f"{hub.prefix}/data/{crashing_format}"
    good = f"PV-1;{T0_MS + start * 1000};{site.pv1};2.5".encode()
    assert rr_bytes(hub, topic, good, tmp_path) == {"ok": True, "accepted": 1, "rejected": []}

    bad = f"PV-1;{T0_MS + start * 1000 + 60_000};{site.pv1}".encode()
    answer = rr_bytes(hub, topic, bad, tmp_path)
    assert answer["ok"] is False and answer["error"]["code"] == "decode_error"
    assert site.pv1 not in json.dumps(answer)
    (record,) = records(hub, "data.quarantined")
    assert record["outcome"] == "decode_error"
    assert quarantined_bytes(hub, record["quarantine_id"]) == bad
    assert site.stored(start) == [("PV-1", stamp(start))]
    site.keeps_serving(start)

    log = capfd.readouterr().err
    assert f"decoder {crashing_format} failed" in log  # the failure is in the operational log...
    assert site.pv1 not in log  # ...but not the password the payload carried


# -- no secret anywhere ------------------------------------------------------------------------------------------------


def test_no_password_in_audit_quarantine_cli_or_log(hub: RunningHub, capfd: pytest.CaptureFixture[str]) -> None:
    """A session of registrations, rotations, failed logins and queries leaves no password behind.

    Passwords are only ever sent inside well-formed requests here: a payload that cannot be decoded is kept
    whole in quarantine on purpose, passwords and all.
    """
    logged: list[str] = []
    sink = logger.add(logged.append, level="DEBUG", serialize=True)
    try:
        answers: list[dict[str, Any]] = []

        def rr(topic: str, body: dict[str, Any]) -> dict[str, Any]:
            answers.append(hub.rr(f"{hub.prefix}/{topic}", body))
            return answers[-1]

        def send(*readings: dict[str, Any]) -> dict[str, Any]:
            return rr("data", {"source_id": "edge-s", "readings": list(readings)})

        def query(password: str, client_id: str = "market-1") -> dict[str, Any]:
            return rr("query", {"client_id": client_id, "password": password, "start": at(0), "end": at(DAY_S)})

        near_initial = INITIAL_PASSWORD[:-1] + "X"
        site = Site.on(hub)
        pv1, pv2, market = site.pv1, site.pv2, site.market
        gateway = hub.cli("system", "add", "gw-1", "--role", "gateway").output.strip()
        assert hub.cli("der", "add", "PV-3").exit_code == 0

        assert rr("register", {"der_id": "PV-3", "password": near_initial})["error"]["code"] == "bad_credentials"
        assert rr("register", {"der_id": "PV-1", "password": INITIAL_PASSWORD})["error"]["code"] == (
            "already_registered"
        )
        near_pv1 = pv1[:-1] + ("A" if pv1[-1] != "A" else "B")
        answer = send(
            reading("PV-1", pv1, at(0)),
            reading("PV-1", near_pv1, at(60)),
            reading("PV-2", INITIAL_PASSWORD, at(60)),
            reading("PV-404", pv2, at(60)),
        )
        assert (answer["accepted"], len(answer["rejected"])) == (1, 3)

        rotated = hub.cli("der", "rotate", "PV-1")
        assert rotated.exit_code == 0
        pv1_new = rotated.output.strip()
        assert send(reading("PV-1", pv1, at(120)))["rejected"][0]["error"]["code"] == "bad_credentials"
        assert send(reading("PV-1", pv1_new, at(120)))["accepted"] == 1
        assert hub.cli("der", "reset", "PV-2").exit_code == 0
        pv2_new = rr("register", {"der_id": "PV-2", "password": INITIAL_PASSWORD, "type": "ess"})["password"]
        assert send(reading("PV-2", pv2_new, at(180)))["accepted"] == 1

        assert query(market)["count"] == 3
        wrong_market = market[:-1] + ("x" if market[-1] != "x" else "y")  # a random password may end in x
        assert query(wrong_market)["error"]["code"] == "bad_credentials"
        assert query(gateway, client_id="gw-1")["error"]["code"] == "not_allowed"
        assert query(market, client_id="market-2")["error"]["code"] == "bad_credentials"

        config = hub.config
        texts = {
            "der list": hub.cli("der", "list").output,
            "system list": hub.cli("system", "list").output,
            "audit tail": hub.cli("audit", "tail", "-n", "10000").output,
            "audit tail --der": hub.cli("audit", "tail", "--der", "PV-1").output,
            "quarantine list": hub.cli("quarantine", "list").output,
            "query": hub.cli("query", "--start", at(0), "--end", at(DAY_S)).output,
            # Answers carry no secret but the one a registration issues (the very point of registering).
            "answers": json.dumps([{k: v for k, v in a.items() if k != "password"} for a in answers]),
        }
        for der_id in ("PV-1", "PV-2", "PV-3"):
            texts[f"der show {der_id}"] = hub.cli("der", "show", der_id).output
        assert "PV-1" in texts["der list"] and "PV-1" in texts["der show PV-1"]
        assert "password.rotated" in texts["audit tail"] and "auth.failed" in texts["audit tail"]
        assert texts["quarantine list"] == ""
        hub.stop()  # the last log lines and audit records are written on the way out
        texts["audit log"] = config.audit_path.read_text(encoding="utf-8")
    finally:
        logger.remove(sink)
    captured = capfd.readouterr()
    texts["operational log"] = "\n".join(logged)
    texts["stdout and stderr"] = captured.out + captured.err
    assert "hubd stopped" in texts["operational log"], "the log sink saw nothing: the check would prove nothing"

    secrets = {
        "initial password": INITIAL_PASSWORD,
        "near-miss initial password": near_initial,
        "PV-1 password": pv1,
        "PV-1 near-miss password": near_pv1,
        "PV-1 rotated password": pv1_new,
        "PV-2 password": pv2,
        "PV-2 password after reset": pv2_new,
        "market password": market,
        "gateway password": gateway,
    }
    for where, text in texts.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} appears in the {where}"
        assert "$2b$" not in text, f"a password hash appears in the {where}"
