"""The store's replace rule on a database whose own rule is "the last write wins, field by field".

SQLite's upsert keeps, of two readings of one DER and time, the newer version (``sent_at``, then
``received_at``; docs/protocol.md) and replaces the whole reading. InfluxDB, written the same point again,
keeps the union of the old and new fields, the new one winning each field, whatever its version. So before a
batch is written the hub (1) keeps only the newest version of each key in the batch, (2) reads the stored
version of the keys it may conflict with (one query over the batch's DERs and time span) and drops a
reading older than the stored one, and (3) deletes a stored point first when the newer reading lacks one of
its fields, so no field of the older reading survives beside it. This holds while one hub writes the
database; two hubs writing the same DER and time at once may interleave (docs/operations.md).
"""

from __future__ import annotations

from typing import Any

from hubd.model import FIELDS
from hubd.store import CLOCK_COLUMNS, Rows
from hubd.store.influx.lines import Point, point, version

_REPLACED = (*FIELDS, *CLOCK_COLUMNS, "sent_at")  # a stored field the newer reading lacks must go


def newest(rows: Rows) -> dict[tuple[str, int], Point]:
    """Per (der_id, measured_at), the newest version in ``rows``; of equals, the later in the batch."""
    out: dict[tuple[str, int], Point] = {}
    for names, run in rows:
        for row in run:
            p = point(names, row)
            key = (p[0], p[1])
            kept = out.get(key)
            if kept is None or version(p[2]) >= version(kept[2]):
                out[key] = p
    return out


def reconcile(
    points: dict[tuple[str, int], Point], stored: list[dict[str, Any]]
) -> tuple[list[Point], list[tuple[str, int]]]:
    """(points to write, keys to delete first) given the stored points of the same keys."""
    dropped: set[tuple[str, int]] = set()
    deletes: list[tuple[str, int]] = []
    for s in stored:
        key = (s["der_id"], s["time"])
        p = points.get(key)
        if p is None:
            continue
        old = {k: v for k, v in s.items() if v is not None}
        if version(old) > version(p[2]):
            dropped.add(key)
        elif any(name in old and name not in p[2] for name in _REPLACED):
            deletes.append(key)
    return [p for key, p in points.items() if key not in dropped], deletes
