"""Access control at the broker (broker.access_control dynsec), tried as an attacker would: with the real
Mosquitto, its dynamic-security plugin and the Mosquitto command-line clients, on a hub set up the way
docs/operations.md tells (password files, `hubd broker sync`, then the broker, then hubd)."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import INITIAL_PASSWORD, RunningHub, write_config
from helpers import T0, reading, records

from hubd.auth.dynsec import Account, BrokerAcl, find_plugin
from hubd.broker import EmbeddedBroker, free_port
from hubd.mqtt import packets
from hubd.mqtt.session import MqttSession

HUBD_PASSWORD = "hubd-broker-secret-1"
ADMIN_PASSWORD = "admin-broker-secret-1"


@dataclass
class Site:
    hub: RunningHub
    broker: EmbeddedBroker
    config: Path

    def mqtt(
        self, *args: str, user: str | None = None, password: str | None = None, client: str | None = None
    ) -> list[str]:
        found = ["-h", "127.0.0.1", "-p", str(self.broker.port), "-V", "mqttv5"]
        if user is not None:
            found += ["-u", user]
        if password is not None:
            found += ["-P", password]
        if client is not None:
            found += ["-i", client]
        return found + list(args)

    def publish(self, topic: str, message: str, **who: Any) -> int | None:
        """Publish at QoS 1; the PUBACK's reason code, or None when the connection was refused (or no PUBACK)."""
        out = subprocess.run(
            ["mosquitto_pub", *self.mqtt("-q", "1", "-d", "-t", topic, "-m", message, **who)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        found = re.search(r"received PUBACK \(Mid: \d+, RC:(\d+)\)", out.stdout)
        return int(found.group(1)) if found else None

    def connects(self, **who: Any) -> bool:
        return self.publish("nowhere/at/all", "x", **who) is not None

    def subscribe(self, topic: str, **who: Any) -> int | None:
        """Subscribe; the SUBACK's reason code, or None when the connection was refused."""
        out = subprocess.run(
            ["mosquitto_sub", *self.mqtt("-q", "1", "-d", "-t", topic, "-W", "1", **who)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        found = re.search(r"Subscribed \(mid: \d+\): (\d+)", out.stdout)
        return int(found.group(1)) if found else None

    def register(self, der_id: str, nonce: str | None = None) -> dict[str, Any]:
        """First contact as the docs tell: the claim account, and a reply topic whose last level is random."""
        answer_topic = f"reply/claim/{nonce or secrets.token_urlsafe(16)}"
        body = json.dumps({"der_id": der_id, "password": INITIAL_PASSWORD, "type": "pv"})
        who = {"user": "claim", "password": INITIAL_PASSWORD, "client": "claim"}
        out = subprocess.run(
            [
                "mosquitto_rr",
                *self.mqtt("-q", "1", "-t", "hub/v1/register", "-e", answer_topic, "-m", body, "-W", "10", **who),
            ],
            capture_output=True,
            timeout=15,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def send(
        self, der_id: str, password: str, readings: list[dict[str, Any]], topic: str = "hub/v1/data"
    ) -> dict[str, Any]:
        """A DER's data message as its own broker client; the hub's answer."""
        who = {"user": der_id, "password": password, "client": der_id}
        body = json.dumps({"readings": readings})
        out = subprocess.run(
            [
                "mosquitto_rr",
                *self.mqtt("-q", "1", "-t", topic, "-e", f"reply/{der_id}/data", "-m", body, "-W", "10", **who),
            ],
            capture_output=True,
            timeout=15,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))


def _start(tmp_path: Path, port: int) -> tuple[EmbeddedBroker, Path]:
    config = tmp_path / "hubd.yaml"
    broker = EmbeddedBroker(
        tmp_path / "broker-data", port=port, dynsec=(find_plugin(), tmp_path / "data" / "dynamic-security.json")
    )
    return broker, config


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    for name, secret in (("hubd", HUBD_PASSWORD), ("admin", ADMIN_PASSWORD), ("claim", INITIAL_PASSWORD)):
        (tmp_path / f"{name}.secret").write_text(secret + "\n", encoding="utf-8")
    broker, config = _start(tmp_path, free_port())
    write_config(config, broker)
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    settings["broker"].update(
        {
            "url": broker.url,
            "client_id": "hubd",
            "username": "hubd",
            "password_file": str(tmp_path / "hubd.secret"),
            "access_control": "dynsec",
            "plugin_file": str(tmp_path / "data" / "dynamic-security.json"),
            "admin_password_file": str(tmp_path / "admin.secret"),
            "claim_password_file": str(tmp_path / "claim.secret"),
        }
    )
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    hub = RunningHub(config, broker)
    synced = hub.cli("broker", "sync")
    assert synced.exit_code == 0, synced.output
    broker.start_sync()
    try:
        hub.start()
        try:
            yield Site(hub, broker, config)
        finally:
            hub.stop()
    finally:
        broker.stop_sync()


def _registered(site: Site, der_id: str) -> str:
    assert site.hub.cli("der", "add", der_id, "--type", "pv").exit_code == 0
    answer = site.register(der_id)
    assert answer["ok"], answer
    return str(answer["password"])


def test_anonymous_and_wrong_password_connects_are_refused(site: Site) -> None:
    password = _registered(site, "PV-1")
    assert site.connects(user="PV-1", password=password, client="PV-1")
    assert not site.connects()
    assert not site.connects(client="PV-1")
    assert not site.connects(user="PV-1", password=password + "x", client="PV-1")
    assert not site.connects(user="hubd", password="guess", client="hubd")
    assert not site.connects(user="nobody", password=password, client="nobody")


def test_nobody_but_hubd_connects_with_hubds_client_id(site: Site) -> None:
    password = _registered(site, "PV-1")
    consumer = site.hub.consumer("market-1")
    for user, secret in (("PV-1", password), ("market-1", consumer), ("claim", INITIAL_PASSWORD)):
        assert not site.connects(user=user, password=secret, client="hubd"), user
        assert not site.connects(user=user, password=secret), f"{user} with a client id of the broker's choosing"
    # hubd kept its session all along: a DER's message is still answered.
    assert site.send("PV-1", password, [reading("PV-1", password)])["accepted"] == 1


def test_a_der_cannot_publish_as_another_der(site: Site) -> None:
    pv1 = _registered(site, "PV-1")
    _registered(site, "PV-2")
    pv1_client = {"user": "PV-1", "password": pv1, "client": "PV-1"}
    assert site.publish("hub/v1/der/PV-2/data", "{}", **pv1_client) == 0x87  # another DER's topic
    assert site.publish("hub/v1/der/PV-1/data", "{}", **pv1_client) in (0x00, 0x10)  # its own
    # With its own password for another DER's reading: refused by the hub, nothing stored.
    answer = site.send("PV-1", pv1, [reading("PV-2", pv1, T0)])
    assert answer["accepted"] == 0
    assert answer["rejected"][0]["error"]["code"] == "bad_credentials"


def test_a_der_cannot_subscribe_to_others_answers_nor_to_the_data(site: Site) -> None:
    pv1 = _registered(site, "PV-1")
    _registered(site, "PV-2")
    site.hub.consumer("market-1")
    pv1_client = {"user": "PV-1", "password": pv1, "client": "PV-1"}
    assert site.subscribe("reply/PV-1/data", **pv1_client) == 1  # its own answers
    for topic in ("reply/PV-2/data", "reply/PV-2/#", "hub/v1/data", "hub/v1/#", "#", "reply/market-1/#", "reply/#"):
        assert site.subscribe(topic, **pv1_client) == 0x87, topic


def test_the_claim_account_may_only_register(site: Site) -> None:
    claim = {"user": "claim", "password": INITIAL_PASSWORD, "client": "claim"}
    assert site.publish("hub/v1/data", json.dumps({"readings": []}), **claim) == 0x87
    assert site.publish("hub/v1/data/hub.v1", "{}", **claim) == 0x87
    assert site.publish("hub/v1/query", "{}", **claim) == 0x87
    for topic in ("hub/v1/register", "hub/v1/#", "reply/PV-1/#", "reply/#", "#", "reply/claim/#", "reply/claim/+"):
        assert site.subscribe(topic, **claim) == 0x87, topic
    assert site.subscribe(f"reply/claim/{secrets.token_urlsafe(16)}", **claim) == 1


def test_a_second_claimant_cannot_read_the_password_issued_to_the_first(site: Site) -> None:
    """A second holder of the initial password tries every way to listen while the first registers: under a
    client id of its own it is not let in at all (the claim account is bound to the id ``claim``); as ``claim``
    every wildcard filter is refused; and the first claimant's reply topic ends in a random level it cannot
    guess. It receives nothing, and the first claimant gets its password."""
    assert site.hub.cli("der", "add", "PV-7", "--type", "pv").exit_code == 0
    filters = ["reply/claim/+", "reply/claim/#", "reply/#", "#", "+/+/+", "hub/v1/register"]
    listeners = [
        subprocess.Popen(
            [
                "mosquitto_sub",
                *site.mqtt(
                    "-q",
                    "1",
                    "-v",
                    "-t",
                    topic,
                    "-W",
                    "4",
                    user="claim",
                    password=INITIAL_PASSWORD,
                    client=f"claim-{i}",
                ),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, topic in enumerate(filters)
    ]
    for topic in filters:
        assert site.subscribe(topic, user="claim", password=INITIAL_PASSWORD, client="claim") == 0x87, topic
    answer = site.register("PV-7")
    assert answer["ok"], answer
    for listener in listeners:
        out, err = listener.communicate(timeout=10)
        assert out == ""
        assert "not authorised" in err.lower() or "not authorized" in err.lower(), err


def test_wrong_initial_passwords_from_claimants_pause_nobodys_registration(site: Site) -> None:
    """Only the claim account may publish a registration, and the broker checked its password, the initial
    password, at CONNECT: a wrong one in a request is no guess. More of them than the hub-wide limit (20) from
    claimants on reply topics of their own are each answered bad_credentials, and a DER registers right after."""
    assert site.hub.cli("der", "add", "PV-9", "--type", "pv").exit_code == 0
    claim = site.mqtt("-q", "1", user="claim", password=INITIAL_PASSWORD, client="claim")
    for i in range(24):
        body = json.dumps({"der_id": f"PV-{i}", "password": f"guess-{i}-guess-{i}"})
        reply = ["-D", "publish", "response-topic", f"reply/claim/guess-{i}"]
        subprocess.run(["mosquitto_pub", *claim, *reply, "-t", "hub/v1/register", "-m", body], check=True, timeout=10)
    deadline = time.monotonic() + 10
    while len(records(site.hub, "register.failed")) < 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {r["outcome"] for r in records(site.hub, "register.failed")} == {"bad_credentials"}
    assert len(records(site.hub, "register.failed")) == 24
    answer = site.register("PV-9")
    assert answer["ok"], answer


def test_a_claim_password_other_than_the_initial_password_stops_hubd_run(site: Site, tmp_path: Path) -> None:
    site.hub.stop()
    (tmp_path / "claim.secret").write_text("not-the-initial-password\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-c", "from hubd.cli import main; main()", "--config", str(site.config), "run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 78, out.stderr
    assert "broker.claim_password_file: must hold the initial password" in out.stderr
    assert "not-the-initial-password" not in out.stderr and "Traceback" not in out.stderr


async def _connected_until_dropped(site: Site, der_id: str, password: str, action: Any) -> bool:
    """Connect as the DER, run ``action`` (sync, in a thread), and say whether the broker dropped the DER."""
    lost = asyncio.Event()
    session = MqttSession(
        der_id,
        on_publish=lambda first, body: None,
        on_lost=lambda exc: lost.set(),
        clean_start=True,
        username=der_id,
        password=password,
    )
    await session.connect("127.0.0.1", site.broker.port)
    await asyncio.to_thread(action)
    try:
        await asyncio.wait_for(lost.wait(), 5)
    except TimeoutError:
        return False
    finally:
        await session.disconnect()
    return True


def test_a_revoked_ders_live_connection_is_dropped_and_its_reconnect_refused(site: Site) -> None:
    password = _registered(site, "PV-1")

    def revoke() -> None:
        result = site.hub.cli("der", "revoke", "PV-1")
        assert result.exit_code == 0, result.output

    assert asyncio.run(_connected_until_dropped(site, "PV-1", password, revoke))
    assert not site.connects(user="PV-1", password=password, client="PV-1")


def test_rotation_makes_the_old_password_fail_at_the_broker_and_the_hub(site: Site) -> None:
    old = _registered(site, "PV-1")
    result = subprocess.run(  # as an operator runs it: the new password on stdout, and nothing else at all
        [
            sys.executable,
            "-c",
            "from hubd.cli import main; main()",
            "--config",
            str(site.config),
            "der",
            "rotate",
            "PV-1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    new = result.stdout.strip()
    assert re.fullmatch(r"\S{16,}", new), result.stdout
    assert not site.connects(user="PV-1", password=old, client="PV-1")
    assert site.send("PV-1", new, [reading("PV-1", old, T0)])["rejected"][0]["error"]["code"] == "bad_credentials"
    assert site.send("PV-1", new, [reading("PV-1", new, T0)])["accepted"] == 1


def test_a_revoked_system_is_dropped_and_refused(site: Site) -> None:
    password = site.hub.consumer("market-1")
    assert site.connects(user="market-1", password=password, client="market-1")
    assert site.hub.cli("system", "revoke", "market-1").exit_code == 0
    assert not site.connects(user="market-1", password=password, client="market-1")


def test_a_system_added_while_the_broker_is_away_keeps_its_password_and_sync_brings_it(site: Site) -> None:
    """The registry changes at once; a broker that cannot be told is one line and status 1, and the password
    issued is printed all the same, so `hubd broker sync` makes it work (docs/operations.md, Access at the broker)."""
    site.hub.stop()
    site.broker.stop_sync()
    added = site.hub.cli("system", "add", "market-2", "--role", "consumer")
    assert added.exit_code == 1
    password = added.stdout.strip()
    assert re.fullmatch(r"\S{16,}", password), added.stdout
    assert "cannot change the broker's access control" in added.stderr and "hubd broker sync" in added.stderr
    assert password not in added.stderr
    synced = site.hub.cli("broker", "sync")
    assert synced.exit_code == 0 and "added client market-2" in synced.output, synced.output
    site.broker.start_sync()
    site.hub.start()
    assert site.connects(user="market-2", password=password, client="market-2")


def test_broker_sync_after_live_changes_finds_nothing_to_change(site: Site) -> None:
    """Mosquitto saves a role's ACLs in an order of its own: the same rules in another order are no change."""
    _registered(site, "PV-1")
    site.hub.consumer("market-1")
    site.hub.stop()
    site.broker.stop_sync()
    synced = site.hub.cli("broker", "sync")
    assert synced.exit_code == 0 and synced.output.strip().endswith(": 0 changes"), synced.output


def test_broker_sync_against_a_blank_plugin_file_restores_access(site: Site, tmp_path: Path) -> None:
    pv1 = _registered(site, "PV-1")
    consumer = site.hub.consumer("market-1")
    site.hub.stop()
    site.broker.stop_sync()
    plugin = tmp_path / "data" / "dynamic-security.json"
    plugin.write_text("", encoding="utf-8")
    synced = site.hub.cli("broker", "sync")
    assert synced.exit_code == 0, synced.output
    assert "added client PV-1" in synced.output and "added client market-1" in synced.output
    assert "added client hubd" in synced.output and "added client claim" in synced.output
    again = site.hub.cli("broker", "sync")  # idempotent: nothing more to change
    assert again.output.strip().endswith(": 0 changes"), again.output
    site.broker.start_sync()
    site.hub.start()
    assert site.connects(user="PV-1", password=pv1, client="PV-1")
    assert site.connects(user="market-1", password=consumer, client="market-1")
    assert not site.connects()
    assert site.send("PV-1", pv1, [reading("PV-1", pv1, T0)])["accepted"] == 1
    assert site.register("PV-9")["error"]["code"] == "unknown_der"  # the claim account works again


def _behind_hubds_back(site: Site, commands: list[dict[str, Any]]) -> None:
    """Change the running broker's plugin directly, as its admin would with mosquitto_ctrl."""
    admin = Account("hubd-admin", ADMIN_PASSWORD)
    asyncio.run(BrokerAcl("127.0.0.1", site.broker.port, admin).run(commands, tolerate=()))


def test_broker_sync_repairs_a_running_broker_live(site: Site) -> None:
    """Changed behind hubd's back while it runs: a DER's client disabled, another's roles taken away, a third's
    role emptied, hubd's clock client gone, a client the registry does not know given hubd's powers. A sync
    against the running broker puts it all back without a restart, and says so; a second finds nothing."""
    passwords = {der_id: _registered(site, der_id) for der_id in ("PV-1", "PV-2", "PV-3")}
    _behind_hubds_back(
        site,
        [
            {"command": "disableClient", "username": "PV-1"},
            {"command": "modifyClient", "username": "PV-2", "roles": []},
            {"command": "modifyRole", "rolename": "hubd-PV-3", "acls": []},
            {"command": "deleteClient", "username": "hubd-clock"},
            {
                "command": "createClient",
                "username": "intruder",
                "password": "intruder-pw",
                "roles": [{"rolename": "hubd-hubd"}],
            },
        ],
    )
    assert not site.connects(user="PV-1", password=passwords["PV-1"], client="PV-1")
    assert site.publish("hub/v1/data", "{}", user="PV-2", password=passwords["PV-2"], client="PV-2") == 0x87
    assert site.connects(user="intruder", password="intruder-pw", client="intruder")

    synced = site.hub.cli("broker", "sync")
    assert synced.exit_code == 0, synced.output
    lines = synced.output.splitlines()
    assert "enabled client PV-1" in lines and "changed client PV-2 (roles)" in lines, lines
    assert "changed role hubd-PV-3 (its ACLs)" in lines and "added client hubd-clock" in lines, lines
    assert "removed client intruder (not in the registry)" in lines, lines
    assert lines[-1] == f"{site.broker.url}: 5 changes", lines

    for der_id, password in passwords.items():
        assert site.send(der_id, password, [reading(der_id, password, T0)])["accepted"] == 1, der_id
    assert not site.connects(user="intruder", password="intruder-pw", client="intruder")
    assert site.connects(user="hubd-clock", password=HUBD_PASSWORD, client="hubd-clock")
    again = site.hub.cli("broker", "sync")
    assert again.exit_code == 0 and again.output.strip() == f"{site.broker.url}: 0 changes", again.output


def test_broker_sync_names_a_der_whose_client_a_running_broker_lost(site: Site) -> None:
    """The plugin takes passwords only in plain text and the registry keeps them hashed: a DER's deleted client
    cannot come back live. The sync says so and exits 1; with the broker stopped it rebuilds the file, and the
    DER connects again with the password it has."""
    password = _registered(site, "PV-1")
    _behind_hubds_back(site, [{"command": "deleteClient", "username": "PV-1"}])
    synced = site.hub.cli("broker", "sync")
    assert synced.exit_code == 1
    assert "no broker client for PV-1" in synced.stderr and "stop the broker" in synced.stderr, synced.stderr
    assert password not in synced.output
    site.hub.stop()
    site.broker.stop_sync()
    rebuilt = site.hub.cli("broker", "sync")
    assert rebuilt.exit_code == 0 and "added client PV-1" in rebuilt.output, rebuilt.output
    site.broker.start_sync()
    site.hub.start()
    assert site.send("PV-1", password, [reading("PV-1", password, T0)])["accepted"] == 1


def test_a_der_whose_answer_found_nobody_is_not_registered(site: Site) -> None:
    """The claimant left before its answer came: the broker says "no matching subscribers" (0x10), and the
    registration is undone, broker client and all; the DER registers again."""
    assert site.hub.cli("der", "add", "PV-5", "--type", "pv").exit_code == 0
    body = json.dumps({"der_id": "PV-5", "password": INITIAL_PASSWORD})
    who = {"user": "claim", "password": INITIAL_PASSWORD, "client": "claim"}
    reply = ["-D", "publish", "response-topic", "reply/claim/gone"]
    subprocess.run(
        ["mosquitto_pub", *site.mqtt("-q", "1", "-t", "hub/v1/register", "-m", body, *reply, **who)],
        check=True,
        timeout=10,
    )
    deadline = time.monotonic() + 10
    while not records(site.hub, "register.undone"):
        assert time.monotonic() < deadline, "the registration was not undone"
        time.sleep(0.05)
    undone = records(site.hub, "register.undone")[0]
    assert undone["der_id"] == "PV-5" and "0x10 (no matching subscribers)" in undone["reason"]
    assert '"status": "allowed"' in site.hub.cli("der", "show", "PV-5").output
    assert site.register("PV-5")["ok"]


def test_a_ders_own_topic_is_proof_of_sender_without_a_password(site: Site) -> None:
    """On hub/v1/der/<id>/data the broker lets that DER's client alone publish: its readings need no password,
    and it may write no other DER's."""
    pv1 = _registered(site, "PV-1")
    _registered(site, "PV-2")
    own = "hub/v1/der/PV-1/data"
    plain = {"der_id": "PV-1", "measured_at": T0, "power_kw": 2.5}
    assert site.send("PV-1", pv1, [plain], topic=own) == {"ok": True, "accepted": 1, "rejected": []}
    other = {"der_id": "PV-2", "measured_at": T0, "power_kw": 2.5}
    answer = site.send("PV-1", pv1, [other], topic=own)
    assert answer["accepted"] == 0 and answer["rejected"][0]["error"]["code"] == "not_allowed"
    # The format code goes after data/, as on hub/v1/data/<code>.
    later = {**plain, "measured_at": "2025-06-01T00:01:00Z"}
    assert site.send("PV-1", pv1, [later], topic=own + "/hub.v1") == {"ok": True, "accepted": 1, "rejected": []}


def test_without_access_control_the_hub_does_not_listen_on_ders_own_topics(tmp_path: Path) -> None:
    """Without the broker's word a topic proves nothing: the hub takes no data there."""
    from hubd.config import load_config
    from hubd.sources.mqtt import MqttSource

    broker = EmbeddedBroker(tmp_path / "b", port=free_port())
    config = load_config(write_config(tmp_path / "hubd.yaml", broker))
    source = MqttSource(config.broker, broker.url, "hub/v1", None, config.limits, [], None, lambda a, b: None)  # type: ignore[arg-type]
    assert not any("/der/" in topic for topic in source.driver._topics)
    vouched = MqttSource(
        config.broker, broker.url, "hub/v1", None, config.limits, [], None, lambda a, b: None, vouched=True
    )  # type: ignore[arg-type]
    assert "hub/v1/der/+/data" in vouched.driver._topics


def test_the_embedded_broker_with_access_control_starts_from_the_registry(tmp_path: Path) -> None:
    """No broker.url, access_control dynsec: hubd rebuilds the plugin file from its registry and starts its own
    Mosquitto with it; anonymous clients are refused, a DER registers through the claim account and sends."""
    for name, secret in (("hubd", HUBD_PASSWORD), ("admin", ADMIN_PASSWORD), ("claim", INITIAL_PASSWORD)):
        (tmp_path / f"{name}.secret").write_text(secret + "\n", encoding="utf-8")
    port = free_port()
    placeholder = EmbeddedBroker(tmp_path / "unused", port=port)  # for the helpers: the port only, never started
    config = write_config(tmp_path / "hubd.yaml", placeholder)
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    settings["broker"] = {
        "embedded_port": port,
        "username": "hubd",
        "password_file": str(tmp_path / "hubd.secret"),
        "access_control": "dynsec",
        "admin_password_file": str(tmp_path / "admin.secret"),
        "claim_password_file": str(tmp_path / "claim.secret"),
    }
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    hub = RunningHub(config, placeholder)
    hub.start()
    try:
        site = Site(hub, placeholder, config)
        assert not site.connects()
        password = _registered(site, "PV-3")
        assert site.send("PV-3", password, [reading("PV-3", password)])["accepted"] == 1
        assert (tmp_path / "data" / "mosquitto" / "dynamic-security.json").stat().st_mode & 0o077 == 0
    finally:
        hub.stop()


def test_the_hubs_clock_checks_reach_a_der_under_access_control(site: Site) -> None:
    """hubd's clock checks connect as their own pinned principal, and a DER that names itself as the source
    hears the checks of its clock on hub/v1/time/check/<its id> (docs/protocol.md, Time), and no other's."""
    password = _registered(site, "PV-1")
    assert site.subscribe("hub/v1/time/check/PV-2", user="PV-1", password=password, client="PV-1") == 0x87

    async def run() -> list[str]:
        heard: list[str] = []
        checked = asyncio.Event()

        def on_publish(first: int, body: bytes) -> None:
            heard.append(packets.parse_publish(first, body)[0])
            checked.set()

        session = MqttSession("PV-1", on_publish=on_publish, clean_start=True, username="PV-1", password=password)
        await session.connect("127.0.0.1", site.broker.port, topics=["hub/v1/time/check/PV-1"])
        assert await session.subscribed() == [1]
        body = {"source_id": "PV-1", "readings": [reading("PV-1", password)]}
        session.publish("hub/v1/data", json.dumps(body).encode())
        try:
            await asyncio.wait_for(checked.wait(), 10)
        finally:
            await session.disconnect()
        return heard

    assert asyncio.run(run())[0] == "hub/v1/time/check/PV-1"


def test_no_der_or_system_takes_the_broker_name_of_another_principal(site: Site) -> None:
    """A DER registered as ``hubd`` (or ``claim``, ``hubd-admin``, a system's name) would replace that principal's
    broker client: refused, and hubd keeps serving."""
    password = _registered(site, "PV-1")
    for name in ("hubd", "claim", "hubd-admin", "hubd-clock"):
        assert site.hub.cli("der", "add", name).exit_code == 0
        answer = site.register(name)
        assert answer["error"]["code"] == "not_allowed", (name, answer)
        assert site.hub.cli("der", "rotate", name).exit_code != 0
    site.hub.consumer("market-1")
    assert site.hub.cli("der", "add", "market-1").exit_code == 0
    assert site.register("market-1")["error"]["code"] == "not_allowed"
    refused = site.hub.cli("system", "add", "PV-1", "--role", "consumer")
    assert refused.exit_code != 0 and "another principal" in refused.output
    assert site.send("PV-1", password, [reading("PV-1", password)])["accepted"] == 1


def test_hubd_edge_registers_and_sends_under_access_control(site: Site, tmp_path: Path, monkeypatch: Any) -> None:
    """`hubd edge` as the docs tell: registration as the claim account (its answer on reply/claim/<random>),
    then the DER's readings as its own broker client, with its client id."""
    assert site.hub.cli("der", "add", "PV-4", "--type", "pv").exit_code == 0
    broker = ["--broker", site.broker.url]
    passwords = tmp_path / "pv-4.json"
    monkeypatch.setenv("HUBD_INITIAL_PASSWORD", INITIAL_PASSWORD)
    claim = ["--username", "claim", "--password-file", str(tmp_path / "claim.secret"), "--client-id", "claim"]
    done = site.hub.cli("edge", "register", "PV-4", *broker, "--passwords", str(passwords), *claim)
    assert done.exit_code == 0, done.output
    issued = json.loads(passwords.read_text(encoding="utf-8"))["PV-4"]
    (tmp_path / "pv-4.secret").write_text(issued, encoding="utf-8")
    (tmp_path / "readings.jsonl").write_text('{"der_id": "PV-4", "power_kw": 1.5}\n', encoding="utf-8")
    own = ["--username", "PV-4", "--password-file", str(tmp_path / "pv-4.secret"), "--client-id", "PV-4"]
    sent = site.hub.cli(
        "edge",
        "send",
        str(tmp_path / "readings.jsonl"),
        "--source-id",
        "PV-4",
        "--passwords",
        str(passwords),
        *broker,
        *own,
    )
    assert sent.exit_code == 0, sent.output
