"""The ``hubd`` command: run the daemon, try the demo, and operate the registry, audit and store."""

from __future__ import annotations

import asyncio
import csv
import getpass
import re
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click
import orjson
from loguru import logger

from hubd import audit as audit_trail
from hubd import progress
from hubd.audit import AuditError, AuditLog
from hubd.auth import dynsec
from hubd.auth.broker_commands import broker_group, refuse_taken, tell_broker
from hubd.auth.credentials import hash_password, issue_password
from hubd.auth.registry import Der, Registry, read_der_csv
from hubd.clock.commands import time_group
from hubd.config import Config, ConfigError, load_config
from hubd.decode.vendor.commands import format_group
from hubd.edge import edge_group
from hubd.market import settle
from hubd.market.commands import group_group, plan_group, series_group
from hubd.market.data import MarketData
from hubd.market.data import groups_of as market_groups
from hubd.market.groups import expand as expand_groups
from hubd.model import DER_TYPES, FIELDS, HubError, format_time, now_ms, visible
from hubd.quarantine import Quarantine, masked
from hubd.query.buckets import INTERVALS_MS
from hubd.query.conditions import Names, Query, decode_cursor, parse_query
from hubd.query.execute import columns as query_columns
from hubd.query.execute import run as run_query
from hubd.sources.commands import source_group
from hubd.store import ReadingQuery
from hubd.store.commands import store_group
from hubd.store.factory import open_query


def setup_logging(level: str) -> None:
    logger.remove()
    # diagnose=False: loguru would otherwise print the values of local variables in a traceback, and those
    # include payloads and passwords.
    logger.add(sys.stderr, level=level, format="{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}", diagnose=False)


class Context:
    """What every subcommand needs: the validated config, loaded once."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as exc:
                raise ConfigProblem(str(exc)) from None
        return self._config

    @contextmanager
    def registry(self) -> Iterator[tuple[Registry, AuditLog]]:
        registry = Registry(self.config.registry_path)
        audit = AuditLog(self.config.audit_path, fsync=self.config.audit.fsync)
        try:
            yield registry, audit
        finally:
            audit.close()
            registry.close()


pass_context = click.make_pass_decorator(Context)

_CONFIG_HELP = "hubd.yaml (default: $HUBD_CONFIG, else the embedded default)"


def _config_after(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """``--config`` given after the subcommand: it wins over one given before it (or in ``HUBD_CONFIG``)."""
    context = ctx.find_object(Context)
    if value is not None and context is not None:
        context.config_path = value


def _config_everywhere(group: click.Group) -> None:
    """Give every command below ``group`` its own ``--config``, so ``hubd der list --config x`` works too.

    People put an option where they see the command, as the README's "all commands take --config" invites;
    only the group's own option would make click answer "No such option" there.
    """
    for command in group.commands.values():
        option = click.Option(
            ["--config"],
            type=click.Path(dir_okay=False),
            expose_value=False,
            callback=_config_after,
            help=_CONFIG_HELP,
        )
        command.params.append(option)
        if isinstance(command, click.Group):
            _config_everywhere(command)


#: The exit status of a mistake in the configuration or in the host's setup (EX_CONFIG of sysexits.h): a
#: command failing for an ordinary reason exits with 1 and a usage error with 2 (click's); docs/operations.md.
EXIT_CONFIG = 78


class ConfigProblem(click.ClickException):
    """hubd.yaml or the host must change before hubd can run (a bad key, Mosquitto missing, its port taken).

    Its own exit status lets the systemd unit tell it from a failure worth retrying (RestartPreventExitStatus=),
    instead of restarting into the same error every few seconds.
    """

    exit_code = EXIT_CONFIG


class _Group(click.Group):
    """Turns the errors an operator can act on into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from hubd.broker import BrokerNotInstalled, BrokerNotStarted, BrokerUnreachable, DataDirInUse, PortInUse

        try:
            return super().invoke(ctx)
        except AuditError as exc:
            raise click.ClickException(f"audit trail: {exc}") from None
        except (ConfigError, BrokerNotInstalled, PortInUse, DataDirInUse) as exc:
            raise ConfigProblem(str(exc)) from None
        except (BrokerNotStarted, BrokerUnreachable) as exc:
            raise click.ClickException(str(exc)) from None
        except (
            FileExistsError,
            FileNotFoundError,
            NotADirectoryError,
            PermissionError,
            sqlite3.OperationalError,
        ) as exc:
            # hubd's files unusable: another user's (an operator command run without `sudo -u hubd`), or in the way
            raise click.ClickException(_unusable(ctx.obj, exc)) from None


