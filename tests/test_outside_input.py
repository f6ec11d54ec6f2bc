"""Input crafted from outside to make the hub misbehave: a reply address inside the hub's own topics, JSON
nested thousands of levels deep, and texts that forge lines in the operator's tables.

Each case goes through the real Mosquitto clients and checks the documented code, the audit record, that
nothing was stored, and that the hub keeps serving others afterwards.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import INITIAL_PASSWORD, RunningHub
from helpers import Site, at, last_seq, quarantined, reading, records, running_hub, warm_up


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with running_hub(tmp_path_factory.mktemp("outside"), auth={"registration_mode": "open"}) as hub:
        site = Site.on(hub)
        warm_up(site)
        yield site


def wait_for(hub: RunningHub, event: str, since: int, timeout_s: float = 10) -> dict[str, Any]:
    """The first audit record of ``event`` after ``since``, once it is there (a request without an answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = records(hub, event, since)
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {event} record"
        time.sleep(0.05)


@contextmanager
def watching(hub: RunningHub, topic: str) -> Iterator[list[str]]:
    """What is published on ``topic`` while the block runs: a persistent session subscribes and leaves before
    the block, the broker keeps what arrives for it, and the session comes back after the block to take it."""
    mqtt = ["-h", "127.0.0.1", "-p", str(hub.broker.port), "-V", "mqttv5", "-q", "1"]
    session = ["-c", "-i", f"test-watch-{time.monotonic_ns()}", "-t", topic]
    subprocess.run(["mosquitto_sub", *mqtt, *session, "-x", "60", "-E"], check=True, timeout=10)
    seen: list[str] = []
    yield seen
    out = subprocess.run(
        ["mosquitto_sub", *mqtt, *session, "-x", "0", "-W", "1", "-v"], capture_output=True, text=True, check=False
    )
    seen += out.stdout.splitlines()


def publish(hub: RunningHub, topic: str, body: dict[str, Any], response_topic: str | None = None) -> None:
    """``mosquitto_pub`` at QoS 1: MQTT v5 with a response topic, else MQTT 3.1.1."""
    mqtt = ["-h", "127.0.0.1", "-p", str(hub.broker.port), "-q", "1", "-t", topic, "-m", json.dumps(body)]
    if response_topic is None:
        mqtt += ["-V", "mqttv311"]
    else:
        mqtt += ["-V", "mqttv5", "-D", "publish", "response-topic", response_topic]
        mqtt += ["-D", "publish", "correlation-data", "c-1"]
    subprocess.run(["mosquitto_pub", *mqtt], check=True, timeout=10)


# -- 1. a reply address the hub must not publish on --------------------------------------------------------------

FORBIDDEN = [
    pytest.param("v5", "hub/v1/time/set/edge-1", id="v5-inside-the-prefix"),
    pytest.param("v5", "hub/v1", id="v5-the-prefix-itself"),
    pytest.param("v5", "$SYS/answers", id="v5-dollar"),
    pytest.param("v311", "hub/v1/time/set/edge-1", id="v311-inside-the-prefix"),
    pytest.param("v311", "$answers/x", id="v311-dollar"),
    pytest.param("v311", "answers/#", id="v311-wildcard"),
    pytest.param("v311", "answers/+/x", id="v311-single-level-wildcard"),
]


@pytest.mark.parametrize(("version", "address"), FORBIDDEN)
def test_a_forbidden_reply_address_is_refused_on_every_topic(
    shared: Site, problems: list[str], version: str, address: str
) -> None:
    site, hub, start = shared, shared.hub, shared.window()
    watched = address.replace("#", "x").replace("+", "x") if version == "v311" else address

    def send(topic: str, body: dict[str, Any]) -> None:
        if version == "v5":
            publish(hub, topic, body, response_topic=address)
        else:
            publish(hub, topic, body | {"reply_to": address, "request_id": "r-1"})

    with watching(hub, watched) as seen:
        since = last_seq(hub)
        send(f"{hub.prefix}/data", {"source_id": "edge-loop", "readings": [reading("PV-1", site.pv1, at(start))]})
        kept = wait_for(hub, "data.quarantined", since)
        assert kept["outcome"] == "bad_request" and "reply" in kept["reason"], kept
        # Kept under the source the body names once it was read; a reply_to that is no topic at all stops the
        # reading of the body itself.
        read = version == "v5" or address.startswith(hub.prefix)
        assert kept["source_id"] == ("edge-loop" if read else "unknown"), kept
        assert quarantined(hub)[str(kept["quarantine_id"])]["code"] == "bad_request"
        assert records(hub, "data.stored", since) == []

        since = last_seq(hub)
        send(f"{hub.prefix}/query", {"client_id": "market-1", "password": site.market, "start": at(start)})
        refused = wait_for(hub, "request.refused", since)
        assert refused["outcome"] == "bad_request" and "reply" in refused["reason"], refused
        assert records(hub, "query", since) == []  # not asked

        since = last_seq(hub)
        send(f"{hub.prefix}/register", {"der_id": "PV-LOOP", "password": INITIAL_PASSWORD, "type": "pv"})
        refused = wait_for(hub, "request.refused", since)
        assert refused["outcome"] == "bad_request" and "reply" in refused["reason"], refused
        assert records(hub, "register", since) == [] and records(hub, "password", since) == []

        since = last_seq(hub)
        send(f"{hub.prefix}/time", {})
        refused = wait_for(hub, "request.refused", since)
        assert (refused["outcome"], refused["topic"]) == ("bad_request", f"{hub.prefix}/time"), refused
        assert records(hub, "answer.sent", since) == [] and records(hub, "time", since) == []

        assert site.stored(start) == []
        assert hub.cli("der", "show", "PV-LOOP").exit_code != 0  # registration created nothing
        site.keeps_serving(start)
    assert seen == []
    assert problems == []


def test_a_good_reply_address_beside_the_prefix_is_answered(shared: Site) -> None:
    """Only the prefix's own level counts: ``hub/v1x/...`` and ``answers/hub/v1`` are anyone's topics."""
    site, start = shared, shared.window()
    body = {"source_id": "edge-near", "readings": [reading("PV-1", site.pv1, at(start))]}
    for address in ("hub/v1x/answers", "answers/hub/v1"):
        mqtt = ["-h", "127.0.0.1", "-p", str(site.hub.broker.port), "-q", "1", "-W", "10"]
        out = subprocess.run(
            ["mosquitto_rr", *mqtt, "-t", "hub/v1/data", "-e", address, "-m", json.dumps(body)],
            capture_output=True,
            timeout=15,
            check=True,
        )
        assert json.loads(out.stdout)["ok"] is True


# -- 2. JSON nested thousands of levels deep ---------------------------------------------------------------------


def nested(depth: int, inner: Any = 1) -> dict[str, Any]:
    value: Any = inner
    for _ in range(depth):
        value = {"a": value}
    return dict(value)


@pytest.mark.parametrize("depth", [300, 1000, 5000])
def test_deeply_nested_requests_are_refused_not_internal(shared: Site, problems: list[str], depth: int) -> None:
    site, hub, start = shared, shared.hub, shared.window()
    since = last_seq(hub)
    deep = nested(depth)
    query = {"client_id": "market-1", "password": site.market, "start": at(start), "end": at(start + 60)}
    payload = json.dumps(query | deep) if depth < 900 else _dumps_deep(query | {"a": "DEEP"}, depth)
    answer = hub.rr(f"{hub.prefix}/query", payload)
    assert answer["ok"] is False and answer["error"]["code"] in ("bad_request", "decode_error"), answer
    (received,) = records(hub, "query.received", since)
    assert received["outcome"] in ("ok", "bad_request", "decode_error")

    register = {"der_id": "PV-DEEP", "password": INITIAL_PASSWORD, "type": "pv"}
    payload = _dumps_deep(register | {"location": "DEEP"}, depth)
    answer = hub.rr(f"{hub.prefix}/register", payload)
    assert answer["ok"] is False and answer["error"]["code"] in ("bad_request", "decode_error"), answer
    assert records(hub, "password.issued", since) == []

    answer = hub.rr(f"{hub.prefix}/time", _dumps_deep({"a": "DEEP"}, depth))
    assert answer["ok"] is True or answer["error"]["code"] in ("bad_request", "decode_error"), answer

    assert records(hub, "request.failed", since) == []
    assert all(r["outcome"] != "internal" for r in records(hub, None, since))
    assert problems == []
    site.keeps_serving(start)


def _dumps_deep(body: dict[str, Any], depth: int) -> str:
    """``body`` as JSON with the string "DEEP" replaced by an object nested ``depth`` levels (json.dumps
    itself cannot write one that deep)."""
    return json.dumps(body).replace('"DEEP"', '{"a":' * depth + "1" + "}" * depth)


# -- 3. texts from outside that forge lines ----------------------------------------------------------------------

SCRIPT_ID = "<script>alert(1)</script>../" * 19  # 524 characters, not an id


@pytest.mark.parametrize(
    ("details", "field"),
    [
        pytest.param({"location": {"area": "feeder-1\nPV-FAKE\tpv\tregistered\tfeeder-9"}}, "area", id="area-newline"),
        pytest.param({"name": "Roof\rPV"}, "name", id="name-carriage-return"),
        pytest.param({"maker": "Acme\x1b[2J"}, "maker", id="maker-escape"),
        pytest.param({"model": "X5\x00"}, "model", id="model-nul"),
        pytest.param({"name": "n" * 201}, "name", id="name-too-long"),
    ],
)
def test_registration_texts_with_control_characters_are_refused(
    shared: Site, details: dict[str, Any], field: str
) -> None:
    site, hub, start = shared, shared.hub, shared.window()
    since = last_seq(hub)
    body = {"der_id": "PV-FORGE", "password": INITIAL_PASSWORD, "type": "pv", **details}
    answer = hub.rr(f"{hub.prefix}/register", body)
    assert answer["ok"] is False and answer["error"]["code"] == "bad_request", answer
    assert field in answer["error"]["message"]
    (failed,) = records(hub, "register.failed", since)
    assert failed["outcome"] == "bad_request" and field in failed["reason"]
    assert records(hub, "password.issued", since) == []
    listed = hub.cli("der", "list")
    assert listed.exit_code == 0 and "PV-FORGE" not in listed.output and "PV-FAKE" not in listed.output
    site.keeps_serving(start)


def test_a_source_id_user_property_that_breaks_the_id_rule_is_refused(shared: Site) -> None:
    site, hub, start = shared, shared.hub, shared.window()
    since = last_seq(hub)
    mqtt = ["-h", "127.0.0.1", "-p", str(hub.broker.port), "-q", "1", "-W", "10", "-t", f"{hub.prefix}/data"]
    body = {"readings": [reading("PV-1", site.pv1, at(start))]}
    out = subprocess.run(
        [
            "mosquitto_rr",
            *mqtt,
            "-e",
            f"test/answers/{time.monotonic_ns()}",
            "-D",
            "publish",
            "user-property",
            "source_id",
            SCRIPT_ID,
            "-m",
            json.dumps(body),
        ],
        capture_output=True,
        timeout=15,
        check=True,
    )
    answer = json.loads(out.stdout)
    assert answer["ok"] is False and answer["error"]["code"] == "bad_request", answer
    assert "source_id" in answer["error"]["message"]
    (kept,) = records(hub, "data.quarantined", since)
    assert kept["outcome"] == "bad_request" and SCRIPT_ID not in json.dumps(records(hub, None, since))
    assert site.stored(start) == []
    site.keeps_serving(start)


def test_the_operators_tables_show_control_characters_visibly(shared: Site) -> None:
    """Data from before these checks (or written to the state file by other means) cannot forge rows either."""
    hub = shared.hub
    with sqlite3.connect(hub.config.registry_path) as db:
        db.execute(
            "INSERT INTO ders (der_id, type, area, status, added_at) VALUES (?, 'pv', ?, 'allowed', 0)",
            ("PV-OLD", "feeder-1\nPV-FAKE\tpv\tregistered\tfeeder-9"),
        )
    listed = hub.cli("der", "list")
    assert listed.exit_code == 0
    (line,) = [line for line in listed.output.splitlines() if "PV-OLD" in line]
    assert "\\n" in line and not any(row.startswith("PV-FAKE") for row in listed.output.splitlines())


def test_cli_der_add_and_import_refuse_control_characters(shared: Site, tmp_path: Path) -> None:
    hub = shared.hub
    added = hub.cli("der", "add", "PV-CLI", "--area", "feeder\n2")
    assert added.exit_code != 0 and "area" in added.output
    table = tmp_path / "ders.csv"
    table.write_text('der_id,name\nPV-CSV,"two\nlines"\n', encoding="utf-8")
    imported = hub.cli("der", "import", str(table))
    assert imported.exit_code != 0 and "name" in imported.output
    listed = hub.cli("der", "list").output
    assert "PV-CLI" not in listed and "PV-CSV" not in listed
