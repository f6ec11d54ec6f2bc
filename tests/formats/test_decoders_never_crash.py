"""Decoding never crashes: every shipped (and test) decoder, fed random and mutated payloads and properties,
either yields readings the native rules accept or refuses with a HubError (a refusal, or quarantine of the
whole payload). Any other exception would be a decoder bug."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from format_cases import NOW, case_dirs, decoder, definition_files, limits_of, payload_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubd.decode.native import check_reading
from hubd.decode.registry import Limits
from hubd.model import HubError, Reading, format_time

CODES = sorted(path.stem for path in definition_files())
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _samples(code: str) -> list[tuple[bytes, dict[str, str]]]:
    return [(payload_of(case), dict(limits_of(case).properties)) for case in case_dirs() if case.parent.name == code]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["W", "kW", "Wh", "2026-11-27 09:15:00", "1764201600", "0xFF", "-", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _mutate_json(data: Any, draw: st.DrawFn) -> Any:
    """Replace, drop or retype values somewhere in a real sample."""
    if isinstance(data, dict) and data:
        key = draw(st.sampled_from(sorted(data)))
        choice = draw(st.integers(0, 3))
        copy = dict(data)
        if choice == 0:
            del copy[key]
        elif choice == 1:
            copy[key] = draw(json_values)
        else:
            copy[key] = _mutate_json(copy[key], draw)
        return copy
    if isinstance(data, list) and data:
        index = draw(st.integers(0, len(data) - 1))
        copy = list(data)
        copy[index] = _mutate_json(copy[index], draw) if draw(st.booleans()) else draw(json_values)
        return copy
    return draw(json_values)


@st.composite
def payloads(draw: st.DrawFn, code: str) -> tuple[bytes, dict[str, str]]:
    samples = _samples(code)
    payload, props = draw(st.sampled_from(samples))
    how = draw(st.sampled_from(["random", "flip", "cut", "splice", "json", "props"]))
    if how == "random":
        payload = draw(st.binary(max_size=200))
    elif how == "flip" and payload:
        data = bytearray(payload)
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        payload = bytes(data)
    elif how == "cut":
        payload = payload[: draw(st.integers(0, len(payload)))]
    elif how == "splice":
        at = draw(st.integers(0, len(payload)))
        payload = payload[:at] + draw(st.binary(min_size=1, max_size=40)) + payload[at:]
    elif how == "json":
        try:
            data = json.loads(payload)
        except ValueError:
            data = None
        if data is not None:
            payload = json.dumps(_mutate_json(data, draw), allow_nan=True).encode()
    else:
        keys = st.sampled_from(["der_id", "password", "measured_at", "password:PV-1", "password:ESS-1", "x"])
        props = draw(st.dictionaries(keys, st.text(max_size=30) | st.sampled_from(["PV-1", "1764201600000"])))
    return payload, props


@pytest.mark.parametrize("code", CODES)
def test_decoder_yields_valid_readings_or_a_refusal(code: str) -> None:
    decode = decoder(code)

    @SETTINGS
    @given(payloads(code))
    def check(case: tuple[bytes, dict[str, str]]) -> None:
        payload, props = case
        limits = Limits(NOW, 300_000, 10_000, props)
        try:
            decoded = decode(payload, limits)
        except HubError as exc:
            assert exc.message
            return
        for item in decoded.items:
            if isinstance(item, HubError):
                assert item.message
                continue
            assert isinstance(item, Reading)
            derived = "power_factor" in item.values  # reactive power is derived, as the native format derives it
            sent = {k: v for k, v in item.values.items() if k != "reactive_power_kvar" or not derived}
            body = {"der_id": item.der_id, "password": item.password, "measured_at": format_time(item.measured_at)}
            assert check_reading({**body, **sent}, limits) == item

    check()


def test_samples_exist_for_every_code() -> None:
    assert all(_samples(code) for code in CODES)
    assert Path(__file__).parent.joinpath("cases").is_dir()


def _outcome(decode: Any, payload: bytes, limits: Limits) -> Any:
    """What a decoder made of a payload, comparable: each reading whole, each refusal's code, message and DER."""
    try:
        items = decode(payload, limits).items
    except HubError as exc:
        return ("refused whole", exc.code, exc.message)
    return [
        (i.code, i.message, i.der_id)
        if isinstance(item := i, HubError)
        else (item.der_id, item.measured_at, item.values, item.password)
        for i in items
    ]


def _both_ways(decode: Any, payload: bytes, limits: Limits, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """The outcome read a column at a time wherever nothing is refused, and read record by record always."""
    from hubd.decode.vendor import readings

    monkeypatch.setattr(readings, "_FEW", 0)
    by_columns = _outcome(decode, payload, limits)
    monkeypatch.setattr(readings, "_FEW", 10**9)
    return by_columns, _outcome(decode, payload, limits)


@pytest.mark.parametrize("case", case_dirs(), ids=lambda case: f"{case.parent.name}/{case.name}")
def test_reading_by_columns_and_by_records_agree_on_the_samples(case: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message without refusals is read a column at a time, any other record by record: forced each way, each
    sample decodes to the same readings and refusals."""
    by_columns, by_records = _both_ways(decoder(case.parent.name), payload_of(case), limits_of(case), monkeypatch)
    assert by_columns == by_records


@pytest.mark.parametrize("code", CODES)
def test_reading_by_columns_and_by_records_agree_on_mutations(code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    decode = decoder(code)

    @SETTINGS
    @given(payloads(code))
    def check(case: tuple[bytes, dict[str, str]]) -> None:
        payload, props = case
        by_columns, by_records = _both_ways(decode, payload, Limits(NOW, 300_000, 10_000, props), monkeypatch)
        assert by_columns == by_records

    check()