def _unusable(context: object, exc: Exception) -> str:
    """One line for files this user cannot use, naming the data directory where the config is known."""
    what = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
    config = getattr(context, "_config", None)
    if config is None:
        return f"cannot use hubd's files: {what}"
    owner = ": is hubd run as its owner?" if isinstance(exc, PermissionError) or "readonly" in str(exc) else ""
    return f"cannot use hubd's files: {what} (data_dir {config.data_path}{owner})"


@click.group(cls=_Group)
@click.option(
    "--config",
    "config_path",
    envvar="HUBD_CONFIG",
    type=click.Path(dir_okay=False),
    help=_CONFIG_HELP,
)
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """hubd: an IoT hub for the power data of distributed energy resources."""
    ctx.obj = Context(config_path)


@main.command()
@pass_context
def run(ctx: Context) -> None:
    """Run the hub until SIGTERM or Ctrl-C."""
    from hubd.app import Hub

    config = ctx.config
    setup_logging(config.log.level)
    asyncio.run(Hub(config).run())


@main.command()
@click.option(
    "--minutes",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="minutes of readings the edge terminal sends",
)
@click.option(
    "--port", default=0, type=click.IntRange(0, 65535), help="port for the embedded broker (default: a free one)"
)
@click.option("--keep", is_flag=True, help="leave the hub running afterwards (its status page too) until Ctrl-C")
def demo(minutes: int, port: int, keep: bool) -> None:
    """Run the hub on the embedded default with a simulated edge terminal and market system."""
    from hubd.demo import run_demo

    setup_logging("WARNING")
    sys.exit(run_demo(minutes=minutes, port=port, keep=keep))


@main.command()
@click.option("--url", help="the hub's listener, e.g. http://127.0.0.1:8780/ (default: from http.bind)")
@pass_context
def status(ctx: Context, url: str | None) -> None:
    """Ask the running hub how it is: exit 0 ready, 1 answering but not ready, 3 not answering."""
    from hubd.ops.status import report

    code, text = report(url or ctx.config.http.url)
    click.echo(text)
    sys.exit(code)


@main.command("hash-password")
def hash_password_command() -> None:
    """Hash an initial password for auth.initial_password_hash (reads it from the terminal or stdin)."""
    password = getpass.getpass("initial password: ") if sys.stdin.isatty() else sys.stdin.readline().strip()
    if len(password) < 12:
        raise click.ClickException("use at least 12 characters")
    click.echo(hash_password(password, 12))


# -- DERs ----------------------------------------------------------------------------------------------


@main.group()
def der() -> None:
    """Pre-register and manage DERs."""


@der.command("add")
@click.argument("der_id")
@click.option("--type", "der_type", type=click.Choice(DER_TYPES))
@click.option("--name")
@click.option("--maker")
@click.option("--model")
@click.option("--area")
@click.option("--lat", type=float)
@click.option("--lon", type=float)
@click.option("--capacity-kw", type=float)
@pass_context
def der_add(ctx: Context, /, der_id: str, der_type: str | None, **meta: Any) -> None:
    """Put DER_ID on the allowlist (or update its details)."""
    with ctx.registry() as (registry, audit), _errors():
        record = registry.add_der(der_id, now_ms(), {"type": der_type, **meta})
        audit.append("der.added", der_id=der_id, by="operator")
    click.echo(orjson.dumps(_details(record)).decode())


@der.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_context
def der_import(ctx: Context, file: Path) -> None:
    """Add DERs from a CSV file with a der_id column and any of type,name,maker,model,capacity_kw,lat,lon,area."""
    with ctx.registry() as (registry, audit), _errors():
        with progress.each(read_der_csv(file), "importing DERs") as rows:
            count = registry.import_ders(rows, now_ms())
        audit.append("der.imported", der_count=count, file=file.name, by="operator")
    click.echo(f"{count} DERs imported")


