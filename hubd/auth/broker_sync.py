"""``hubd broker sync`` against a running broker: its dynamic-security plugin brought in step with the registry
over ``$CONTROL/dynamic-security/v1``, without a restart.

The plugin is asked what it holds (``listClients``, ``listRoles``, ``listGroups``, ``getDefaultACLAccess``, one
control message), that is compared with the file the registry implies (``hubd.auth.dynsec.build``), and the
differences go back as one batch (the plugin rewrites its whole file on every control message). Lists are
compared as sets: the plugin keeps a role's ACLs and a client's roles in an order of its own.

What it cannot do live: the plugin never tells a password, and takes a new one only in plain text, while the
registry keeps DERs' and systems' broker passwords as hashes. So passwords are not compared, and a DER or
system whose broker client is missing altogether is reported, not restored: rebuilding the file with the broker
stopped restores it with its password (``hubd.auth.dynsec.rebuild``). The hub's own accounts (hubd, its clock
connection, the claim account), whose passwords come from files, are recreated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from hubd.auth.dynsec import Account, BrokerAcl

_ASK: list[dict[str, Any]] = [
    {"command": "listClients", "verbose": True},
    {"command": "listRoles", "verbose": True},
    {"command": "listGroups", "verbose": True},
    {"command": "getDefaultACLAccess"},
]


@dataclass
class Plan:
    """What one sync does: the commands (one batch), a line per change, and what it cannot change live."""

    commands: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # DERs and systems without a broker client


def _key(item: dict[str, Any]) -> bytes:
    return orjson.dumps(item, option=orjson.OPT_SORT_KEYS)


def _acls(role: dict[str, Any]) -> set[bytes]:
    return {_key({k: acl[k] for k in ("acltype", "topic", "allow", "priority") if k in acl}) for acl in role["acls"]}


def _roles(client: dict[str, Any]) -> set[str]:
    return {entry["rolename"] for entry in client.get("roles", [])}


def plan(want: dict[str, Any], have: list[dict[str, Any]], own: dict[str, Account]) -> Plan:
    """The commands that turn what the plugin holds (``have``: its answers to ``_ASK``) into ``want`` (a plugin
    file as ``hubd.auth.dynsec.build`` makes it). ``own``: the hub's own accounts by user name, whose passwords
    are known here in plain text."""
    clients_now = {c["username"]: c for c in have[0]["data"]["clients"]}
    roles_now = {r["rolename"]: r for r in have[1]["data"]["roles"]}
    groups_now = [g["groupname"] for g in have[2]["data"]["groups"]]
    clients = {c["username"]: c for c in want["clients"]}
    roles = {r["rolename"]: r for r in want["roles"]}
    out = Plan()

    def do(line: str, *commands: dict[str, Any]) -> None:
        out.lines.append(line)
        out.commands.extend(commands)

    default = {a["acltype"]: a["allow"] for a in have[3]["data"]["acls"]}
    if default != want["defaultACLAccess"]:
        acls = [{"acltype": kind, "allow": allow} for kind, allow in want["defaultACLAccess"].items()]
        do("changed default access", {"command": "setDefaultACLAccess", "acls": acls})
    for name in groups_now:  # hubd uses none: a group could give any client roles of its choosing
        do(f"removed group {name}", {"command": "deleteGroup", "groupname": name})
    for name in sorted(roles.keys() - roles_now.keys()):
        do(f"added role {name}", {"command": "createRole", **roles[name]})
    for name in sorted(roles.keys() & roles_now.keys()):
        if _acls(roles[name]) != _acls(roles_now[name]):
            do(f"changed role {name} (its ACLs)", {"command": "modifyRole", **roles[name]})
    for name in sorted(clients_now.keys() - clients.keys()):
        do(f"removed client {name} (not in the registry)", {"command": "deleteClient", "username": name})
    for name in sorted(roles_now.keys() - roles.keys()):
        do(f"removed role {name} (not in the registry)", {"command": "deleteRole", "rolename": name})
    for name in sorted(clients.keys() - clients_now.keys()):
        client = clients[name]
        if name not in own:
            out.missing.append(name)
            continue
        create = {"command": "createClient", "username": name, "password": own[name].password, "roles": client["roles"]}
        if "clientid" in client:
            create["clientid"] = client["clientid"]
        do(f"added client {name}", create)
    for name in sorted(clients.keys() & clients_now.keys()):
        client, now = clients[name], clients_now[name]
        changed = []
        if client.get("clientid") != now.get("clientid"):
            changed.append("client id")
        if _roles(client) != _roles(now) or now.get("groups"):
            changed.append("roles")
        if changed:
            modify = {"command": "modifyClient", "username": name, "roles": client["roles"], "groups": []}
            modify["clientid"] = client.get("clientid", "")  # "" clears it (the admin is bound to none)
            do(f"changed client {name} ({', '.join(changed)})", modify)
        if bool(client.get("disabled")) != bool(now.get("disabled")):
            verb = "disable" if client.get("disabled") else "enable"
            do(f"{verb}d client {name}", {"command": f"{verb}Client", "username": name})
    return out


async def reconcile(acl: BrokerAcl, want: dict[str, Any], own: dict[str, Account]) -> Plan:
    """Ask the running broker what it holds and send what differs from ``want``, as one batch."""
    found = plan(want, await acl.run(list(_ASK)), own)
    if found.commands:
        await acl.run(found.commands, tolerate=())
    return found
