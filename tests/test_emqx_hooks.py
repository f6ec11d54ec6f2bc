"""broker.access_control emqx: hubd answers EMQX 5's HTTP authenticator and HTTP authorizer from its registry, on
its HTTP listener, with the principals and rules the dynamic-security plugin gets (docs/operations.md, "Access at
the broker"). EMQX itself does not run here: its requests are made as it makes them (POST, JSON bodies from the
templates the docs give, the shared secret as a bearer token), against a running hub."""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import INITIAL_PASSWORD, RunningHub, write_config
from helpers import T0, reading

from hubd.broker import EmbeddedBroker

HUBD_PASSWORD = "hubd-broker-secret-2"
SECRET = "emqx-shared-secret-0123456789"


@pytest.fixture
def hub(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[RunningHub]:
    for name, value in (("hubd", HUBD_PASSWORD), ("claim", INITIAL_PASSWORD), ("emqx", SECRET)):
        (tmp_path / f"{name}.secret").write_text(value + "\n", encoding="utf-8")
    path = write_config(tmp_path / "hubd.yaml", broker)
    settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    settings["broker"].update(
        {
            "access_control": "emqx",
            "username": "hubd",
            "password_file": str(tmp_path / "hubd.secret"),
            "claim_password_file": str(tmp_path / "claim.secret"),
            "emqx_secret_file": str(tmp_path / "emqx.secret"),
        }
    )
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    running = RunningHub(path, broker)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def ask(hub: RunningHub, hook: str, body: dict[str, Any], secret: str | None = SECRET) -> tuple[int, Any]:
    assert hub._hub is not None and hub._hub.ops.url is not None
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    request = urllib.request.Request(
        hub._hub.ops.url + f"emqx/{hook}", data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def authn(hub: RunningHub, username: str, password: str, clientid: str | None = None, **extra: Any) -> str:
    body = {"username": username, "password": password, "clientid": clientid or username, "peerhost": "10.0.0.9"}
    status, answer = ask(hub, "authn", body | extra)
    assert status == 200, answer
    assert answer == {"result": "deny"} or answer == {"result": "allow", "is_superuser": False}, answer
    return str(answer["result"])


def authz(hub: RunningHub, username: str, action: str, topic: str, clientid: str | None = None) -> str:
    body = {"username": username, "clientid": clientid or username, "action": action, "topic": topic}
    status, answer = ask(hub, "authz", body)
    assert status == 200 and set(answer) == {"result"}, answer
    return str(answer["result"])


def test_connects_are_allowed_to_the_registrys_principals_only(hub: RunningHub) -> None:
    pv1 = hub.register("PV-1")
    pv2 = hub.register("PV-2")
    consumer = hub.consumer("market-1")
    hubd_id = hub.config.broker.client_id
    assert authn(hub, "PV-1", pv1) == "allow"
    assert authn(hub, "PV-1", pv1 + "x") == "deny"
    assert authn(hub, "PV-1", pv2) == "deny"  # another DER's password
    assert authn(hub, "PV-1", pv1, clientid=hubd_id) == "deny"  # bound to its own client id
    assert authn(hub, "market-1", consumer) == "allow"
    assert authn(hub, "hubd", HUBD_PASSWORD, clientid=hubd_id) == "allow"
    assert authn(hub, "hubd", HUBD_PASSWORD, clientid="hubd-other") == "deny"
    assert authn(hub, "hubd", "guess", clientid=hubd_id) == "deny"
    assert authn(hub, "claim", INITIAL_PASSWORD) == "allow"
    assert authn(hub, "claim", INITIAL_PASSWORD, clientid="claim-2") == "deny"
    assert authn(hub, "nobody", pv1) == "deny"
    assert hub.cli("der", "add", "PV-3", "--type", "pv").exit_code == 0
    assert authn(hub, "PV-3", INITIAL_PASSWORD) == "deny"  # allowed, not registered: no broker client yet
    assert hub.cli("der", "revoke", "PV-1").exit_code == 0
    assert authn(hub, "PV-1", pv1) == "deny"  # the registry's change counts at once
    assert hub.cli("system", "revoke", "market-1").exit_code == 0
    assert authn(hub, "market-1", consumer) == "deny"


def test_without_the_shared_secret_the_hooks_answer_nothing(hub: RunningHub) -> None:
    pv1 = hub.register("PV-1")
    body = {"username": "PV-1", "password": pv1, "clientid": "PV-1"}
    for secret in (None, "wrong-secret", SECRET + "x"):
        assert ask(hub, "authn", body, secret) == (401, {"result": "deny"})
        assert ask(hub, "authz", body | {"action": "publish", "topic": "hub/v1/data"}, secret) == (
            401,
            {"result": "deny"},
        )
    status, answer = ask(hub, "authn", {"username": "PV-1", "password": 7, "clientid": "PV-1"})
    assert (status, answer) == (200, {"result": "deny"})


def test_publish_and_subscribe_follow_the_same_rules_as_the_plugins(hub: RunningHub) -> None:
    hub.register("PV-1")
    hub.register("PV-2")
    hub.consumer("market-1")
    nonce = secrets.token_urlsafe(16)
    expected = {
        ("PV-1", "publish", "hub/v1/data"): "allow",
        ("PV-1", "publish", "hub/v1/data/hub.v1"): "allow",
        ("PV-1", "publish", "hub/v1/der/PV-1/data"): "allow",
        ("PV-1", "publish", "hub/v1/der/PV-2/data"): "deny",  # another DER's own topic
        ("PV-1", "publish", "hub/v1/query"): "deny",
        ("PV-1", "publish", "hub/v1/time/set/edge-1"): "deny",
        ("PV-1", "subscribe", "reply/PV-1/data"): "allow",
        ("PV-1", "subscribe", "reply/PV-1/#"): "allow",
        ("PV-1", "subscribe", "reply/PV-2/#"): "deny",
        ("PV-1", "subscribe", "reply/#"): "deny",
        ("PV-1", "subscribe", "hub/v1/data"): "deny",
        ("PV-1", "subscribe", "#"): "deny",
        ("PV-1", "subscribe", "hub/v1/time/check/PV-1"): "allow",
        ("PV-1", "subscribe", "hub/v1/time/check/+"): "deny",
        ("claim", "publish", "hub/v1/register"): "allow",
        ("claim", "publish", "hub/v1/data"): "deny",
        ("claim", "subscribe", f"reply/claim/{nonce}"): "allow",
        ("claim", "subscribe", "reply/claim/+"): "deny",  # would read every claimant's new password
        ("claim", "subscribe", "reply/claim/#"): "deny",
        ("claim", "subscribe", "reply/#"): "deny",
        ("market-1", "publish", "hub/v1/query"): "allow",
        ("market-1", "publish", "hub/v1/data"): "deny",
        ("market-1", "subscribe", "reply/market-1/q1"): "allow",
        ("market-1", "subscribe", "reply/PV-1/#"): "deny",
        ("hubd", "subscribe", "hub/v1/#"): "allow",
        ("hubd", "subscribe", "$share/hubd/hub/v1/#"): "allow",
        ("hubd", "publish", "reply/PV-1/data"): "allow",
        ("nobody", "publish", "hub/v1/data"): "deny",
        ("PV-1", "retain", "hub/v1/data"): "deny",  # an action hubd does not know
    }
    hubd_id = hub.config.broker.client_id
    found = {
        (user, action, topic): authz(hub, user, action, topic, hubd_id if user == "hubd" else None)
        for user, action, topic in expected
    }
    assert found == expected
    assert authz(hub, "PV-1", "publish", "hub/v1/data", clientid="PV-2") == "deny"  # not its client id


def test_a_ders_own_topic_is_proof_of_sender_under_emqx(hub: RunningHub) -> None:
    """The broker checks the rules above, so hubd listens on the DERs' own topics and takes no password there."""
    password = hub.register("PV-1")
    body = {"readings": [{k: v for k, v in reading("PV-1", password, T0).items() if k != "password"}]}
    assert hub.rr("hub/v1/der/PV-1/data", body)["accepted"] == 1


def test_no_der_takes_the_broker_name_of_another_principal_under_emqx(hub: RunningHub) -> None:
    """A DER registered as ``claim`` or as a system's name would take that principal's place in the answers."""
    consumer = hub.consumer("market-1")
    for name in ("hubd", "claim", "market-1"):
        assert hub.cli("der", "add", name).exit_code == 0
        answer = hub.rr("hub/v1/register", {"der_id": name, "password": INITIAL_PASSWORD})
        assert answer["error"]["code"] == "not_allowed", (name, answer)
    assert authn(hub, "market-1", consumer) == "allow"
    hub.register("PV-1")
    refused = hub.cli("system", "add", "PV-1", "--role", "consumer")
    assert refused.exit_code != 0 and "another principal" in refused.output
