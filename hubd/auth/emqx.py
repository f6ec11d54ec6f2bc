"""Access control at a clustered broker: EMQX 5's HTTP authenticator and HTTP authorizer, answered from the registry.

For fleets beyond what one Mosquitto's dynamic-security plugin holds (docs/operations.md, "Access at the broker"),
``broker.access_control: emqx`` has EMQX ask hubd, on its HTTP listener, at every CONNECT (``POST /emqx/authn``)
and every publish and subscribe (``POST /emqx/authz``). The principals and their rules are the ones
``hubd.auth.dynsec`` gives Mosquitto (same user names, pinned client ids, same ACL tables), evaluated here the way
the plugin does: the highest priority rule that matches decides, else publishing and subscribing are denied.

EMQX sends JSON bodies of the operator's choosing; hubd reads ``username``, ``clientid``, ``password`` (authn),
``action`` and ``topic`` (authz), and ``peerhost`` (the client's address, which the broker vouches for: the budget
of bcrypt checks is kept per address). Answers are EMQX's shapes: ``{"result": "allow" | "deny", "is_superuser":
false}`` and ``{"result": "allow" | "deny"}``; a name hubd does not know is denied, never ignored (hubd owns the
policy). Each request carries ``Authorization: Bearer <secret>`` (``broker.emqx_secret_file``): the listener
would otherwise be a password oracle for anyone who reaches it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from hubd.auth import Authenticator
from hubd.auth.dynsec import accounts, claim_acls, der_acls, hubd_acls, system_acls
from hubd.config import Config, read_secret

Acl = tuple[str, str, bool, int]


@dataclass(frozen=True)
class Rules:
    """One principal as EMQX sees it: the client id it must use and its role's ACLs."""

    client_id: str
    acls: tuple[Acl, ...]
    kind: str  # "own" (hubd, its clock connection, claim: password from a file), "der" or "system" (bcrypt)
    password: str | None = None


def _matches(pattern: str, topic: str) -> bool:
    """Mosquitto's rule for an ACL topic against a topic or a subscription's filter: ``+`` and ``#`` in the
    ACL match any level(s), including a wildcard in the filter; a wildcard in the filter matches only the same
    wildcard in the ACL (``reply/#`` is not allowed by ``reply/PV-1/#``)."""
    acl, sub = pattern.split("/"), topic.split("/")
    for i, level in enumerate(acl):
        if level == "#":
            return True
        if i >= len(sub):
            return False
        if level == "+":
            if sub[i] == "#":
                return False
            continue
        if level != sub[i]:
            return False
    return len(acl) == len(sub)


def allows(acls: tuple[Acl, ...], action: str, topic: str) -> bool:
    """What the dynamic-security plugin decides for this principal: publish and subscribe only."""
    kinds = {"publish": ("publishClientSend",), "subscribe": ("subscribeLiteral", "subscribePattern")}.get(action, ())
    found = [
        (priority, allow)
        for kind, acl, allow, priority in acls
        if kind in kinds and (acl == topic if kind == "subscribeLiteral" else _matches(acl, topic))
    ]
    if not found:
        return False
    top = max(priority for priority, _ in found)
    return all(allow for priority, allow in found if priority == top)


class EmqxHooks:
    """The answers to EMQX's authn and authz requests, from the registry the Authenticator keeps in memory."""

    def __init__(self, config: Config, auth: Authenticator) -> None:
        self._auth = auth
        self._prefix = config.topic_prefix
        hubd, claim, _ = accounts(config)
        clock = f"{hubd.username}-clock"
        self._own = {
            hubd.username: Rules(hubd.client_id or hubd.username, hubd_acls(self._prefix), "own", hubd.password),
            clock: Rules(f"{hubd.client_id}-clock", hubd_acls(self._prefix), "own", hubd.password),
        }
        if claim is not None:
            self._own[claim.username] = Rules(claim.username, claim_acls(self._prefix), "own", claim.password)
        self.secret = read_secret(config.broker.emqx_secret_file) or ""

    def rules(self, username: str) -> Rules | None:
        """The principal of this user name, as ``hubd.auth.dynsec.principals`` orders them; None: no such one."""
        if username in self._own:
            return self._own[username]
        self._auth.refresh()
        der = self._auth.ders.get(username)
        if der is not None and der.status == "registered":
            return Rules(username, der_acls(self._prefix, username), "der")
        if der is not None and der.status == "revoked":
            return None  # a disabled broker client (one only added, not registered, is none at all)
        system = self._auth.systems.get(username)
        if system is not None and system.status == "active":
            return Rules(username, system_acls(self._prefix, username, system.role), "system")
        return None

    async def authn(self, body: dict[str, Any]) -> dict[str, Any]:
        username, client_id, password = body.get("username"), body.get("clientid"), body.get("password")
        if not (isinstance(username, str) and isinstance(client_id, str) and isinstance(password, str)):
            return {"result": "deny"}
        rules = self.rules(username)
        if rules is None or client_id != rules.client_id:
            return {"result": "deny"}
        if rules.password is not None:
            good = hmac.compare_digest(password.encode(), rules.password.encode())
        elif rules.kind == "der":
            source = f"emqx:{body.get('peerhost') or 'unknown'}"
            good = await self._auth.check_der(username, password, source) is None
        else:
            system = self._auth.systems[username]
            good = await self._auth.check_system(username, password, system.role) is None
        return {"result": "allow", "is_superuser": False} if good else {"result": "deny"}

    def authz(self, body: dict[str, Any]) -> dict[str, Any]:
        username, client_id = body.get("username"), body.get("clientid")
        action, topic = body.get("action"), body.get("topic")
        if not all(isinstance(value, str) for value in (username, client_id, action, topic)):
            return {"result": "deny"}
        assert isinstance(username, str) and isinstance(action, str) and isinstance(topic, str)
        rules = self.rules(username)
        if rules is None or client_id != rules.client_id:
            return {"result": "deny"}
        return {"result": "allow" if allows(rules.acls, action, topic) else "deny"}
