"""Modbus devices read and decoded: SunSpec images built from pysunspec2's definitions and devices with their
own register maps, each served by a real pymodbus TCP server on a free loopback port.

These drive the profiles (what the hub reads and how it decodes) directly; test_modbus_source.py runs them
inside a hub.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from hubd.broker import free_port
from hubd.config import ModbusSourceConfig
from hubd.model import Reading
from hubd.sources.modbus import regmap, sunspec
from hubd.sources.modbus.client import Link, NoAnswer
from hubd.sources.modbus.profile import MapProfile, Poll, SunSpecProfile
from hubd.sources.modbus.simulate import (
    BATTERY_802,
    INVERTER_103,
    Device,
    DeviceThread,
    sunspec_image,
    sunspec_model,
    unknown_model,
)


@pytest.fixture
def serve() -> Iterator[Any]:
    """Serve register images: ``serve(holding, inputs=None, unit=1)`` → the port of a running pymodbus server."""
    threads: list[DeviceThread] = []

    def start(holding: Mapping[int, int], inputs: Mapping[int, int] | None = None, unit: int = 1) -> int:
        port = free_port()
        thread = DeviceThread([Device({unit: (holding, inputs or {})}, port)])
        thread.__enter__()
        threads.append(thread)
        return port

    yield start
    for thread in threads:
        thread.__exit__()


def source(port: int, **settings: Any) -> ModbusSourceConfig:
    return msgspec.convert(
        {"kind": "modbus", "name": "dev", "host": "127.0.0.1", "port": port, "timeout_s": 1.0, **settings},
        ModbusSourceConfig,
    )


def poll_once(profile: SunSpecProfile | MapProfile, port: int, unit: int = 1) -> tuple[dict[str, Any], Poll]:
    async def once() -> tuple[dict[str, Any], Poll]:
        link = Link("127.0.0.1", port, unit, 1.0)
        await link.connect()
        try:
            return await profile.prepare(link), await profile.poll(link)
        finally:
            link.close()

    return asyncio.run(once())


def values(poll: Poll) -> dict[str, dict[str, float]]:
    return {reading.der_id: reading.values for reading in poll.readings}


COMMON = {"Mn": "Acme Power", "Md": "AP-10", "SN": "SN-0042", "Vr": "3.1.4", "DA": 1}


def test_sunspec_inverter_and_battery_are_discovered_and_decoded_to_the_unified_quantities(serve: Any) -> None:
    image = sunspec_image([(1, COMMON), (103, INVERTER_103), (713, {"SoC": 655, "Pct_SF": -1}), (802, BATTERY_802)])
    port = serve(image)
    profile = SunSpecProfile(source(port, profile="sunspec", ders={"INV-1": [103], "BAT-1": [802, 713]}))
    before = time.time_ns() // 1_000_000
    discovered, poll = poll_once(profile, port)
    after = time.time_ns() // 1_000_000
    assert discovered["base"] == 40000
    assert [m.split()[0] for m in discovered["models"]] == ["1", "103", "713", "802"]
    assert values(poll) == {
        "INV-1": {
            "power_kw": 3.21,
            "reactive_power_kvar": 0.12,
            "energy_kwh": 12345.678,
            "voltage_v": 202.1,
            "current_a": 15.9,
            "frequency_hz": 50.02,
            "power_factor": 0.985,
        },
        # 802 is named first, so its SoC (62.5 %) wins over 713's (65.5 %)
        "BAT-1": {"soc_pct": 62.5, "power_kw": 1.5, "voltage_v": 512.0, "current_a": 29.3},
    }
    assert poll.states == {"103": "MPPT", "802": "CONNECTED"}
    assert profile.described == {
        der: {"maker": "Acme Power", "model": "AP-10", "serial": "SN-0042", "version": "3.1.4"}
        for der in ("INV-1", "BAT-1")
    }
    # one poll, one instant: the midpoint of its exchanges, inside the time the poll took
    assert before <= poll.measured_at <= after
    assert {reading.measured_at for reading in poll.readings} == {poll.measured_at}
    assert 0 <= poll.spread_ms <= after - before + 1
    assert poll.problems == []


def test_the_der_ac_measurement_and_float_models_and_other_bases(serve: Any) -> None:
    float_inverter = {"W": -1250.5, "WH": 987654.0, "PhVphA": 229.5, "A": 5.25, "Hz": 59.98, "PF": -95.0, "St": 4}
    model_701 = {"ACType": 2, "InvSt": 3, "W": 4200, "W_SF": 0, "Var": -300, "Var_SF": 0, "PF": 970, "PF_SF": -3}
    model_701 |= {"A": 61, "A_SF": -1, "LNV": 2301, "LLV": 3985, "V_SF": -1, "Hz": 49990, "Hz_SF": -3}
    model_701 |= {"TotWhInj": 5_000_000, "TotWh_SF": 0}
    port = serve(
        sunspec_image([(1, COMMON), (701, model_701), (111, float_inverter), (112, {"W": 10.0}), (113, {})], base=50000)
    )
    ders = {"AC-1": [701], "F1": [111], "F2": [112], "F3": [113]}
    discovered, poll = poll_once(SunSpecProfile(source(port, profile="sunspec", ders=ders)), port)
    assert discovered["base"] == 50000  # 40000 and 0 answered "illegal data address"
    assert values(poll) == {
        "AC-1": {
            "power_kw": 4.2,
            "reactive_power_kvar": -0.3,
            "energy_kwh": 5000.0,
            "voltage_v": 230.1,  # line to neutral, before line to line
            "current_a": 6.1,
            "frequency_hz": 49.99,
            "power_factor": 0.97,
        },
        "F1": {
            "power_kw": -1.2505,
            "energy_kwh": 987.654,
            "voltage_v": 229.5,
            "current_a": 5.25,
            "frequency_hz": 59.98,
            "power_factor": -0.95,
        },
        "F2": {"power_kw": 0.01},
        # F3: every float point NaN: no reading at all, not a reading of zeros
    }
    assert poll.states == {"701": "RUNNING", "111": "ggMPPT"}  # as pysunspec2's model 111 spells it


def test_not_implemented_points_are_absent_never_zero(serve: Any) -> None:
    """Every point of every model "not implemented" (int16 0x8000, uint16 0xFFFF, acc32 0, NaN, sunssf
    0x8000): no quantity at all; and a value whose scale factor is not implemented is absent too."""
    port = serve(sunspec_image([(1, {}), (101, {}), (103, {"W": 500}), (701, {}), (713, {}), (802, {}), (111, {})]))
    ders = {"A": [101], "B": [103], "C": [701], "D": [713, 802], "E": [111]}
    _, poll = poll_once(SunSpecProfile(source(port, profile="sunspec", ders=ders)), port)
    assert poll.readings == []
    assert poll.states == {}
    port = serve(sunspec_image([(103, {"W": 500, "W_SF": 1, "WH": 0, "WH_SF": 0, "PF": -32768, "PF_SF": 0})]))
    _, poll = poll_once(SunSpecProfile(source(port, profile="sunspec", der="PV-1")), port)
    assert values(poll) == {"PV-1": {"power_kw": 5.0}}  # acc32 0 and int16 0x8000 left out


def test_an_unknown_model_is_skipped_by_its_length_and_repeating_groups_are_read(serve: Any) -> None:
    mppt = {"DCA_SF": -2, "DCV_SF": -1, "DCW_SF": 0, "DCWH_SF": 0, "N": 2}
    mppt["module"] = [{"ID": 1, "DCA": 812, "DCV": 3805, "DCW": 3090}, {"ID": 2, "DCA": 790, "DCV": 3790}]
    registers = [0x5375, 0x6E53, *sunspec_model(1, COMMON), *unknown_model(64999, 12)]
    registers += [*sunspec_model(160, mppt), *sunspec_model(103, INVERTER_103), 0xFFFF, 0]
    port = serve({40000 + i: value for i, value in enumerate(registers)})

    async def discover() -> sunspec.Discovery:
        link = Link("127.0.0.1", port, 1, 1.0)
        await link.connect()

        async def read(address: int, count: int) -> list[int]:
            return (await link.read("holding", address, count)).registers

        try:
            found = await sunspec.discover(read)
            for model in found.models:
                sunspec.decode(model, await sunspec.read_span(read, model.address, model.length + 2))
            return found
        finally:
            link.close()

    found = asyncio.run(discover())
    assert found.unknown == [64999]
    assert [model.id for model in found.models] == [1, 160, 103]
    block = found.models[1].block
    assert block is not None
    modules = block.groups["module"]
    assert [(m.values["DCA"], m.values["DCV"], m.values["DCW"]) for m in modules] == [
        (8.12, 380.5, 3090),
        (7.9, 379.0, None),  # DCW not implemented in the second module
    ]
    assert sunspec.quantities(found.models[2])["power_kw"] == 3.21  # found after the unknown model


def test_an_absurd_scale_factor_leaves_the_value_out_and_says_so(serve: Any) -> None:
    port = serve(sunspec_image([(103, {**INVERTER_103, "W_SF": 30000})]))
    _, poll = poll_once(SunSpecProfile(source(port, profile="sunspec", der="PV-1")), port)
    assert "power_kw" not in values(poll)["PV-1"] and values(poll)["PV-1"]["voltage_v"] == 202.1
    assert poll.problems == ["model 103: inverter_three_phase.W_SF = 30000 is no scale factor (SunSpec: -10 … 10)"]


def test_a_model_configured_but_not_on_the_device_is_a_problem_the_rest_is_read(serve: Any) -> None:
    port = serve(sunspec_image([(103, INVERTER_103)]))
    profile = SunSpecProfile(source(port, profile="sunspec", ders={"PV-1": [103], "BAT-1": [802]}))
    discovered, poll = poll_once(profile, port)
    assert discovered["not_found"] == ["BAT-1: model 802"]
    assert list(values(poll)) == ["PV-1"]
    assert poll.problems == ["BAT-1: model 802 is not on the device"]


def test_a_device_without_sunspec_is_told_apart(serve: Any) -> None:
    port = serve({0: 1, 1: 2})
    with pytest.raises(sunspec.NotSunSpec, match="no SunSpec marker"):
        poll_once(SunSpecProfile(source(port, profile="sunspec", der="PV-1")), port)


# -- register maps -----------------------------------------------------------------------------------------


def encode(kind: str, value: Any, word_order: str, byte_order: str) -> list[int]:
    """``value`` as a device with these orders holds it (independent of the hub's decoder)."""
    data = struct.pack(">" + regmap._STRUCT[kind], value)
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if byte_order == "little":
        words = [w[::-1] for w in words]
    if word_order == "little":
        words.reverse()
    return [int.from_bytes(w, "big") for w in words]


CASES = [
    ("int16", -1234, "power_kw", {"unit": "W"}, -1.234),
    ("uint16", 50012, "frequency_hz", {"scale": 0.001}, 50.012),
    ("int32", -2_000_000, "power_kw", {"unit": "W", "invert": True}, 2000.0),
    ("uint32", 3_000_000_123, "energy_kwh", {"unit": "Wh"}, 3_000_000.123),
    ("int64", -(2**40), "current_a", {"unit": "mA"}, -(2**40) / 1000),
    ("uint64", 2**50 + 7, "energy_kwh", {}, float(2**50 + 7)),
    ("float32", 229.5, "voltage_v", {}, 229.5),
    ("float64", 0.987654321, "power_factor", {}, 0.987654321),
]


def write_map(folder: Path, name: str, document: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{name}.yaml"
    file.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document, encoding="utf-8")
    return file


@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize("byte_order", ["big", "little"])
def test_a_register_map_reads_every_type_in_every_word_and_byte_order(
    serve: Any, tmp_path: Path, word_order: str, byte_order: str
) -> None:
    """Each type in the given orders; the quantities spread over holding and input registers. Each case is
    its own device (each quantity once per reading), on one server with several unit ids."""
    results: dict[str, float] = {}
    for kind, raw, quantity, extra, expected in CASES:
        holding: dict[int, int] = {}
        inputs: dict[int, int] = {}
        table = inputs if kind.startswith("float") else holding
        for offset, word in enumerate(encode(kind, raw, word_order, byte_order)):
            table[100 + offset] = word
        name = f"case-{kind}"
        spec = {"address": 100, "type": kind, "table": "input" if table is inputs else "holding", **extra}
        write_map(tmp_path, name, {"word_order": word_order, "byte_order": byte_order, "quantities": {quantity: spec}})
        register_map = regmap.load_map(tmp_path / f"{name}.yaml")
        port = serve(holding, inputs)
        _, poll = poll_once(MapProfile(source(port, map=name, der="M-1"), register_map), port)
        (reading,) = poll.readings
        results[kind] = reading.values[quantity]
        assert math.isclose(results[kind], expected, rel_tol=1e-6), (kind, results[kind], expected)
    assert len(results) == len(CASES)


def test_a_map_reads_neighbours_in_few_requests_with_scale_registers_and_not_available_values(
    serve: Any, tmp_path: Path
) -> None:
    document = {
        "max_registers": 4,
        "quantities": {
            "power_kw": {"address": 10, "type": "int16", "unit": "W", "scale_register": 13},
            "voltage_v": {"address": 11, "type": "uint16", "scale": 0.1},
            "current_a": {"address": 12, "type": "int16", "not_available": [-32768]},
            "soc_pct": {"address": 14, "type": "uint16", "not_available": [65535]},
            "frequency_hz": {"address": 20, "type": "uint16", "scale": 0.01},
        },
        "info": {"serial": {"address": 30, "type": "string", "length": 3}},
    }
    register_map = regmap.load_map(write_map(tmp_path, "meter", document))
    assert [(r.address, r.count) for r in regmap.plan(register_map.quantities, 4)] == [(10, 4), (14, 1), (20, 1)]
    holding = {10 + i: v for i, v in enumerate([1500, 2305, 0x8000, 2, 0xFFFF])}
    holding |= {15 + i: 0 for i in range(15)}
    holding |= {20: 5001, 30: 0x4142, 31: 0x4331, 32: 0x3200}
    port = serve(holding)
    _, poll = poll_once(MapProfile(source(port, map="meter", der="M-1"), register_map), port)
    assert values(poll) == {"M-1": {"power_kw": 150.0, "voltage_v": 230.5, "frequency_hz": 50.01}}
    assert poll.problems == []


def test_a_device_answering_exceptions_raises_no_answer(serve: Any, tmp_path: Path) -> None:
    register_map = regmap.load_map(write_map(tmp_path, "m", {"quantities": {"power_kw": {"address": 900}}}))
    port = serve({0: 1})
    with pytest.raises(NoAnswer, match=r"holding registers 900\+1: exception 2 \(illegal data address\)"):
        poll_once(MapProfile(source(port, map="m", der="M-1"), register_map), port)


BAD_MAPS = [
    ({"quantities": {"power_kw": {"address": 1, "type": "int12"}}}, "quantities.power_kw.type", "int16"),
    ({"quantities": {"power_kw": {"adress": 1}}}, "quantities.power_kw.adress", "unknown key"),
    ({"quantities": {"power": {"address": 1}}}, "quantities.power", "not a quantity of hubd"),
    ({"quantities": {"power_kw": {"address": 1, "unit": "kWh"}}}, "quantities.power_kw.unit", "must be one of"),
    ({"quantities": {"power_kw": {"address": 70000}}}, "quantities.power_kw.address", "<= 65535"),
    ({"quantities": {"voltage_v": {"address": 1, "invert": True}}}, "quantities.voltage_v.invert", "signed"),
    ({"quantities": {"power_kw": {"address": 1, "scale": 0}}}, "quantities.power_kw.scale", "other than 0"),
    ({"quantities": {"power_kw": {"address": 65535, "type": "int32"}}}, "quantities.power_kw.address", "runs past"),
    ({"word_order": "middle", "quantities": {"power_kw": {"address": 1}}}, "word_order", "big"),
    ({"quantities": {}}, "quantities", "names no quantity"),
    ({"quantities": {"power_kw": {"address": 1}}, "info": {"serial": {"address": 5}}}, "info.serial.type", "text"),
    ("quantities: [1, 2", "cannot read the map", "flow sequence"),
]


@pytest.mark.parametrize(("document", "key", "problem"), BAD_MAPS)
def test_a_bad_map_is_refused_naming_the_file_the_key_and_the_problem(
    tmp_path: Path, document: Any, key: str, problem: str
) -> None:
    file = write_map(tmp_path, "bad", document)
    with pytest.raises(regmap.MapError) as refused:
        regmap.load_map(file)
    message = str(refused.value)
    assert message.startswith(f"{file}: {key}"), message
    assert problem in message
    maps, refusals = regmap.load_maps([tmp_path])
    assert maps == {} and refusals == {"bad": message}


def test_the_shipped_maps_load() -> None:
    from hubd.sources.modbus import SHIPPED_MAPS

    maps, refused = regmap.load_maps([SHIPPED_MAPS])
    assert refused == {} and "eastron.sdm630" in maps
    assert all(isinstance(point.factor, float) for m in maps.values() for point in m.quantities)


def test_a_reading_is_checked_against_the_quantities_ranges(serve: Any, tmp_path: Path) -> None:
    document = {"quantities": {"soc_pct": {"address": 0}, "voltage_v": {"address": 1}}}
    register_map = regmap.load_map(write_map(tmp_path, "m", document))
    port = serve({0: 104, 1: 230})
    _, poll = poll_once(MapProfile(source(port, map="m", der="B-1"), register_map), port)
    assert poll.readings == [Reading("B-1", poll.measured_at, {"voltage_v": 230.0})]
    assert poll.problems == ["B-1: soc_pct 104.0 is out of range; left out"]


def test_a_device_that_takes_short_requests_is_read_in_several_as_one_instant(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_registers 20: the common model, 103 and 802 in requests of at most 20 registers; one poll, one time."""
    port = serve(sunspec_image([(1, COMMON), (103, INVERTER_103), (802, BATTERY_802)]))
    profile = SunSpecProfile(source(port, profile="sunspec", max_registers=20, ders={"INV-1": [103], "B": [802]}))
    requests: list[int] = []
    real_read = Link.read

    async def counted(link: Link, table: Any, address: int, count: int) -> Any:
        requests.append(count)
        return await real_read(link, table, address, count)

    monkeypatch.setattr(Link, "read", counted)  # counts the requests; the reads are real
    _, poll = poll_once(profile, port)
    assert max(requests) == 20
    assert values(poll)["INV-1"]["power_kw"] == 3.21 and values(poll)["B"]["soc_pct"] == 62.5
    assert profile.described["INV-1"]["serial"] == "SN-0042"
    assert len({reading.measured_at for reading in poll.readings}) == 1
    assert poll.spread_ms > 0  # 6 requests (52 + 64 registers): their span is the poll's spread
