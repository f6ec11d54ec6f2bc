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


def deltas(
    laid: list[Bucket], spans: list[RegisterSpan], before: tuple[int, float] | None, after: tuple[int, float] | None
) -> dict[int, float]:
    """Energy per bucket index from the register, for every bucket between the first and last reading."""
    times: list[int] = []
    unwrapped: list[float] = []

    def add(at: int, step: float) -> None:
        times.append(at)
        unwrapped.append(unwrapped[-1] + step if unwrapped else 0.0)

    def step(previous: float, value: float) -> float:
        return value - previous if value >= previous else value  # a fall is a reset to zero

    previous: float | None = None
    if before is not None:
        add(before[0], 0.0)
        previous = before[1]
    for span in spans:
        add(span.first_at, 0.0 if previous is None else step(previous, span.first))
        if span.last_at != span.first_at:
            add(span.last_at, span.rise)
        previous = span.last
    if after is not None and previous is not None:
        add(after[0], step(previous, after[1]))
    if len(times) < 2:
        return {}

    def at_edge(edge: int) -> float:
        right = bisect_left(times, edge)
        if right < len(times) and times[right] == edge:
            return unwrapped[right]
        if right == 0:
            return unwrapped[0]
        if right == len(times):
            return unwrapped[-1]
        t0, t1 = times[right - 1], times[right]
        u0, u1 = unwrapped[right - 1], unwrapped[right]
        return u0 + (u1 - u0) * (edge - t0) / (t1 - t0)

    out: dict[int, float] = {}
    for index, bucket in enumerate(laid):
        if bucket.end <= times[0] or bucket.start >= times[-1]:
            continue
        out[index] = at_edge(bucket.end) - at_edge(bucket.start)
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
