"""``hubd store migrate --from sqlite --to influxdb``: copy the embedded store into InfluxDB, resumably.

Readings go in key order (DER, then time) in chunks, each written by the InfluxDB sink's own rule (a newer
version already in InfluxDB is kept). After each chunk the last key copied is saved beside the data, so a
copy that was interrupted (InfluxDB away, Ctrl-C) goes on from there when run again; copying a reading twice
gives the same point, so a chunk written but not yet noted costs nothing but time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hubd.config import Config
from hubd.model import FIELDS
from hubd.store import CLOCK_COLUMNS
from hubd.store.influx.sink import InfluxSink
from hubd.store.sqlite import SqliteStore

CHUNK = 5000
_NAMES = (*FIELDS, *CLOCK_COLUMNS)


def state_path(config: Config) -> Path:
    return config.data_path / "migrate-sqlite-to-influxdb.json"


def load_state(config: Config) -> dict[str, Any]:
    """Where the last copy stopped, if it was to the same InfluxDB database; else from the start."""
    path = state_path(config)
    target = {"url": config.store.influxdb.url, "database": config.store.influxdb.database}
    if path.exists():
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("target") == target:
            return dict(state)
    return {"target": target, "after": None, "copied": 0, "done": False}


async def copy(config: Config, state: dict[str, Any], reached: Callable[[int], None]) -> dict[str, Any]:
    """Copy what follows ``state["after"]``; returns the final state (``done``: every reading copied)."""
    source = SqliteStore(config.readings_path)
    sink = InfluxSink(config)
    await sink.start()
    path = state_path(config)
    try:
        after = tuple(state["after"]) if state["after"] else None
        while True:
            chunk = source.dump(after, CHUNK)
            if not chunk:
                state["done"] = True
                break
            await sink.deliver([(_NAMES, chunk)])
            after = (chunk[-1][0], chunk[-1][1])
            state["after"] = list(after)
            state["copied"] += len(chunk)
            path.write_text(json.dumps(state), encoding="utf-8")
            reached(state["copied"])
        path.write_text(json.dumps(state), encoding="utf-8")
        return state
    finally:
        await sink.close()
        source.close()


def total(config: Config) -> int:
    source = SqliteStore(config.readings_path)
    try:
        return source.count()
    finally:
        source.close()
