"""Access control at the broker: Mosquitto's dynamic-security plugin, kept in step with the registry.

The registry is the truth; the plugin's JSON file is derived from it. Each principal the broker knows is a
plugin *client* bound to one client id (so no account can connect as ``hubd`` and take its session over) with
a *role* of its own (Mosquitto 2.0's plugin substitutes no ``%c`` in topics, so a DER's own topics need a role
per DER). Live changes (a registration, a rotation, a revocation) go to the running broker over
``$CONTROL/dynamic-security/v1`` as one batch of commands each (the plugin rewrites its whole file on every
change); ``plugin_file`` rebuilds the whole file from the registry for a broker that starts with it
(``hubd broker sync``, and the embedded broker at every start). The plugin stores PBKDF2-SHA512 hashes, and
so does the registry (``broker_credentials``): a file can be rebuilt without any password in plain text.

The policy (docs/operations.md, "Access at the broker"): with ``P`` the topic prefix,
- ``hubd`` reads ``P/#`` and publishes anywhere (answers go to reply topics of the requesters' choosing);
- ``claim`` (first contact, shared by DERs not yet registered) publishes ``P/register`` and may subscribe to
  one literal topic at a time under ``reply/claim/``, never a wildcard there: the reply topic's random last
  level is the secret that keeps one claimant's new password from another;
- a DER publishes ``P/data``, ``P/data/<format>``, its own ``P/der/<id>/data[/<format>]``, ``P/time``, and
  subscribes under ``reply/<der id>/``; a gateway the same without a topic of its own; a consumer publishes
  ``P/query`` and ``P/time`` and subscribes under ``reply/<name>/``.
Everything not allowed is denied (the plugin's default for publishing and subscribing).
"""

from __future__ import annotations

import asyncio
import base64
import glob
import hashlib
import os
import ssl
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from hubd.config import read_secret
from hubd.mqtt.driver import tls_context
from hubd.mqtt.packets import parse_publish
from hubd.mqtt.session import MqttError, MqttSession

if TYPE_CHECKING:
    from hubd.auth.registry import Registry
    from hubd.config import Config

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
ITERATIONS = 1000  # PBKDF2 rounds of a broker password: each connect costs ~1 ms of the broker's CPU
REPLY_ROOT = "reply"  # principals' reply topics: reply/<username>/...; the claim account's: reply/claim/<nonce>

