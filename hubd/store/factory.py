"""The one place that turns ``store.backend`` into a store: the daemon, the CLI and the benchmarks ask here.

A backend opens a ``ReadingSink`` and a ``ReadingQuery`` from the whole config (its own section lives there,
beside ``store.backend``). Adding one is its module, one entry in ``BACKENDS`` and its name among the values
``store.backend`` accepts; nothing else names a backend. SQLite's sides are two modules because its commits
run in a process of their own (``hubd.store.process``) while queries use the hub's connection (``hubd.store.sqlite``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hubd.audit import AuditLog
from hubd.config import Config, ConfigError
from hubd.store import ReadingQuery, ReadingSink
from hubd.store.influx.query import InfluxQuery
from hubd.store.influx.sink import InfluxSink
from hubd.store.process import WriterProcess
from hubd.store.sqlite import SqliteStore


@dataclass(frozen=True, slots=True)
class Backend:
    """How one backend opens its two sides. Opening does no I/O until ``ReadingSink.start``; a query side
    may open its connection at once. A sink gets the hub's audit log (None outside the daemon) for what it
    must audit itself, as the InfluxDB sink's spool transitions and refused readings."""

    sink: Callable[[Config, AuditLog | None], ReadingSink]
    query: Callable[[Config], ReadingQuery]


BACKENDS: dict[str, Backend] = {
    "sqlite": Backend(sink=lambda config, _audit: WriterProcess.from_config(config), query=SqliteStore.from_config),
    "influxdb": Backend(sink=InfluxSink.from_config, query=InfluxQuery.from_config),
}


def _backend(config: Config) -> Backend:
    name = config.store.backend
    backend = BACKENDS.get(name)
    if backend is None:  # the config's own check refuses it first; this guards a config built in code
        raise ConfigError(f"store.backend: no such backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    return backend


def open_sink(config: Config, audit: AuditLog | None = None) -> ReadingSink:
    """The write side of the configured store; await its ``start()`` before the first ``write_rows``."""
    return _backend(config).sink(config, audit)


def open_query(config: Config) -> ReadingQuery:
    """The query side of the configured store, for one thread at a time; ``close()`` it when done."""
    return _backend(config).query(config)
