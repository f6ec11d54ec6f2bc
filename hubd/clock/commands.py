"""``hubd time status`` and ``hubd time sources``: what the hub knows of its own clock and its sources'.

They read ``<data_dir>/clock.json``, which the running hub rewrites (at most once a second) whenever a clock's
state changes, so they work without a connection to the hub and say how old what they show is.
"""

from __future__ import annotations

from typing import Any

import click
import orjson

from hubd.clock.state import load_snapshot
from hubd.config import command_config


def _snapshot(ctx: click.Context) -> dict[str, Any]:
    config = command_config(ctx)
    snapshot = load_snapshot(config.data_path)
    if snapshot is None:
        raise click.ClickException(f"no clock state in {config.data_path} yet: the hub has not run there")
    return snapshot


@click.group("time")
def time_group() -> None:
    """The hub's clock against NTP, and the clocks of the sources that send it data."""


@time_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="The state as JSON.")
@click.pass_context
def time_status(ctx: click.Context, as_json: bool) -> None:
    """The hub's clock against NTP. Exits 1 when it is not synchronised."""
    snapshot = _snapshot(ctx)
    hub = snapshot["hub"]
    if as_json:
        click.echo(orjson.dumps({"at": snapshot["at"], **hub}).decode())
    else:
        click.echo(f"hub clock: {'synchronised' if hub['synced'] else 'NOT synchronised'} (as of {snapshot['at']})")
        if hub["reason"]:
            click.echo(f"  why: {hub['reason']}")
        if hub["checked_at"]:
            click.echo(
                f"  last good answer: {hub['server']} at {hub['checked_at']}: offset {hub['offset_s']:+.6f} s, "
                f"round trip {hub['delay_s']:.6f} s, stratum {hub['stratum']}"
            )
        click.echo(f"  servers: {', '.join(hub['servers']) or 'none configured (time.ntp.servers)'}")
        if hub.get("error"):
            click.echo(f"  last failure: {hub['error']}")
    if not hub["synced"]:
        ctx.exit(1)


_COLUMNS = ("source_id", "state", "flag", "offset_s", "rtt_s", "checked_at", "passive_offset_s", "corrections")


@time_group.command("sources")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per source.")
@click.pass_context
def time_sources(ctx: click.Context, as_json: bool) -> None:
    """Each source's clock: its state, flag, last offset (source minus hub) and round trip, passive estimate."""
    snapshot = _snapshot(ctx)
    sources = snapshot["sources"]
    if as_json:
        for source in sources:
            click.echo(orjson.dumps(source).decode())
        return
    if not sources:
        click.echo(f"no source has sent data yet (as of {snapshot['at']})")
        return
    rows = [[_cell(source.get(column)) for column in _COLUMNS] for source in sources]
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(_COLUMNS)]
    click.echo("  ".join(column.ljust(width) for column, width in zip(_COLUMNS, widths, strict=True)).rstrip())
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    click.echo(f"(as of {snapshot['at']}; tolerance {snapshot['tolerance_s']} s)")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.3f}"
    return str(value)
