"""Where readings live: a write side and a query side, one module per backend, chosen by ``store.backend``.

The hub writes through a ``ReadingSink`` awaited on the event loop (SQLite's commits in a process of their
own, ``hubd.store.process``) and reads through a ``ReadingQuery``. Query sides are synchronous and called
from one dedicated thread, so a slow disk never stalls the event loop and a backend needs no locking of its
own. ``hubd.store.factory`` makes both from the config; nothing else names a backend.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from hubd.model import Reading
from hubd.query.buckets import Bucket


@dataclass(slots=True)
class StoredReading:
    """A reading as it is persisted: its values plus where and when it came in."""

    der_id: str
    measured_at: int
    values: dict[str, float]
    received_at: int
    source_id: str
    format_code: str
    sent_at: int | None = None  # the sender's send time: the reading's version (None: the message had none)


Rows = list[tuple[tuple[str, ...], list[tuple[Any, ...]]]]
"""Readings ready to store, in the order they arrived, as runs of rows that carry the same quantities:
(names, [(der_id, measured_at, *values in the order of names, received_at, source_id, format_code, sent_at), ...]).
A sender's readings mostly carry the same quantities, so a message is one run. Of two readings of the same DER
and time, the one with the later ``sent_at`` (the sender's send time; None is earlier than any) stays, and of
two with the same, the one received later; the order of the rows only decides between equals."""


def add_rows(rows: Rows, readings: Iterable[Reading | StoredReading], tail: tuple[int, str, str, int | None]) -> None:
    """Append ``readings`` to ``rows``, each with ``tail``: (received_at, source_id, format_code, sent_at)."""
    names, run = rows[-1] if rows else ((), [])
    for r in readings:
        if tuple(r.values) != names:
            names, run = tuple(r.values), []
            rows.append((names, run))
        run.append((r.der_id, r.measured_at, *r.values.values(), *tail))


def add_flagged_rows(
    rows: Rows, readings: Iterable[Reading], tail: tuple[int, str, str, int | None], flag: tuple[str, float]
) -> None:
    """Like ``add_rows``, for readings from a source whose clock is known to be off: each row also carries the
    clock flag (``check`` or ``passive``) and the estimated offset in seconds, as two more named columns."""
    names, run = rows[-1] if rows else ((), [])
    for r in readings:
        flagged = (*r.values, *CLOCK_COLUMNS)
        if flagged != names:
            names, run = flagged, []
            rows.append((names, run))
        run.append((r.der_id, r.measured_at, *r.values.values(), *flag, *tail))


CLOCK_COLUMNS = ("clock_flag", "clock_offset_s")
"""A reading's clock flag and the offset it was estimated with; NULL for a reading from a clock not known to be
off (docs/protocol.md, Time)."""

Where = tuple[tuple[str, str, float], ...]  # (field, operator, operand), operators as in hubd.query


class ReadingSink(Protocol):
    """What the hub's batch writer needs: a durable ``write_rows`` awaited on the event loop."""

    async def start(self) -> None:
        """Open the store (create what it needs), so a store that cannot be opened fails the hub's start, not
        its first batch."""
        ...

    async def write_rows(self, rows: Rows, stored_at: int) -> None:
        """Store ``rows`` (replacing readings of the same DER and time); durable when this returns. May be
        called again before an earlier call returned: batches are committed in the order of the calls."""
        ...

    async def close(self) -> None:
        """Commit what was handed over, then let go of the store."""
        ...


class ReadingQuery(Protocol):
    """The readings as the query side sees them: idempotent on (der_id, measured_at), every committed batch
    visible.

    The query primitives return plain tuples; the extraction logic (buckets, energy, paging) lives in
    ``hubd.query`` and is the same for every backend.
    """

    def raw(
        self,
        start: int,
        end: int,
        der_ids: tuple[str, ...] | None,
        fields: tuple[str, ...],
        where: Where,
        after: tuple[int, str] | None,
        limit: int,
        flagged: bool | None = None,
    ) -> list[tuple[Any, ...]]:
        """(der_id, measured_at, *fields, clock_flag, clock_offset_s) in [start, end) after ``after``, by
        (measured_at, der_id); ``flagged`` True: only readings with a clock flag, False: only without."""
        ...

    def der_ids(self, start: int, end: int, first: str) -> list[str]:
        """DERs with readings in [start, end), sorted, from ``first`` on."""
        ...

    def expect(self, der_ids: list[str]) -> None:
        """The DERs the next calls will ask about one after another, in this order (as ``der_ids`` lists
        them), for a backend that answers a group of them at once (InfluxDB); others ignore it."""
        ...

    def bucket_stats(
        self,
        der_id: str,
        buckets: list[Bucket],
        specs: tuple[tuple[str, str], ...],
        where: Where,
        flagged: bool | None = None,
    ) -> dict[int, dict[str, Any]]:
        """Per index of a bucket holding readings: "n" (readings), "flagged" (those with a clock flag) and
        "how:field" for mean/min/max/sum/count,
        first_at/last_at (the time of the first/last reading with the field), and (time, value) for
        first/last. Readings are taken from each bucket's ``lo`` … ``hi``."""
        ...

    def nearest(self, der_id: str, field: str, at: int, before: bool) -> tuple[int, float] | None:
        """The last reading with ``field`` measured before ``at``, or the first at or after it."""
        ...

    def series(self, der_id: str, start: int, end: int, fields: tuple[str, ...]) -> list[tuple[Any, ...]]:
        """(measured_at, *fields) of one DER in [start, end) with every field present, by time."""
        ...

    def flagged_series(self, der_id: str, start: int, end: int, fields: tuple[str, ...]) -> list[tuple[Any, ...]]:
        """(measured_at, *fields, flagged) of one DER in [start, end) with every field present, by time."""
        ...

    def count(self) -> int: ...

    def close(self) -> None: ...
