"""Clocks as the operator's tools show them: the hub's offset against NTP and each source's.

The hub does not measure clocks yet; ``clock_offsets`` is the one place that will read them, and until then
the metrics leave the offsets out and the status page says "not measured".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hubd.app import Hub


def clock_offsets(hub: Hub) -> dict[str, float]:
    """Measured offsets in seconds by clock name ("hub", or a source's name); empty: nothing measured."""
    return {}