@der.command("list")
@click.option("--status", type=click.Choice(["allowed", "registered", "revoked"]))
@pass_context
def der_list(ctx: Context, status: str | None) -> None:
    """List DERs (one per line: id, type, status, area)."""
    with ctx.registry() as (registry, _):
        for record in sorted(registry.ders().values(), key=lambda d: d.der_id):
            if status is None or record.status == status:
                fields = (record.der_id, record.type, record.status, record.area or "-")
                click.echo("\t".join(visible(field) for field in fields))


@der.command("show")
@click.argument("der_id")
@pass_context
def der_show(ctx: Context, der_id: str) -> None:
    """Show one DER's details (never its password)."""
    with ctx.registry() as (registry, _):
        record = registry.der(der_id)
    if record is None:
        raise click.ClickException(f"no DER {der_id}")
    click.echo(orjson.dumps(_details(record), option=orjson.OPT_INDENT_2).decode())


@der.command("reset")
@click.argument("der_id")
@click.option("--reinstate", is_flag=True, help="Also lift a revocation (a revoked DER is refused without it).")
@pass_context
def der_reset(ctx: Context, der_id: str, reinstate: bool) -> None:
    """Forget DER_ID's unique password: it may register again with the initial password."""
    with ctx.registry() as (registry, audit):
        record = registry.der(der_id)
        if record is None:
            raise click.ClickException(f"no DER {der_id}")
        if record.status == "revoked" and not reinstate:  # a revocation is lifted on purpose, never by the way
            raise click.ClickException(f"{der_id} is revoked; to lift that too: hubd der reset {der_id} --reinstate")
        registry.set_der_password(der_id, None, "allowed")
        registry.set_broker_record("der:" + der_id, None)
        if record.status == "revoked":
            audit.append("der.reinstated", der_id=der_id, by="operator")
        audit.append("password.reset", der_id=der_id, by="operator")
        tell_broker(ctx.config, registry, dynsec.delete_commands(der_id), der_id, "der")
    click.echo(f"{der_id}: reset; it may register again with the initial password")


@der.command("rotate")
@click.argument("der_id")
@pass_context
def der_rotate(ctx: Context, der_id: str) -> None:
    """Issue DER_ID a new unique password and print it once; the old one stops working at once."""
    with ctx.registry() as (registry, audit):
        record = registry.der(der_id)
        if record is None:
            raise click.ClickException(f"no DER {der_id}")
        if record.status == "revoked":
            raise click.ClickException(
                f"DER {der_id} is revoked; `hubd der reset {der_id} --reinstate` lifts that, then it registers again"
            )
        refuse_taken(ctx.config, registry, der_id, "der")
        password = issue_password()
        registry.set_der_password(der_id, hash_password(password, _rounds(ctx)), "registered")
        registry.set_broker_record("der:" + der_id, dynsec.password_record(password))
        audit.append("password.rotated", der_id=der_id, by="operator")
        principal = dynsec.der_principal(ctx.config.topic_prefix, der_id)
        click.echo(password)  # before the broker is told: stored already, it must not be lost if the broker is away
        tell_broker(ctx.config, registry, dynsec.create_commands(principal, password), der_id, "der")


@der.command("revoke")
@click.argument("der_id")
@pass_context
def der_revoke(ctx: Context, der_id: str) -> None:
    """Refuse all data and registration from DER_ID from now on."""
    with ctx.registry() as (registry, audit):
        if not registry.set_der_password(der_id, None, "revoked"):
            raise click.ClickException(f"no DER {der_id}")
        audit.append("der.revoked", der_id=der_id, by="operator")
        tell_broker(ctx.config, registry, [{"command": "disableClient", "username": der_id}], der_id, "der")
    click.echo(f"{der_id}: revoked")


# -- systems -------------------------------------------------------------------------------------------


@main.group()
def system() -> None:
    """Systems that are not DERs: gateways, consumers (the market system), planners and viewers."""


