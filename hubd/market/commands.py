"""``hubd group``, ``hubd plan`` and ``hubd series``: the market's own data in the state file, audited."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import orjson

from hubd.audit import AuditLog
from hubd.auth.registry import Registry
from hubd.config import Config, command_config
from hubd.market import jepx, plans, weather
from hubd.market.data import MarketData
from hubd.model import HubError, format_time, now_ms
from hubd.query.buckets import zone
from hubd.services.plan import store_audit


@contextmanager
def _opened(config: Config) -> Iterator[tuple[MarketData, AuditLog]]:
    market = MarketData(config.registry_path)
    audit = AuditLog(config.audit_path, fsync=config.audit.fsync)
    try:
        yield market, audit
    finally:
        audit.close()
        market.close()


def _known_ders(config: Config) -> set[str]:
    registry = Registry(config.registry_path)
    try:
        return set(registry.ders())
    finally:
        registry.close()


def _refuse(audit: AuditLog, event: str, exc: HubError, **fields: object) -> click.ClickException:
    """Audit a refusal and say it as ``<code>: <why>`` (exit status 1)."""
    audit.append(event, exc.code.value, by="operator", reason=exc.message, **fields)
    return click.ClickException(f"{exc.code.value}: {exc.message}")


# -- groups -----------------------------------------------------------------------------------------------


@click.group("group")
def group_group() -> None:
    """Named sets of DERs (a VPP portfolio, a balancing group), usable wherever queries take DER ids."""


@group_group.command("add")
@click.argument("name")
@click.argument("der_ids", nargs=-1, required=True)
@click.pass_context
def group_add(ctx: click.Context, name: str, der_ids: tuple[str, ...]) -> None:
    """Create group NAME with these DERs, or add them to it; every DER must be in the registry."""
    config = command_config(ctx)
    known = _known_ders(config)
    with _opened(config) as (market, audit):
        try:
            added = market.add_group(name, der_ids, known, now_ms())
        except HubError as exc:
            raise _refuse(audit, "group.failed", exc, group=name[:64]) from None
        members = market.groups()[name]
        audit.append("group.added", by="operator", group=name, der_ids=list(der_ids), members=len(members))
    click.echo(f"group {name}: {len(members)} DERs ({added} added)")


@group_group.command("list")
@click.pass_context
def group_list(ctx: click.Context) -> None:
    """Every group and how many DERs it has."""
    with _opened(command_config(ctx)) as (market, _):
        for name, members in market.groups().items():
            click.echo(f"{name}\t{len(members)}")


@group_group.command("show")
@click.argument("name")
@click.pass_context
def group_show(ctx: click.Context, name: str) -> None:
    """One group's DERs, as JSON."""
    with _opened(command_config(ctx)) as (market, _):
        members = market.groups().get(name)
    if members is None:
        raise click.ClickException(f"bad_request: no such group {name!r}")
    click.echo(orjson.dumps({"group": name, "der_ids": list(members)}).decode())


# -- plans ------------------------------------------------------------------------------------------------


@click.group("plan")
def plan_group() -> None:
    """Plans per DER or group per slot (kWh), as the market system uploads them on hub/v1/plan."""


@plan_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tz", default=plans.DEFAULT_TZ, show_default=True, help="the zone of the dates and slots")
@click.pass_context
def plan_import(ctx: click.Context, file: Path, tz: str) -> None:
    """Store the plan in FILE (CSV: der_id or group, date, slot, kwh); a slot planned before is replaced.
    One bad line refuses the whole file (nothing stored)."""
    config = command_config(ctx)
    known = _known_ders(config)
    with _opened(config) as (market, audit):
        audit.append("plan.received", by="operator", file=file.name)
        try:
            entries = plans.entries(plans.read_csv(file.read_bytes()), zone(tz, "--tz"), known, market.groups())
            replaced = market.store_plans(entries, "operator", now_ms())
        except HubError as exc:
            raise _refuse(audit, "plan.failed", exc, file=file.name) from None
        revised = store_audit(audit, entries, replaced, by="operator", file=file.name)
    click.echo(f"{len(entries)} plan entries stored ({revised} replaced an earlier plan)")


# -- series -----------------------------------------------------------------------------------------------


@click.group("series")
def series_group() -> None:
    """External series beside the readings: JEPX spot prices, weather."""


@series_group.command("import")
@click.argument("kind", type=click.Choice(["jepx", "weather"]))
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--place", help="weather: the DER area (location.area) it is for")
@click.pass_context
def series_import(ctx: click.Context, kind: str, file: Path, place: str | None) -> None:
    """Import FILE: a JEPX spot CSV (Shift_JIS or UTF-8), or hourly weather (Open-Meteo JSON or CSV). Values
    already stored for the same place, quantity and time are replaced, so importing again changes nothing."""
    if kind == "weather" and not place:
        raise click.UsageError("weather needs --place (the DER area it is for)")
    with _opened(command_config(ctx)) as (market, audit):
        try:
            data = file.read_bytes()
            points = jepx.parse(data) if kind == "jepx" else weather.parse(data, str(place))
            stored = market.replace_series(kind, points, f"file:{file.name}", now_ms())
        except HubError as exc:
            raise _refuse(audit, "series.failed", exc, kind=kind, file=file.name) from None
        places = sorted({p.place for p in points})
        first, last = min(p.start for p in points), max(p.end for p in points)
        audit.append(
            "series.imported", by="operator", kind=kind, file=file.name, values=stored, places=places,
            start=format_time(first), end=format_time(last),
        )  # fmt: skip
    click.echo(f"{stored} values of {kind} stored for {', '.join(places)}, {format_time(first)} … {format_time(last)}")


@series_group.command("list")
@click.pass_context
def series_list(ctx: click.Context) -> None:
    """Every stored series: kind, place, quantity, values, first and last time."""
    with _opened(command_config(ctx)) as (market, _):
        for kind, place, quantity, count, first, last in market.series_summary():
            click.echo(f"{kind}\t{place}\t{quantity}\t{count}\t{format_time(first)}\t{format_time(last)}")