#: Where Debian (any architecture) and source builds put the plugin.
PLUGIN_GLOBS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/*/mosquitto_dynamic_security.so",
)


class BrokerAclError(Exception):
    """The broker's access control could not be changed (unreachable, refused, or a command failed)."""


def find_plugin() -> str:
    """The path of ``mosquitto_dynamic_security.so`` on this host, whatever its architecture."""
    for pattern in PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise BrokerAclError(
        "mosquitto_dynamic_security.so not found (Debian's mosquitto package ships it in /usr/lib/<arch>/)"
    )


def password_record(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> dict[str, Any]:
    """A password as the plugin stores it: PBKDF2-HMAC-SHA512, a 12-byte salt, 64 bytes of hash, base64."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
    }


@dataclass(frozen=True)
class Principal:
    """One broker client: its username, the one client id it may use, its role's ACLs, whether disabled."""

    username: str
    client_id: str | None
    acls: tuple[tuple[str, str, bool, int], ...]  # (acltype, topic, allow, priority)
    record: dict[str, Any] | None  # password_record; None: none known (it cannot connect)
    disabled: bool = False

    @property
    def role(self) -> str:
        return f"hubd-{self.username}"

    def role_json(self) -> dict[str, Any]:
        acls = [{"acltype": t, "topic": topic, "allow": allow, "priority": p} for t, topic, allow, p in self.acls]
        return {"rolename": self.role, "acls": acls}

    def client_json(self) -> dict[str, Any]:
        client: dict[str, Any] = {"username": self.username, "roles": [{"rolename": self.role}]}
        if self.client_id is not None:
            client["clientid"] = self.client_id
        if self.record is not None:
            client.update(self.record)
        if self.disabled:
            client["disabled"] = True
        return client


def _pub(topic: str) -> tuple[str, str, bool, int]:
    return ("publishClientSend", topic, True, 0)


def _replies(username: str) -> tuple[tuple[str, str, bool, int], ...]:
    return (("subscribePattern", f"{REPLY_ROOT}/{username}/#", True, 0),)


def _status(prefix: str) -> tuple[str, str, bool, int]:
    """The hub's retained online/offline status: every principal may read it."""
    return ("subscribeLiteral", f"{prefix}/status", True, 0)


def hubd_acls(prefix: str) -> tuple[tuple[str, str, bool, int], ...]:
    return (
        ("subscribePattern", f"{prefix}/#", True, 0),
        ("subscribePattern", f"$share/+/{prefix}/#", True, 0),
        _pub("#"),
    )


def claim_acls(prefix: str) -> tuple[tuple[str, str, bool, int], ...]:
    root = f"{REPLY_ROOT}/claim"
    return (
        _pub(f"{prefix}/register"),
        _status(prefix),
        ("subscribeLiteral", f"{root}/+", False, 10),  # a wildcard would read every claimant's answer
        ("subscribeLiteral", f"{root}/#", False, 10),
        ("subscribePattern", f"{root}/+", True, 0),  # one literal, unguessable topic
    )


def _clock(prefix: str, name: str) -> tuple[tuple[str, str, bool, int], ...]:
    """The hub's clock checks of a source named like the principal (docs/protocol.md, Time): hear them, answer."""
    return (
        ("subscribeLiteral", f"{prefix}/time/check/{name}", True, 0),
        ("subscribeLiteral", f"{prefix}/time/set/{name}", True, 0),
        _pub(f"{prefix}/time/answers/+"),
    )


def der_acls(prefix: str, der_id: str) -> tuple[tuple[str, str, bool, int], ...]:
    own = f"{prefix}/der/{der_id}/data"
    return (
        *_clock(prefix, der_id),
        _pub(f"{prefix}/data"),
        _pub(f"{prefix}/data/+"),
        _pub(own),
        _pub(own + "/+"),
        _pub(f"{prefix}/time"),
        _status(prefix),
        *_replies(der_id),
    )


def system_acls(prefix: str, name: str, role: str) -> tuple[tuple[str, str, bool, int], ...]:
    sends: tuple[tuple[str, str, bool, int], ...]
    if role == "gateway":
        sends = (_pub(f"{prefix}/data"), _pub(f"{prefix}/data/+"), _pub(f"{prefix}/time"), *_clock(prefix, name))
    elif role == "consumer":
        sends = (_pub(f"{prefix}/query"), _pub(f"{prefix}/plan"), _pub(f"{prefix}/time"))
    elif role == "planner":  # uploads plans only (hub/v1/plan)
        sends = (_pub(f"{prefix}/plan"), _pub(f"{prefix}/time"))
    else:  # a viewer uses the status page only
        sends = ()
    return (*sends, _status(prefix), *_replies(name))


@dataclass(frozen=True)
class Account:
    """A principal of the hub's own whose password comes from a file: hubd, the claim account, the admin."""

    username: str
    password: str
    client_id: str | None = None


def principals(registry: Registry, prefix: str, hubd: Account, claim: Account | None) -> list[Principal]:
    """Every broker client the registry implies (the admin aside): hubd, the claim account, each registered or
    revoked DER and each system whose broker password is known."""
    records = registry.broker_records()
    found = [
        Principal(hubd.username, hubd.client_id, hubd_acls(prefix), password_record(hubd.password)),
        # hubd's clock checks of edge terminals: a connection of their own (hubd.clock.edges), the same password
        Principal(
            f"{hubd.username}-clock", f"{hubd.client_id}-clock", hubd_acls(prefix), password_record(hubd.password)
        ),
    ]
    if claim is not None:
        found.append(Principal(claim.username, claim.client_id, claim_acls(prefix), password_record(claim.password)))
    taken = {p.username for p in found}
    for der in registry.ders().values():
        if der.status == "allowed" or der.der_id in taken:
            continue
        found.append(
            Principal(
                der.der_id,
                der.der_id,
                der_acls(prefix, der.der_id),
                records.get("der:" + der.der_id),
                disabled=der.status == "revoked",
            )
        )
    taken = {p.username for p in found}
    for system in registry.systems().values():
        if system.name in taken:  # one broker client per user name: the hub's own accounts and DERs come first
            continue
        found.append(
            Principal(
                system.name,
                system.name,
                system_acls(prefix, system.name, system.role),
                records.get("system:" + system.name),
                disabled=system.status != "active",
            )
        )
    return found


def _admin(admin: Account) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plugin's admin: may use the control topic and nothing else."""
    acls = [
        {"acltype": kind, "topic": "$CONTROL/dynamic-security/#", "allow": True, "priority": 0}
        for kind in ("publishClientSend", "publishClientReceive", "subscribePattern")
    ]
    client = {"username": admin.username, "roles": [{"rolename": "hubd-admin"}], **password_record(admin.password)}
    if admin.client_id:
        client["clientid"] = admin.client_id
    return client, {"rolename": "hubd-admin", "acls": acls}


def plugin_file(found: Iterable[Principal], admin: Account) -> dict[str, Any]:
    """The plugin's whole JSON file for these principals: what a broker started with it allows."""
    admin_client, admin_role = _admin(admin)
    found = list(found)
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [admin_client, *(p.client_json() for p in found if p.record is not None)],
        "groups": [],
        "roles": [admin_role, *(p.role_json() for p in found if p.record is not None)],
    }


def compare(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What rebuilding a plugin file changes, one line per client or role, for ``hubd broker sync``."""
    lines: list[str] = []
    for key, name in (("clients", "username"), ("roles", "rolename")):
        before = {item[name]: item for item in (old or {}).get(key, [])}
        after = {item[name]: item for item in new[key]}
        what = key[:-1]
        for item in sorted(after.keys() - before.keys()):
            lines.append(f"added {what} {item}")
        for item in sorted(before.keys() - after.keys()):
            lines.append(f"removed {what} {item}")
        for item in sorted(after.keys() & before.keys()):
            if _comparable(before[item]) != _comparable(after[item]):
                lines.append(f"changed {what} {item}")
    return lines


def _comparable(item: dict[str, Any]) -> dict[str, Any]:
    """A client or role without its salt and hash, which differ on every rebuild of the same password, and with
    its lists (a role's ACLs, a client's roles) in one order: Mosquitto saves them in an order of its own."""
    return {
        k: sorted(v, key=lambda e: orjson.dumps(e, option=orjson.OPT_SORT_KEYS)) if isinstance(v, list) else v
        for k, v in item.items()
        if k not in ("password", "salt", "iterations")
    }


def write_plugin_file(path: Path, content: dict[str, Any]) -> None:
    """Write the file readable by its owner only (it holds password hashes), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".new")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(orjson.dumps(content, option=orjson.OPT_INDENT_2))
    part.replace(path)


# -- live changes ------------------------------------------------------------------------------------------


def create_commands(principal: Principal, password: str) -> list[dict[str, Any]]:
    """Commands that (re)create a principal with this password: any earlier client and role of that name
    first go (their errors, when there were none, are expected and ignored)."""
    client: dict[str, Any] = {"command": "createClient", "username": principal.username, "password": password}
    if principal.client_id is not None:
        client["clientid"] = principal.client_id
    client["roles"] = [{"rolename": principal.role}]
    return [
        {"command": "deleteClient", "username": principal.username},
        {"command": "deleteRole", "rolename": principal.role},
        {"command": "createRole", **principal.role_json()},
        client,
    ]


def delete_commands(username: str) -> list[dict[str, Any]]:
    return [
        {"command": "deleteClient", "username": username},
        {"command": "deleteRole", "rolename": f"hubd-{username}"},
    ]


_DELETES = ("deleteClient", "deleteRole")


class BrokerAcl:
    """Sends batches of commands to the running broker's plugin, as its admin (credentials from a file)."""

    def __init__(self, host: str, port: int, admin: Account, tls: ssl.SSLContext | None = None) -> None:
        self._host = host
        self.port = port
        self._admin = admin
        self._tls = tls

    async def run(
        self, commands: list[dict[str, Any]], tolerate: Iterable[str] = ("deleteClient", "deleteRole")
    ) -> list[dict[str, Any]]:
        """Send one batch and wait for the plugin's answer; raise BrokerAclError naming a failed command
        (those in ``tolerate`` may fail: deleting what is not there). The plugin's answers, one per command.

        The wait grows with the batch: each command costs the plugin time in proportion to the principals it
        holds (about 180 ms per command with 10,000 DERs; bench/principals.py)."""
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        def on_publish(first: int, body: bytes) -> None:
            topic, payload, _, _, _ = parse_publish(first, body)
            if topic == RESPONSE_TOPIC:
                answers.put_nowait(payload)

        session = MqttSession(
            self._admin.client_id or f"hubd-admin-{uuid.uuid4().hex[:8]}",
            on_publish=on_publish,
            clean_start=True,
            username=self._admin.username,
            password=self._admin.password,
        )
        try:
            await session.connect(self._host, self.port, self._tls, topics=[RESPONSE_TOPIC])
            codes = await session.subscribed()
            if codes and codes[0] >= 0x80:
                raise BrokerAclError("the broker refused the admin's subscription to the plugin's answers")
            session.publish(CONTROL_TOPIC, orjson.dumps({"commands": commands}))
            reply = orjson.loads(await asyncio.wait_for(answers.get(), 10.0 + 0.5 * len(commands)))
        except (OSError, TimeoutError, MqttError) as exc:
            raise BrokerAclError(f"cannot change the broker's access control: {exc or type(exc).__name__}") from exc
        finally:
            await session.disconnect()
        tolerated = set(tolerate)
        for command, answer in zip(commands, reply.get("responses", []), strict=False):
            error = answer.get("error")
            if error and command["command"] not in tolerated:
                name = command.get("username") or command.get("rolename") or ""
                raise BrokerAclError(f"the broker's plugin refused {command['command']} {name}: {error}")
        return list(reply.get("responses", []))


# -- from the hub's configuration --------------------------------------------------------------------------


def accounts(config: Config) -> tuple[Account, Account | None, Account]:
    """hubd's own account, the claim account (None without ``claim_password_file``) and the plugin's admin,
    their passwords read from their files (never logged)."""
    broker = config.broker
    hubd = Account(broker.username or "hubd", read_secret(broker.password_file) or "", broker.client_id)
    claim_password = read_secret(broker.claim_password_file)
    claim = Account(broker.claim_username, claim_password, broker.claim_username) if claim_password else None
    admin = Account(broker.admin_username, read_secret(broker.admin_password_file) or "")
    return hubd, claim, admin


def claim_password(config: Config) -> str | None:
    """The claim account's password (the initial password) when the broker checks it (access control at the
    broker: dynsec, or emqx asking hubd.auth.emqx)."""
    return read_secret(config.broker.claim_password_file) if config.broker.access_control != "none" else None


def reserved(config: Config) -> frozenset[str]:
    """The broker user names of the hub's own accounts: no DER or system may take one (a DER registered as
    ``hubd`` would replace hubd's own broker client)."""
    broker = config.broker
    hubd = broker.username or "hubd"
    return frozenset((hubd, f"{hubd}-clock", broker.claim_username, broker.admin_username))


def build(config: Config, registry: Registry) -> dict[str, Any]:
    """The plugin's whole file as the registry and the configured accounts imply it."""
    hubd, claim, admin = accounts(config)
    return plugin_file(principals(registry, config.topic_prefix, hubd, claim), admin)


def rebuild(config: Config, registry: Registry) -> list[str]:
    """Write the plugin's file afresh from the registry (a broker loads it when it starts); what changed."""
    path = config.plugin_path
    try:
        old = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        old = None  # missing, blank or broken: everything is added
    new = build(config, registry)
    write_plugin_file(path, new)
    return compare(old, new)


def broker_acl(config: Config, url: str) -> BrokerAcl | None:
    """The running broker's plugin, when the hub keeps access control at the broker (else None)."""
    if config.broker.access_control != "dynsec":
        return None
    parts = urlsplit(url)
    tls = tls_context(config.broker) if parts.scheme == "mqtts" else None
    port = parts.port or (8883 if tls else 1883)
    return BrokerAcl(parts.hostname or "127.0.0.1", port, accounts(config)[2], tls)


def der_principal(prefix: str, der_id: str) -> Principal:
    return Principal(der_id, der_id, der_acls(prefix, der_id), None)


def system_principal(prefix: str, name: str, role: str) -> Principal:
    return Principal(name, name, system_acls(prefix, name, role), None)
