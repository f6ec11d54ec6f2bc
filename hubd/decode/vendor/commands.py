"""``hubd format ...``: list, show, add, remove and try out vendor format definitions."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import click
import orjson

from hubd import decode
from hubd.audit import AuditLog
from hubd.config import Config, command_config
from hubd.decode.registry import Decoder, Limits
from hubd.decode.vendor.catalog import Catalog
from hubd.decode.vendor.language import DefinitionError
from hubd.decode.vendor.load import SUFFIXES, load_definition
from hubd.model import HubError, format_time, now_ms, parse_time

NATIVE = "hub.v1"


def _catalog(config: Config) -> Catalog:
    catalog = Catalog([config.formats_shipped_path, config.formats_user_path], register=False)
    catalog.scan()
    return catalog


def _origin(config: Config, path: Path) -> str:
    return "user" if path.parent.resolve() == config.formats_user_path.resolve() else "shipped"


@click.group("format")
def format_group() -> None:
    """Vendor payload formats: definitions by format code (hub/v1/data/<code>)."""


@format_group.command("list")
@click.pass_context
def format_list(ctx: click.Context) -> None:
    """The format codes (code, kind, shipped or user, description), then refused definitions."""
    config = command_config(ctx)
    catalog = _catalog(config)
    click.echo(f"{NATIVE}\tjson\tbuilt-in\tthe hub's native format (docs/protocol.md)")
    for code in sorted(catalog.active):
        definition = catalog.active[code]
        origin = _origin(config, definition.path)
        click.echo(f"{code}\t{definition.kind}\t{origin}\t{definition.description}")
    for path, reason in sorted(catalog.errors().items()):
        click.echo(f"REFUSED\t{path.name}\t{reason}")


@format_group.command("show")
@click.argument("code")
@click.pass_context
def format_show(ctx: click.Context, code: str) -> None:
    """The definition of CODE as it is loaded, with its file."""
    if code == NATIVE:
        click.echo(f"# {NATIVE} is built into the hub: see docs/protocol.md")
        return
    definition = _catalog(command_config(ctx)).find(code)
    if definition is None:
        raise click.ClickException(f"no format {code!r} (see hubd format list)")
    click.echo(f"# {definition.path}")
    click.echo(definition.text.rstrip("\n"))


@format_group.command("add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
def format_add(ctx: click.Context, file: Path) -> None:
    """Check FILE (named <code>.yaml) and copy it, with the map files it reads, into the user folder.

    A running hub loads it within formats.poll_s seconds; a definition of the same code is replaced.
    """
    config = command_config(ctx)
    try:
        definition = load_definition(file)
    except DefinitionError as exc:
        raise click.ClickException(f"refused: {exc}") from None
    folder = config.formats_user_path
    folder.mkdir(parents=True, exist_ok=True)
    # Map files first, so the hub never sees the definition without them; each file replaced atomically.
    for source in [*definition.depends, file]:
        target = folder / source.name
        if source.resolve() == target.resolve():
            continue
        temporary = folder / f".{source.name}.{os.getpid()}.tmp"
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    with AuditLog(config.audit_path, fsync=config.audit.fsync) as audit:
        audit.append("format.added", code=definition.code, file=str(folder / file.name), by="operator")
    click.echo(f"{definition.code}: added to {folder}; a running hub loads it within {config.formats.poll_s:g} s")


@format_group.command("remove")
@click.argument("code")
@click.pass_context
def format_remove(ctx: click.Context, code: str) -> None:
    """Remove the user definition of CODE (its map files stay). A running hub drops it within poll_s."""
    config = command_config(ctx)
    found = [config.formats_user_path / (code + suffix) for suffix in SUFFIXES]
    found = [path for path in found if path.exists()]
    if not found:
        shipped = any((config.formats_shipped_path / (code + suffix)).exists() for suffix in SUFFIXES)
        if shipped or code == NATIVE:
            raise click.ClickException(
                f"{code!r} comes with hubd and is not removed; a user definition of the same code overrides it"
            )
        raise click.ClickException(f"no user definition {code!r} in {config.formats_user_path}")
    for path in found:
        path.unlink()
    with AuditLog(config.audit_path, fsync=config.audit.fsync) as audit:
        audit.append("format.deleted", code=code, file=str(found[0]), by="operator")
    click.echo(f"{code}: removed from {config.formats_user_path}")


@format_group.command("test")
@click.argument("definition")
@click.argument("sample", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-p", "--property", "properties", multiple=True, help="an MQTT v5 user property KEY=VALUE (repeatable)")
@click.option("--now", help="the hub's clock for the test, RFC 3339 (default: now)")
@click.pass_context
def format_test(
    ctx: click.Context, definition: str, sample: Path, properties: tuple[str, ...], now: str | None
) -> None:
    """Decode SAMPLE with DEFINITION (a file, or a loaded format code) and print the readings.

    Readings print as JSON lines (without passwords); a refused reading prints its index and why; a sample
    that cannot be decoded at all prints why. Exit status 1 when anything was refused.
    """
    config = command_config(ctx)
    decoder = _decoder(config, definition)
    props: dict[str, str] = {}
    for pair in properties:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r}: use KEY=VALUE", param_hint="--property")
        props[key] = value
    try:
        clock = parse_time(now, "--now") if now else now_ms()
    except HubError as exc:
        raise click.BadParameter(exc.message, param_hint="--now") from None
    limits = Limits(clock, int(config.limits.max_future_s * 1000), config.limits.max_readings_per_message, props)
    try:
        decoded = decoder(sample.read_bytes(), limits)
    except HubError as exc:
        click.echo(f"{sample.name}: {exc.code.value}: {exc.message}")
        sys.exit(1)
    refused = 0
    for index, item in enumerate(decoded.items):
        if isinstance(item, HubError):
            refused += 1
            body: dict[str, Any] = {"index": index, "der_id": item.der_id, "error": item.as_dict()}
        else:
            body = {"der_id": item.der_id, "measured_at": format_time(item.measured_at), **item.values}
        click.echo(orjson.dumps(body).decode())
    readings = len(decoded.items) - refused
    source = f", source_id {decoded.source_id}" if decoded.source_id else ""
    click.echo(f"{readings} readings, {refused} refused{source}", err=True)
    if refused:
        sys.exit(1)


def _decoder(config: Config, name: str) -> Decoder:
    path = Path(name)
    if path.suffix in SUFFIXES and path.exists():
        try:
            return load_definition(path).decoder
        except DefinitionError as exc:
            raise click.ClickException(f"refused: {exc}") from None
    if name == NATIVE:
        return decode.decoder_for(NATIVE)
    found = _catalog(config).find(name)
    if found is None:
        raise click.ClickException(f"{name!r} is neither a definition file nor a loaded format code")
    return found.decoder
