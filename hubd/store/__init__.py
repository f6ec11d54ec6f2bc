"""Where readings live: one interface, one module per backend.

Backends are synchronous and called from one dedicated thread, so a slow disk never stalls the event loop
and the backend needs no locking of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from hubd.model import FIELDS


@dataclass(slots=True)
class StoredReading:
    """A reading as it is persisted: its values plus where and when it came in."""

    der_id: str
    measured_at: int
    values: dict[str, float]
    received_at: int
    source_id: str
    format_code: str


@dataclass(frozen=True)
class RawQuery:
    """Raw extraction: readings in [start, end) ordered by (measured_at, der_id), resuming after ``after``."""

    start: int
    end: int
    limit: int
    der_ids: tuple[str, ...] = ()
    fields: tuple[str, ...] = FIELDS
    after: tuple[int, str] | None = None


class Store(Protocol):
    """The readings store. ``write`` is idempotent on (der_id, measured_at) and durable when it returns."""

    def write(self, readings: list[StoredReading], stored_at: int) -> None: ...

    def raw(self, query: RawQuery) -> list[dict[str, Any]]: ...

    def count(self) -> int: ...

    def close(self) -> None: ...
