"""``hubd broker``: the broker's access control (``hubd.auth.dynsec``) from the command line, and the live changes
the registry commands (rotate, revoke, reset, system add) make at the broker."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import click
from msgspec.structs import replace

from hubd.auth import dynsec
from hubd.auth.broker_sync import reconcile
from hubd.auth.registry import Registry
from hubd.broker import _accepts, _connect_host
from hubd.config import Config, command_config


def broker_url(config: Config) -> str:
    """Where the broker is: ``broker.url``, else the embedded broker's listener."""
    if config.broker.url:
        return config.broker.url
    host = _connect_host(config.broker.embedded_bind)
    return (
        f"mqtt://[{host}]:{config.broker.embedded_port}"
        if ":" in host
        else f"mqtt://{host}:{config.broker.embedded_port}"
    )


def name_taken(config: Config, registry: Registry, name: str, kind: str) -> bool:
    """Whether ``name`` (a DER's id, ``kind`` "der", or a system's name) is another principal's broker user name:
    one of the hub's own accounts, or a principal of the other kind. Such a one gets no broker client."""
    if config.broker.access_control == "none":
        return False
    others = registry.systems() if kind == "der" else registry.ders()
    return name in dynsec.reserved(config) or name in others


def refuse_taken(config: Config, registry: Registry, name: str, kind: str) -> None:
    if name_taken(config, registry, name, kind):
        raise click.ClickException(f"{name} names another principal at the broker (broker.access_control dynsec)")


def tell_broker(config: Config, registry: Registry, commands: list[dict[str, Any]], name: str, kind: str) -> None:
    """Apply one batch of commands to the running broker's plugin (nothing without access control).

    The embedded broker that is not running gets its file rebuilt instead (it is rebuilt at every start anyway);
    a broker of ``broker.url`` that cannot be told is an error: the registry changed, the broker did not."""
    url = broker_url(config)
    acl = dynsec.broker_acl(config, url)
    if acl is None or name_taken(config, registry, name, kind):
        return  # the name is another principal's at the broker: this one has no broker client to change
    embedded = _connect_host(config.broker.embedded_bind), config.broker.embedded_port
    if config.broker.url is None and not _accepts(*embedded):
        dynsec.rebuild(config, registry)
        return
    try:
        asyncio.run(acl.run(commands))
    except dynsec.BrokerAclError as exc:
        raise click.ClickException(
            f"{exc}; the registry has changed: run `hubd broker sync` with the broker stopped"
        ) from None


@click.group("broker")
def broker_group() -> None:
    """The broker's access control (broker.access_control dynsec): its plugin file, kept from the registry."""


@broker_group.command("sync")
@click.option("--output", type=click.Path(dir_okay=False), help="Write here instead of broker.plugin_file.")
@click.pass_context
def broker_sync(ctx: click.Context, output: str | None) -> None:
    """Bring the broker's dynamic-security plugin in step with the registry and say what changed.

    A running broker (the one hubd talks to answers on its port) is changed live over its control topic; a
    stopped one gets its file rebuilt from the registry (it loads it when it starts), as does --output."""
    config = command_config(ctx)
    if output is not None:
        config = replace(config, broker=replace(config.broker, plugin_file=output))
    if config.broker.access_control != "dynsec":
        raise click.ClickException("broker.access_control is not dynsec: the broker keeps no access control of hubd's")
    registry = Registry(config.registry_path)
    try:
        url = broker_url(config)
        acl = dynsec.broker_acl(config, url)
        parts = urlsplit(url)
        live = output is None and acl is not None and _accepts(parts.hostname or "127.0.0.1", acl.port)
        if live:
            assert acl is not None
            _sync_live(config, registry, acl, url)
            return
        changes = dynsec.rebuild(config, registry)
    finally:
        registry.close()
    for line in changes:
        click.echo(line)
    click.echo(f"{config.plugin_path}: {len(changes)} change{'' if len(changes) == 1 else 's'}")


def _sync_live(config: Config, registry: Registry, acl: dynsec.BrokerAcl, url: str) -> None:
    """``hubd broker sync`` against a running broker (``hubd.auth.broker_sync``): one line per change, then the
    count; status 1 when a DER or system has no broker client (the plugin takes no password hashes live)."""
    hubd, claim, _ = dynsec.accounts(config)
    own = {hubd.username: hubd, f"{hubd.username}-clock": hubd}
    if claim is not None:
        own[claim.username] = claim
    try:
        done = asyncio.run(reconcile(acl, dynsec.build(config, registry), own))
    except dynsec.BrokerAclError as exc:
        raise click.ClickException(str(exc)) from None
    for line in done.lines:
        click.echo(line)
    click.echo(f"{url}: {len(done.lines)} change{'' if len(done.lines) == 1 else 's'}")
    if done.missing:
        raise click.ClickException(
            f"no broker client for {', '.join(done.missing)}: the broker takes a password only in plain text and "
            "the registry keeps it hashed; stop the broker, run `hubd broker sync` (it rebuilds the file with "
            "their passwords), start it again"
        )
