"""A registration counts only once the broker has taken its answer (the new password): against a real Mosquitto
whose access rules refuse the hub's publish on one reply topic (MQTT v5 PUBACK 0x87)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import INITIAL_PASSWORD, RunningHub, write_config
from helpers import records, rr_on, running_hub

from hubd.broker import EmbeddedBroker, free_port, load_template

# Anonymous clients (the hub and the test's own) may use hub/v1/# and answers/#; on refused/# they may only
# subscribe: the hub's answer published there is refused by the broker.
_RULES = "topic readwrite hub/v1/#\ntopic readwrite answers/#\ntopic read refused/#\n"


@pytest.fixture
def strict_hub(tmp_path: Path) -> Iterator[RunningHub]:
    acl = tmp_path / "acl"
    acl.write_text(_RULES, encoding="utf-8")
    template = tmp_path / "acl.conf.in"
    template.write_text(load_template() + f"\nacl_file {acl}\n", encoding="utf-8")
    with running_hub(tmp_path, template=template) as hub:
        yield hub


def _register_on(hub: RunningHub, der_id: str, answer_topic: str) -> None:
    """Send a registration whose answer goes to ``answer_topic``, without waiting for the answer."""
    body = {"der_id": der_id, "password": INITIAL_PASSWORD, "type": "pv"}
    mqtt = ["-h", "127.0.0.1", "-p", str(hub.broker.port), "-V", "mqttv5", "-q", "1"]
    properties = ["-D", "publish", "response-topic", answer_topic]
    subprocess.run(
        ["mosquitto_pub", *mqtt, "-t", "hub/v1/register", "-m", json.dumps(body), *properties], check=True, timeout=10
    )


def _wait_for(hub: RunningHub, event: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = records(hub, event)
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {event} record")


def test_an_answer_the_broker_refuses_undoes_the_registration(strict_hub: RunningHub) -> None:
    hub = strict_hub
    assert hub.cli("der", "add", "PV-9", "--type", "pv").exit_code == 0
    _register_on(hub, "PV-9", "refused/PV-9")
    undone = _wait_for(hub, "register.undone")
    assert undone[0]["der_id"] == "PV-9"
    assert undone[0]["outcome"] == "undelivered"
    assert undone[0]["topic"] == "refused/PV-9"
    assert "0x87 (not authorized)" in undone[0]["reason"]
    sent = records(hub, "answer.sent")
    assert [(r["outcome"], r["topic"]) for r in sent] == [("refused", "hub/v1/register")]
    assert "0x87" in sent[0]["reason"]
    assert "password" not in json.dumps(sent + undone).replace("new password", "")
    shown = hub.cli("der", "show", "PV-9")
    assert shown.exit_code == 0 and "allowed" in shown.output, shown.output

    # The DER may claim again, and this time its answer arrives: the registration counts.
    answer = rr_on(hub, "hub/v1/register", {"der_id": "PV-9", "password": INITIAL_PASSWORD}, "answers/PV-9")
    assert answer["ok"] and answer["der_id"] == "PV-9", answer
    assert [r["outcome"] for r in records(hub, "answer.sent")] == ["refused", "ok"]
    assert "registered" in hub.cli("der", "show", "PV-9").output


def test_in_open_mode_an_undelivered_registration_leaves_no_der_behind(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text(_RULES, encoding="utf-8")
    template = tmp_path / "acl.conf.in"
    template.write_text(load_template() + f"\nacl_file {acl}\n", encoding="utf-8")
    broker = EmbeddedBroker(tmp_path / "broker-data", port=free_port(), template=template)
    broker.start_sync()
    try:
        hub = RunningHub(
            write_config(tmp_path / "hubd.yaml", broker, auth={"registration_mode": "open"}),
            broker,
        )
        hub.start()
        try:
            _register_on(hub, "PV-10", "refused/PV-10")
            assert _wait_for(hub, "register.undone")[0]["outcome"] == "undelivered"
            assert "PV-10" not in hub.cli("der", "list").output
        finally:
            hub.stop()
    finally:
        broker.stop_sync()