@system.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["gateway", "consumer", "viewer", "planner"]), required=True)
@pass_context
def system_add(ctx: Context, name: str, role: str) -> None:
    """Create a system and print its password once."""
    password = issue_password()
    with ctx.registry() as (registry, audit), _errors():
        refuse_taken(ctx.config, registry, name, "system")
        registry.add_system(name, role, hash_password(password, _rounds(ctx)), now_ms())  # type: ignore[arg-type]
        registry.set_broker_record("system:" + name, dynsec.password_record(password))
        audit.append("system.added", client_id=name, role=role, by="operator")
        audit.append("password.issued", client_id=name, by="operator")
        principal = dynsec.system_principal(ctx.config.topic_prefix, name, role)
        click.echo(password)  # before the broker is told: stored already, it must not be lost if the broker is away
        tell_broker(ctx.config, registry, dynsec.create_commands(principal, password), name, "system")


@system.command("list")
@pass_context
def system_list(ctx: Context) -> None:
    """List systems (name, role, status; for a gateway, how many DERs are bound to it)."""
    with ctx.registry() as (registry, _):
        bound = registry.bindings()
        for item in sorted(registry.systems().values(), key=lambda s: s.name):
            count = len(bound.get(item.name, ()))
            ders = f"\t{count} DER{'' if count == 1 else 's'}" if item.role == "gateway" else ""
            click.echo(f"{visible(item.name)}\t{item.role}\t{item.status}{ders}")


@system.command("bind")
@click.argument("gateway")
@click.argument("der_ids", nargs=-1, required=True)
@pass_context
def system_bind(ctx: Context, gateway: str, der_ids: tuple[str, ...]) -> None:
    """Let a gateway system write these DERs' readings without their passwords (docs/protocol.md)."""
    _bind(ctx, gateway, der_ids, True)


@system.command("unbind")
@click.argument("gateway")
@click.argument("der_ids", nargs=-1, required=True)
@pass_context
def system_unbind(ctx: Context, gateway: str, der_ids: tuple[str, ...]) -> None:
    """No longer let a gateway system write these DERs' readings."""
    _bind(ctx, gateway, der_ids, False)


def _bind(ctx: Context, gateway: str, der_ids: tuple[str, ...], bound: bool) -> None:
    with ctx.registry() as (registry, audit), _errors():
        changed = registry.bind(gateway, der_ids, bound)
        event = "system.bound" if bound else "system.unbound"
        audit.append(event, client_id=gateway, der_ids=sorted(der_ids), by="operator")
    click.echo(f"{gateway}: {changed} DER{'' if changed == 1 else 's'} {'bound' if bound else 'unbound'}")


@system.command("revoke")
@click.argument("name")
@pass_context
def system_revoke(ctx: Context, name: str) -> None:
    """Refuse the system from now on."""
    with ctx.registry() as (registry, audit):
        if not registry.revoke_system(name):
            raise click.ClickException(f"no system {name}")
        audit.append("system.revoked", client_id=name, by="operator")
        tell_broker(ctx.config, registry, [{"command": "disableClient", "username": name}], name, "system")
    click.echo(f"{name}: revoked")


# -- quarantine ----------------------------------------------------------------------------------------


@main.group()
def quarantine() -> None:
    """Payloads the hub could not take: the first bytes of each (limits.quarantine_max_bytes), its size and hash."""


@quarantine.command("list")
@click.option("-n", "limit", default=50, show_default=True, type=click.IntRange(min=1))
@pass_context
def quarantine_list(ctx: Context, limit: int) -> None:
    """The newest quarantined payloads: id, time, topic, code, size (and the bytes kept of a cut one), reason."""
    store = Quarantine(ctx.config.registry_path)
    for row in store.list(limit):
        size = f"{row['size']} B" if row["kept"] == row["size"] else f"{row['size']} B, cut to {row['kept']}"
        click.echo(
            f"{row['id']}\t{format_time(row['received_at'])}\t{visible(row['topic'])}\t{row['code']}\t"
            f"{size}\t{visible(row['reason'])}"
        )
    store.close()


