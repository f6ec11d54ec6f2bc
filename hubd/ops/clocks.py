"""Clocks as the operator's tools show them: the hub's against NTP, and each source's against the hub's.

``clocks`` is the one place the metrics and the status page read the measurements of ``hubd.clock`` from. The
hub's clock is "not measured" until an NTP server is configured (``time.ntp.servers``); a source's offset is
its last check's, or, where it was never checked, the passive estimate.
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
    """The hub's clock and its sources' as last measured: the hub's first, then flagged sources, then the rest."""
    known = hub.clocks
    own = known.hub
    state = "synced" if own.synced else "not measured" if not own.servers else "unsynchronised"
    found = [Clock("hub", own.offset_s, state)]
    for source in sorted(known.sources.values(), key=lambda s: (s.flag is None, s.source_id)):
        offset = source.offset_s if source.offset_s is not None else source.passive_offset_s
        flag = f", flagged ({source.flag})" if source.flag else ""
        found.append(Clock(source.source_id, offset, f"{source.state}{flag}"))
    return found
