"""Energy per bucket: from a cumulative register (``delta``) or from interval energies (``sum``).

``delta`` reads the register at both edges of a bucket, interpolating linearly between the readings either
side of the edge, so slot energies add up to the register's rise. A fall of the register is a reset: the
energy after it counts from zero, never as a negative slot. Interval energies (``energy_interval_kwh`` over
``interval_s`` ending at ``measured_at``) are split between buckets in proportion to their overlap.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import pairwise

from hubd.query.buckets import Bucket


@dataclass(frozen=True, slots=True)
class RegisterSpan:
    """One bucket's register readings: first and last (time, value) and the rise between them."""

    index: int
    first_at: int
    first: float
    last_at: int
    last: float
    rise: float


def rise_with_resets(values: list[float]) -> float:
    """The energy a register sequence shows, counting a fall as a reset to zero."""
    total = 0.0
    for before, after in pairwise(values):
        total += after - before if after >= before else after
    return total


def falls(lows: list[float], highs: list[float], before: float | None, after: float | None) -> set[int]:
    """Positions of buckets (given their lowest and highest register value, in time order) where the register
    may have fallen: a bucket lower than anything before it or higher than anything after it.

    A reset inside a bucket leaves it holding values above the next bucket's; a reset between buckets leaves
    the later one below the earlier. Either way both neighbours are flagged and read value by value. The last
    bucket has no next one to compare with unless a reading follows the range, so without one it is read too.
    """
    flagged: set[int] = set()
    previous = before
    for position, low in enumerate(lows):
        if previous is not None and low < previous:
            flagged.update((position - 1, position) if position else (position,))
        previous = highs[position]
    if highs and (after is None or highs[-1] > after):  # nothing after the last bucket to compare with
        flagged.add(len(highs) - 1)
    return {p for p in flagged if p >= 0}


def deltas(
    laid: list[Bucket], spans: list[RegisterSpan], before: tuple[int, float] | None, after: tuple[int, float] | None
) -> dict[int, float]:
    """Energy per bucket index from the register, for every bucket between the first and last reading."""
    # Anchor points in time order: (time, register unwrapped past its resets, starting at zero).
    times: list[int] = []
    unwrapped: list[float] = []
    previous: float | None = None
    total = 0.0
    if before is not None:
        times.append(before[0])
        unwrapped.append(0.0)
        previous = before[1]
    for span in spans:
        if previous is not None:
            total += span.first - previous if span.first >= previous else span.first  # a fall: reset to zero
        times.append(span.first_at)
        unwrapped.append(total)
        if span.last_at != span.first_at:
            total += span.rise
            times.append(span.last_at)
            unwrapped.append(total)
        previous = span.last
    if after is not None and previous is not None:
        total += after[1] - previous if after[1] >= previous else after[1]
        times.append(after[0])
        unwrapped.append(total)
    if len(times) < 2:
        return {}

    def at_edge(edge: int) -> float:
        right = bisect_left(times, edge)
        if right == len(times):
            return unwrapped[-1]
        if times[right] == edge or right == 0:
            return unwrapped[right]
        t0, t1 = times[right - 1], times[right]
        u0, u1 = unwrapped[right - 1], unwrapped[right]
        return u0 + (u1 - u0) * (edge - t0) / (t1 - t0)

    out: dict[int, float] = {}
    first, last = times[0], times[-1]
    edge, value = -1, 0.0
    for index, bucket in enumerate(laid):
        if bucket.end <= first or bucket.start >= last:
            continue
        start_value = value if edge == bucket.start else at_edge(bucket.start)
        edge, value = bucket.end, at_edge(bucket.end)
        out[index] = value - start_value
    return out


def split_intervals(laid: list[Bucket], rows: list[tuple[int, float, float]]) -> dict[int, float]:
    """Sum interval energies (measured_at, kWh, interval_s) per bucket, split in proportion to overlap."""
    starts = [b.start for b in laid]
    out: dict[int, float] = {}
    for end_at, energy, interval_s in rows:
        begin_at = end_at - int(interval_s * 1000)
        if interval_s <= 0:  # an instant: all of it in the bucket holding measured_at
            index = bisect_right(starts, end_at) - 1
            if 0 <= index < len(laid) and end_at < laid[index].end:
                out[index] = out.get(index, 0.0) + energy
            continue
        index = max(bisect_right(starts, begin_at) - 1, 0)
        while index < len(laid) and laid[index].start < end_at:
            bucket = laid[index]
            overlap = min(bucket.end, end_at) - max(bucket.start, begin_at)
            if overlap > 0:
                out[index] = out.get(index, 0.0) + energy * overlap / (end_at - begin_at)
            index += 1
    return out