@quarantine.command("show")
@click.argument("entry_id", type=int)
@click.option("--raw", is_flag=True, help="write the kept payload bytes to stdout, nothing else (passwords included)")
@pass_context
def quarantine_show(ctx: Context, entry_id: int, raw: bool) -> None:
    """One quarantined payload with its details (size, bytes kept, SHA-256 of the whole); password values in it
    are shown as ***."""
    store = Quarantine(ctx.config.registry_path)
    found = store.get(entry_id)
    store.close()
    if found is None:
        raise click.ClickException(f"no quarantine entry {entry_id}")
    meta, payload = found
    if raw:
        sys.stdout.buffer.write(payload)
        return
    meta["received_at"] = format_time(meta["received_at"])
    click.echo(orjson.dumps(meta, option=orjson.OPT_INDENT_2).decode())
    if meta["kept"] < meta["size"]:
        click.echo(
            f"The payload was cut: its first {meta['kept']} of {meta['size']} bytes are kept "
            "(limits.quarantine_max_bytes); sha256 is that of the whole payload."
        )
    click.echo(masked(payload.decode("utf-8", errors="backslashreplace"))[:4000])


# -- query ---------------------------------------------------------------------------------------------


_WHERE = re.compile(r"^\s*(\w+)\s*(>=|<=|!=|==|=|>|<)\s*(\S+)\s*$")
_WHERE_OPS = {">": "gt", ">=": "gte", "<": "lt", "<=": "lte", "=": "eq", "==": "eq", "!=": "ne"}
# The options as the user types them, so an error names ``--start``, not the JSON condition ``start``.
_OPTION_NAMES = Names(
    {
        "start": "--start",
        "end": "--end",
        "at": "--at",
        "at_tolerance_s": "--tolerance",
        "der_ids": "--der",
        "types": "--type",
        "areas": "--area",
        "bbox": "--bbox",
        "fields": "--field",
        "where": "--where",
        "interval": "--interval",
        "agg": "--agg",
        "tz": "--tz",
        "groups": "--group",
        "max_gap_s": "--max-gap",
        "weather": "--weather",
    }
)


def _query_request(options: dict[str, Any]) -> dict[str, Any]:
    """Turn the command's options into the same request the market system sends over MQTT."""
    request: dict[str, Any] = {}
    for key in ("start", "end", "at", "interval", "tz"):
        if options[key] is not None:
            request[key] = options[key]
    if options["tolerance"] is not None:
        request["at_tolerance_s"] = options["tolerance"]
    for key, option in (("der_ids", "der_ids"), ("types", "types"), ("areas", "areas"), ("fields", "fields")):
        if options[option]:
            request[key] = list(options[option])
    if options["bbox"]:
        try:
            request["bbox"] = [float(v) for v in options["bbox"].split(",")]
        except ValueError:
            request["bbox"] = []
        if len(request["bbox"]) != 4:
            raise click.BadParameter("use min_lon,min_lat,max_lon,max_lat", param_hint="--bbox")
    where: dict[str, dict[str, float]] = {}
    for text in options["where"]:
        match = _WHERE.match(text)
        if not match:
            raise click.BadParameter(f"{text!r}: use FIELD OP NUMBER, e.g. 'power_kw>=1'", param_hint="--where")
        try:
            where.setdefault(match[1], {})[_WHERE_OPS[match[2]]] = float(match[3])
        except ValueError:
            raise click.BadParameter(f"{text!r}: {match[3]!r} is not a number", param_hint="--where") from None
    if where:
        request["where"] = where
    agg: dict[str, list[str]] = {}
    for text in options["agg"]:
        field, _, how = text.partition("=")
        if not how:
            raise click.BadParameter(f"{text!r}: use FIELD=AGGREGATION, e.g. energy_kwh=delta", param_hint="--agg")
        agg.setdefault(field, []).append(how)
    if agg:  # one aggregation of a field as a plain string, the shape most requests on the wire have
        request["agg"] = {field: hows[0] if len(set(hows)) == 1 else hows for field, hows in agg.items()}
    return request


