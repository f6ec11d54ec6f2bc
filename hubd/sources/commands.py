"""``hubd source ...``: the sources the hub polls itself (docs/operations.md, Modbus sources).

``list`` and ``test`` need only the config (``test`` polls the device once from this process, storing
nothing); ``status`` reads what the running hub wrote in ``<data_dir>/sources/``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click
import orjson

from hubd import progress
from hubd.config import CloudSourceConfig, ConfigError, ModbusSourceConfig, command_config
from hubd.model import format_time
from hubd.sources.modbus import profile_for
from hubd.sources.modbus.client import Link, NoAnswer, Offline, ShortRead
from hubd.sources.modbus.sunspec import NotSunSpec


def _show(value: Any) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


@click.group("source")
def source_group() -> None:
    """Devices and vendor clouds the hub collects itself (Modbus TCP, cloud Web APIs)."""


@source_group.command("list")
@click.pass_context
def source_list(ctx: click.Context) -> None:
    """The configured sources: name, kind, address, profile or map, DERs."""
    for source in command_config(ctx).sources:
        if isinstance(source, CloudSourceConfig):
            sites = ", ".join(f"{site}={ders}" for site, ders in source.sites.items())
            click.echo(f"{source.name}\t{source.kind}\t{source.base_url or '-'}\tprofile {source.profile}\t{sites}")
            continue
        what = f"map {source.map}" if source.map else f"profile {source.profile}"
        ders = source.der or ", ".join(f"{der}={'+'.join(map(str, models))}" for der, models in source.ders.items())
        click.echo(f"{source.name}\t{source.kind}\t{source.host}:{source.port} unit {source.unit_id}\t{what}\t{ders}")


@source_group.command("status")
@click.argument("name", required=False)
@click.pass_context
def source_status(ctx: click.Context, name: str | None) -> None:
    """What the running hub last wrote of each source (or of NAME): online, last poll, problems."""
    config = command_config(ctx)
    names = [source.name for source in config.sources]
    if name is not None and name not in names:
        raise click.ClickException(f"no source {name} in the config (sources: {', '.join(names) or 'none'})")
    for wanted in [name] if name else names:
        file = config.data_path / "sources" / f"{wanted}.json"
        if not file.exists():
            _show({"name": wanted, "health": "unknown", "note": "the hub has not polled it yet (is hubd running?)"})
            continue
        _show(orjson.loads(file.read_bytes()))


@source_group.command("test")
@click.argument("name")
@click.pass_context
def source_test(ctx: click.Context, name: str) -> None:
    """Poll NAME once now, from here (nothing is stored): what was discovered, and the readings."""
    config = command_config(ctx)
    index = next((i for i, source in enumerate(config.sources) if source.name == name), None)
    if index is None:
        names = ", ".join(source.name for source in config.sources) or "none"
        raise click.ClickException(f"no source {name} in the config (sources: {names})")
    source = config.sources[index]
    if isinstance(source, CloudSourceConfig):  # the last window of each site, asked and decoded from here
        from hubd.sources.cloud.backfill import probe
        from hubd.sources.cloud.client import Malformed, QuotaExhausted, RateLimited, Unreachable

        try:
            _show(asyncio.run(probe(config, source)))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        except (Unreachable, Malformed, RateLimited, QuotaExhausted) as exc:
            click.echo(f"{name}: {exc}", err=True)
            sys.exit(1)
        return
    try:
        profile = profile_for(config, index)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    assert isinstance(source, ModbusSourceConfig)

    async def once() -> dict[str, Any]:
        link = Link(source.host, source.port, source.unit_id, source.timeout_s)
        try:
            await link.connect()
            discovered = await profile.prepare(link)
            poll = await profile.poll(link)
        finally:
            link.close()
        return {
            "discovered": discovered,
            "described": profile.described,
            "measured_at": format_time(poll.measured_at),
            "spread_ms": poll.spread_ms,
            "readings": [{"der_id": r.der_id, **r.values} for r in poll.readings],
            "states": poll.states,
            "problems": poll.problems,
        }

    try:
        _show(asyncio.run(once()))
    except (Offline, NoAnswer, ShortRead, NotSunSpec) as exc:
        click.echo(f"{name}: {exc}", err=True)
        sys.exit(1)


@source_group.command("backfill")
@click.argument("name")
@click.option("--start", "start", required=True, help="RFC 3339 with an offset, e.g. 2026-11-27T00:00:00+09:00.")
@click.option("--end", "end", required=True, help="RFC 3339 with an offset; the window ends before it.")
@click.pass_context
def source_backfill(ctx: click.Context, name: str, start: str, end: str) -> None:
    """Collect cloud source NAME again from START to END (after a vendor's outage), storing what it gets."""
    from hubd.model import HubError, parse_time
    from hubd.sources.cloud.backfill import run_backfill

    config = command_config(ctx)
    source = next((s for s in config.sources if s.name == name), None)
    if not isinstance(source, CloudSourceConfig):
        clouds = ", ".join(s.name for s in config.sources if isinstance(s, CloudSourceConfig)) or "none"
        raise click.ClickException(f"no cloud source {name} in the config (cloud sources: {clouds})")
    try:
        start_ms, end_ms = parse_time(start, "--start"), parse_time(end, "--end")
    except HubError as exc:
        raise click.ClickException(exc.message) from None
    if end_ms <= start_ms:
        raise click.ClickException("--end must be later than --start")
    total = [0, 0]
    with progress.bar(end_ms - start_ms, f"backfilling {name}") as reached:

        def report(site: str, begin: int, until: int, stored: int) -> None:
            total[0] += 1
            total[1] += stored
            reached(min(until, end_ms) - start_ms)
            click.echo(f"{site}\t{format_time(begin)} … {format_time(until)}\t{stored} readings")

        try:
            run_backfill(config, source, start_ms, end_ms, report)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:  # the cloud's failures: one line, what was stored so far stays stored
            click.echo(f"backfill stopped after {total[0]} windows ({total[1]} readings): {exc}", err=True)
            sys.exit(1)
    click.echo(f"backfilled {total[1]} readings in {total[0]} windows")
