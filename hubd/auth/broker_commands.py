"""``hubd broker``: the broker's access control (``hubd.auth.dynsec``) from the command line, and the live changes
the registry commands (rotate, revoke, reset, system add) make at the broker."""

from __future__ import annotations

import asyncio
from typing import Any

import click
from msgspec.structs import replace

from hubd.auth import dynsec
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
    if config.broker.access_control != "dynsec":
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
    """Rebuild the broker's dynamic-security file from the registry and say what changed.

    Run it with the broker stopped (a running broker reads the file only when it starts, and writes over it on
    its next change); the embedded broker's file is rebuilt at every start of hubd by itself."""
    config = command_config(ctx)
    if output is not None:
        config = replace(config, broker=replace(config.broker, plugin_file=output))
    if config.broker.access_control != "dynsec":
        raise click.ClickException("broker.access_control is not dynsec: the broker keeps no access control of hubd's")
    registry = Registry(config.registry_path)
    try:
        changes = dynsec.rebuild(config, registry)
    finally:
        registry.close()
    for line in changes:
        click.echo(line)
    click.echo(f"{config.plugin_path}: {len(changes)} change{'' if len(changes) == 1 else 's'}")