@main.command()
@click.option("--start", help="RFC 3339 with an offset, inclusive")
@click.option("--end", help="RFC 3339 with an offset, exclusive")
@click.option("--at", help="one instant instead of --start/--end")
@click.option("--tolerance", type=float, help="seconds either side of --at (nearest reading per DER)")
@click.option("--der", "der_ids", multiple=True, help="a DER id (repeatable)")
@click.option("--type", "types", multiple=True, type=click.Choice(DER_TYPES), help="a DER type (repeatable)")
@click.option("--area", "areas", multiple=True, help="an area (repeatable)")
@click.option("--bbox", help="min_lon,min_lat,max_lon,max_lat of the registered location")
@click.option("--field", "fields", multiple=True, type=click.Choice(FIELDS), help="a field (repeatable)")
@click.option("--where", multiple=True, help="a value condition such as 'power_kw>=1' (repeatable, AND)")
@click.option("--interval", type=click.Choice(list(INTERVALS_MS)), help="bucket the readings")
@click.option(
    "--agg",
    multiple=True,
    help="FIELD=mean|min|max|sum|first|last|count|delta (repeatable; a field aggregated several ways gets a "
    "column FIELD_AGGREGATION for each)",
)
@click.option("--tz", help="IANA zone for bucket alignment and slots (default UTC)")
@click.option("--limit", default=0, type=click.IntRange(min=0), help="stop after this many rows (default: all)")
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json", show_default=True)
@click.option("--table", is_flag=True, help="with --interval: a DER × bucket table of the first aggregated column")
@click.option("--group", "groups", multiple=True, help="the DERs of a group (repeatable)")
@click.option("--view", type=click.Choice(["settlement"]), help="per DER or group per slot: actual, plan, price")
@click.option("--max-gap", type=float, help="--view settlement: seconds between register readings still complete")
@click.option("--weather", is_flag=True, help="--view settlement: the weather of the DER's area per slot")
@pass_context
def query(ctx: Context, /, **options: Any) -> None:
    """Extract readings from the store with the conditions of the market system's queries.

    A --der the registry does not know is named on stderr and left out; when no --der is known, the
    command fails. Exit status: 0 when the query ran (even with no rows), 1 when it was refused, 2 for
    options it could not read.
    """
    request = _query_request(options)
    if options["groups"]:
        request["groups"] = list(options["groups"])
    if options["view"]:
        _settlement(ctx, request, options)
        return
    if options["table"] and not request.get("interval"):
        raise click.UsageError("--table needs --interval")
    registry = Registry(ctx.config.registry_path)
    store = open_query(ctx.config)
    try:
        with _errors():
            limit = ctx.config.query.max_limit
            known = market_groups(ctx.config)
            conditions = expand_groups({**request, "limit": limit}, known, "--group")
            parsed = parse_query(conditions, ctx.config.query, registry.ders(), _OPTION_NAMES)
            rows = _all_pages(parsed, store, options["limit"])
    finally:
        store.close()
        registry.close()
    if options["table"]:
        _unknown(parsed.unknown_der_ids)
        _print_table(rows, parsed.columns[0][2], parsed.tz)
    else:
        _print_rows(rows, query_columns(parsed), options["fmt"], parsed.unknown_der_ids)
    with AuditLog(ctx.config.audit_path) as audit:
        audit.append("query.extracted", by="operator", rows=len(rows), conditions=request)


def _settlement(ctx: Context, request: dict[str, Any], options: dict[str, Any]) -> None:
    """``hubd query --view settlement``: hubd.market.settle, every page, as JSON lines or CSV."""
    request = {**request, "view": "settlement", "limit": ctx.config.query.max_limit}
    if options["max_gap"] is not None:
        request["max_gap_s"] = options["max_gap"]
    if options["weather"]:
        request["weather"] = True
    registry, market = Registry(ctx.config.registry_path), MarketData(ctx.config.registry_path)
    store = open_query(ctx.config)
    rows: list[dict[str, Any]] = []
    try:
        with _errors():
            ders = registry.ders()
            parsed = settle.parse(request, ctx.config.query, ctx.config.market, ders, market.groups(), _OPTION_NAMES)
            while True:
                answer = settle.settle(parsed, store, market, ders, ctx.config.market)
                rows += answer["rows"]
                if answer["next_cursor"] is None or (options["limit"] and len(rows) >= options["limit"]):
                    break
                parsed = replace(parsed, cursor=settle.parse_cursor(answer["next_cursor"]))
            rows = rows[: options["limit"] or None]
    finally:
        market.close()
        store.close()
        registry.close()
    _print_rows(rows, [*parsed.columns, "members"], options["fmt"], parsed.unknown_der_ids)
    with AuditLog(ctx.config.audit_path) as audit:
        audit.append("query.extracted", by="operator", view="settlement", rows=len(rows), conditions=request)


def _unknown(der_ids: Sequence[str]) -> None:
    if der_ids:
        click.echo(f"unknown DER, left out: {', '.join(der_ids)}", err=True)


