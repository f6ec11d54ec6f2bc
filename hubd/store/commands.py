"""``hubd store``: the readings store's state (``status``) and copying it between backends (``migrate``)."""

from __future__ import annotations

import asyncio
from typing import Any

import click
import orjson

from hubd import progress
from hubd.config import command_config
from hubd.model import MIN_TIME_MS, format_time
from hubd.store import migrate
from hubd.store.influx import slots
from hubd.store.influx.client import InfluxUnavailable
from hubd.store.influx.sink import spool_path
from hubd.store.influx.spool import Spool


@click.group("store")
def store_group() -> None:
    """The readings store: its state, and copying it into another backend."""


@store_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@click.pass_context
def store_status(ctx: click.Context, as_json: bool) -> None:
    """The backend in use; for InfluxDB, the spool: mode (direct or spooling), depth, age of the oldest
    batch and the replay's rate, and from when the 30-minute slot summaries are complete."""
    config = command_config(ctx)
    status: dict[str, Any] = {"backend": config.store.backend}
    if config.store.backend == "sqlite":
        status["path"] = str(config.readings_path)
    else:
        influx = config.store.influxdb
        status |= {"url": influx.url, "database": influx.database, "retention_policy": influx.retention_policy}
        path = spool_path(config)
        status["spool"] = str(path)
        if path.exists():
            spool = Spool(path)
            try:
                status |= spool.status()
            finally:
                spool.close()
        else:
            status |= {"mode": "direct", "spooled_batches": 0, "spooled_readings": 0}
        complete = slots.complete_from(config.registry_path, influx)
        status["slot_summaries"] = (
            "not written yet"
            if complete is None
            else "complete"
            if complete <= MIN_TIME_MS
            else f"complete from {format_time(complete)}"
        )
    if as_json:
        click.echo(orjson.dumps(status).decode())
        return
    for key, value in status.items():
        click.echo(f"{key}: {'-' if value is None else value}")


@store_group.command("migrate")
@click.option("--from", "source", type=click.Choice(["sqlite"]), required=True, help="the store to copy")
@click.option("--to", "target", type=click.Choice(["influxdb"]), required=True, help="where to (store.influxdb)")
@click.option("--from-start", is_flag=True, help="copy everything again, not from where the last run stopped")
@click.pass_context
def store_migrate(ctx: click.Context, source: str, target: str, from_start: bool) -> None:
    """Copy the SQLite store (store.sqlite.path) into InfluxDB (store.influxdb); run it again to resume."""
    config = command_config(ctx)
    if not config.readings_path.exists():
        raise click.ClickException(f"no SQLite store at {config.readings_path}")
    state = migrate.load_state(config)
    if from_start:
        state = {**state, "after": None, "copied": 0, "done": False}
    elif state["done"]:
        click.echo(f"already copied: {state['copied']} readings (--from-start copies again)")
        return
    if state["copied"]:
        click.echo(f"resuming after {state['copied']} readings", err=True)
    try:
        with progress.bar(migrate.total(config), "copying readings") as reached:
            final = asyncio.run(migrate.copy(config, state, reached))
    except InfluxUnavailable as exc:
        raise click.ClickException(f"{exc}; run the same command again to resume") from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"copied {final['copied']} readings to {config.store.influxdb.url} database {config.store.influxdb.database}"
    )
