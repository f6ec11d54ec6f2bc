"""Clocks as the operator's tools show them: the hub's against NTP, and each source's against the hub's.

The hub does not measure clocks yet; ``clocks`` is the one place that will read the measurements, and until
then the metrics leave the offsets out and the status page says "not measured".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hubd.app import Hub


@dataclass(frozen=True, slots=True)
class Clock:
    """One measured clock: ``name`` is "hub" or a source's name; ``state`` a word such as ok, off or unknown."""

    name: str
    offset_s: float | None
    state: str


def clocks(hub: Hub) -> list[Clock]:
    """The hub's clock and its sources' as last measured; empty while nothing measures them."""
    return []