def _print_rows(rows: list[dict[str, Any]], columns: Sequence[str], fmt: str, unknown: Sequence[str]) -> None:
    """A query's rows on stdout, as CSV (header always) or JSON lines; unknown DER ids named on stderr."""
    _unknown(unknown)
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, columns)
        writer.writeheader()
        writer.writerows(rows)
    else:
        for row in rows:
            click.echo(orjson.dumps(row).decode())


def _all_pages(parsed: Query, store: ReadingQuery, limit: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    shown = progress.Counter("rows read")  # on a terminal only (a large query written to a file takes a while)
    while True:
        answer = run_query(parsed, store)
        rows += answer["rows"]
        shown(len(rows))
        if answer["next_cursor"] is None or (limit and len(rows) >= limit):
            shown.done()
            return rows[:limit] if limit else rows
        parsed = replace(parsed, cursor=decode_cursor(answer["next_cursor"], parsed.mode))


def _print_table(rows: list[dict[str, Any]], field: str, tz: ZoneInfo) -> None:
    """DER by bucket at a glance: one line per DER, one column per bucket (slot number for 30m)."""
    columns: dict[str, str] = {}
    for row in rows:
        start = datetime.fromisoformat(row["bucket_start"]).astimezone(tz)
        columns[row["bucket_start"]] = str(row["slot"]) if "slot" in row else start.strftime("%m-%d %H:%M")
    ordered = sorted(columns)
    cells: dict[str, dict[str, str]] = {}
    for row in rows:
        value = row.get(field)
        cells.setdefault(row["der_id"], {})[row["bucket_start"]] = "" if value is None else f"{value:.3f}"
    width = max([9, *(len(v) for line in cells.values() for v in line.values()), *map(len, columns.values())])
    name_width = max([6, *map(len, cells)])
    click.echo(f"{field} by {'slot' if rows and 'slot' in rows[0] else 'bucket'} ({tz.key})")
    click.echo("DER".ljust(name_width) + "".join(columns[c].rjust(width + 1) for c in ordered))
    for der_id, line in cells.items():
        click.echo(der_id.ljust(name_width) + "".join(line.get(c, "-").rjust(width + 1) for c in ordered))


# -- audit ---------------------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """The tamper-evident event log."""


@audit.command("verify")
@click.option("--file", "file", type=click.Path(path_type=Path), help="an audit log (default: the hub's)")
@pass_context
def audit_verify(ctx: Context, file: Path | None) -> None:
    """Check the hash chain; exit 1 naming the first bad record."""
    path = file or ctx.config.audit_path
    with progress.bar(path.stat().st_size if path.exists() else 0, "checking the chain") as reached:
        report = audit_trail.verify(path, reached)
    if report.ok:
        click.echo(f"ok: {report.records} records, chain intact")
        return
    click.echo(f"BROKEN: {report.reason}", err=True)
    sys.exit(1)


@audit.command("tail")
@click.option("-n", "count", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--der", "der_id")
@click.option("--event")
@pass_context
def audit_tail(ctx: Context, count: int, der_id: str | None, event: str | None) -> None:
    """The last records, optionally for one DER or one event type (prefix)."""
    if not ctx.config.audit_path.exists():
        raise click.ClickException(f"no audit trail at {ctx.config.audit_path} yet: the hub has not run there")
    for record in audit_trail.tail(ctx.config.audit_path, count, der_id=der_id, event=event):
        click.echo(orjson.dumps(record).decode())


main.add_command(format_group)
main.add_command(time_group)
main.add_command(store_group)
main.add_command(edge_group)
main.add_command(source_group)
main.add_command(broker_group)
main.add_command(group_group)
main.add_command(plan_group)
main.add_command(series_group)
_config_everywhere(main)  # last: after every command is added


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except HubError as exc:
        raise click.ClickException(exc.message) from None


def _details(record: Der) -> dict[str, Any]:
    """A DER as an operator reads it: no password hash, times in UTC."""
    details = record.public()
    for key in ("added_at", "registered_at"):
        if details[key] is not None:
            details[key] = format_time(details[key])
    return details


def _rounds(ctx: Context) -> int:
    return ctx.config.auth.bcrypt_rounds


if __name__ == "__main__":
    main()
