"""A request's lines made at once (``lines``) say what ``line`` says point by point: the same tags, fields,
integer suffixes, quoting and times, each quantity the same float; and a value ``line`` must look at itself (a
NaN, a bool, a string quantity, an integer too large) sends the whole request back to ``line``."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from hubd.store import CLOCK_COLUMNS
from hubd.store.influx.lines import Point, line, lines, point

_NUMBER = re.compile(r"=(-?\d[\d.]*(?:e[+-]?\d+)?)(?=[, ])")


def same_floats(text: str) -> str:
    """A line with each float field written as Python writes it (orjson writes 1e-7 where Python 1e-07)."""
    return _NUMBER.sub(lambda m: "=" + repr(float(m.group(1))), text)


def assert_same(points: list[Point]) -> None:
    made = lines("readings", points)
    assert made is not None
    assert [same_floats(t) for t in made] == [same_floats(line("readings", p)) for p in points]


def test_the_usual_points_and_the_uncommon_shapes_read_as_line_writes_them() -> None:
    names = ("power_kw", "energy_kwh", "voltage_v")
    rows = [
        ("DER-1", 1748736000000, 3.5, 1000.125, 230.1, 1748736000500, "edge-1", "hub.v1", 1748736000100),
        ("DER-1", 1748736001000, -0.0, 1e20, 1e-7, 1748736001500, "edge-1", "hub.v1", None),  # no sent_at
        ("DER 2,x=y", 1748736000000, 1.0, None, 5, 1748736000500, 'a "quoted" \\ source', "sunspec", 17),
        ("DER-3", 1748736000000, 0.1, 2.0, 3.0, 1748736000500, None, None, None),  # no source nor format
    ]
    points = [point(names, row) for row in rows]
    flagged = point(
        ("power_kw", *CLOCK_COLUMNS), ("DER-4", 1748736000000, 2.0, "check", 12.5, 1748736000500, "edge", "hub.v1", 9)
    )
    assert_same([*points, flagged])
    made = lines("readings", points)
    assert made is not None
    assert made[0] == (
        "readings,der_id=DER-1 power_kw=3.5,energy_kwh=1000.125,voltage_v=230.1,received_at=1748736000500i,"
        'source="edge-1",format="hub.v1",sent_at=1748736000100i 1748736000000'
    )
    assert made[2].startswith(r"readings,der_id=DER\ 2\,x\=y power_kw=1.0,voltage_v=5,")
    assert r'source="a \"quoted\" \\ source"' in made[2]


def test_a_value_line_must_look_at_sends_the_request_back_to_line() -> None:
    good = point(("power_kw",), ("DER-1", 1, 1.5, 2, "edge", "hub.v1", None))
    for odd in (float("nan"), float("inf"), True, "text", 2**70):
        bad = point(("power_kw",), ("DER-2", 1, odd, 2, "edge", "hub.v1", None))
        assert lines("readings", [good, bad]) is None, odd
    assert lines("readings", [good]) is not None
    assert lines("readings", []) == []


finite = st.floats(allow_nan=False, allow_infinity=False)


@given(st.lists(st.tuples(finite, st.none() | finite, finite, st.none() | st.integers(0, 2**62)), min_size=1))
def test_any_finite_floats_read_the_same(values: list[tuple[float, float | None, float, int | None]]) -> None:
    names = ("power_kw", "energy_kwh", "soc_pct")
    points = [
        point(names, (f"DER-{i}", 1000 + i, a, b, c, 2000 + i, "edge", "hub.v1", sent))
        for i, (a, b, c, sent) in enumerate(values)
    ]
    assert_same(points)
