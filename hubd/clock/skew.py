"""Passive skew: a source's clock offset estimated from its data alone, without asking it anything.

A reading cannot reach the hub before it was measured, so ``received_at - measured_at`` is the delay of
delivery plus the hub's clock minus the source's. Delays are only ever positive, so the smallest value over a
window is the best estimate of the clock difference: ``offset = -min(received_at - measured_at)``, with the
source's clock ahead by ``offset`` at most the shortest delay seen. A clock that runs fast shows at once (a
reading from the future); one that runs slow cannot be told from data that arrives late, so the estimate is
only an upper bound for it and the hub flags only what runs fast (docs/protocol.md, Time).
"""

from __future__ import annotations

from collections import deque


class PassiveSkew:
    """The minimum of ``received_at - measured_at`` over the last ``window_ms``, kept as a few slices.

    One slice per tenth of the window holds its own minimum: an update is a comparison, and old evidence
    leaves the estimate a slice at a time, so a clock that was fixed by hand stops being flagged within the
    window.
    """

    __slots__ = ("_end", "_last", "_slice_ms", "_slices")

    def __init__(self, window_ms: int) -> None:
        self._slice_ms = max(window_ms // 10, 1)
        self._slices: deque[list[int]] = deque()  # [slice start, minimum delay in ms], oldest first
        self._last: list[int] = [0, 0]  # the newest slice, and where it ends: most messages only compare
        self._end = -(2**62)

    def add(self, received_at: int, newest_measured_at: int) -> None:
        """One message: the time it arrived and the latest measurement time among its readings."""
        delay = received_at - newest_measured_at
        if self._end > received_at >= self._last[0]:
            if delay < self._last[1]:
                self._last[1] = delay
            return
        start = received_at - received_at % self._slice_ms
        self._last = [start, delay]
        self._end = start + self._slice_ms
        self._slices.append(self._last)

    @property
    def last_at(self) -> int | None:
        """The start of the newest slice with evidence: roughly when the source last sent data."""
        return self._slices[-1][0] if self._slices else None

    def offset_ms(self, now: int) -> int | None:
        """How far the source's clock is ahead of the hub's (negative: behind, at most), or None without data
        in the window."""
        slices = self._slices
        oldest = now - 10 * self._slice_ms
        while slices and slices[0][0] < oldest:
            slices.popleft()
        if not slices:
            return None
        return -min(delay for _, delay in slices)

    def forget(self) -> None:
        """Drop the evidence: the source's clock was corrected, what came before says nothing of it now."""
        self._slices.clear()
        self._last, self._end = [0, 0], -(2**62)
