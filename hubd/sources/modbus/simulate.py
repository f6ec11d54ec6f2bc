"""Simulated Modbus devices for the demo, the tests and bench/modbus: real pymodbus TCP servers on loopback.

``sunspec_image`` lays out SunSpec models from pysunspec2's definitions (the same the hub decodes with, so
nobody types register offsets by hand); ``Device`` serves register images with pymodbus's server, and
``DeviceThread`` runs devices in a thread of their own for code that is not asyncio (the tests).
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from sunspec2 import mb as sunspec_codec  # type: ignore[import-untyped]

from hubd.sources.modbus import client as _quiet  # noqa: F401  # pymodbus's own log kept quiet
from hubd.sources.modbus.sunspec import END_ID, MARKER, GroupDef, PointDef, model_def

Values = Mapping[str, Any]  # point name → raw value (the register's number, a float, a string); absent: not implemented


def _point(point: PointDef, value: Any) -> list[int]:
    if value is None:
        data = sunspec_codec.create_unimpl_value(point.type, point.size * 2)
    elif point.type == "string":
        data = sunspec_codec.str_to_data(str(value), point.size * 2)
    elif point.type in ("float32", "float64"):
        data = struct.pack(">f" if point.type == "float32" else ">d", float(value))
    else:
        data = sunspec_codec.point_type_info[point.type].to_data(int(value))
    return list(struct.unpack(f">{point.size}H", data))


def _group(group: GroupDef, values: Values, top: bool) -> list[int]:
    registers: list[int] = []
    for point in group.points:
        value = values.get(point.name)
        if value is None and (point.type == "pad" or (top and point.name in ("ID", "L"))):
            value = 0
        registers += _point(point, value)
    for sub in group.groups:
        for instance in values.get(sub.name, ()):
            registers += _group(sub, instance, False)
    return registers


def sunspec_model(model_id: int, values: Values) -> list[int]:
    """One model's registers from its ID register on; repeating groups are lists of values under their name."""
    definition = model_def(model_id)
    if definition is None:
        raise ValueError(f"pysunspec2 has no definition of model {model_id}")
    registers = _group(definition.group, values, True)
    registers[0], registers[1] = model_id, len(registers) - 2
    return registers


def sunspec_image(models: Sequence[tuple[int, Values]], base: int = 40000) -> dict[int, int]:
    """A device's holding registers: the marker at ``base``, the models in order, the end marker."""
    registers = [*MARKER]
    for model_id, values in models:
        registers += sunspec_model(model_id, values)
    registers += [END_ID, 0]
    return {base + offset: value for offset, value in enumerate(registers)}


def unknown_model(model_id: int, length: int) -> list[int]:
    """A model pysunspec2 has no definition of (a maker's own): its id, its length and zeros."""
    return [model_id, length, *([0] * length)]


def _blocks(registers: Mapping[int, int]) -> Iterator[tuple[int, list[int]]]:
    """Contiguous runs of addresses; gaps between them answer "illegal data address", as a real device's do."""
    run: list[int] = []
    start = 0
    for address in sorted(registers):
        if run and address != start + len(run):
            yield start, run
            run = []
        if not run:
            start = address
        run.append(registers[address])
    if run:
        yield start, run


def _datablock(registers: Mapping[int, int]) -> ModbusSequentialDataBlock | None:
    if not registers:
        return None
    blocks = list(_blocks(registers))
    if len(blocks) != 1:
        raise ValueError("a simulated table holds one run of addresses; give the others to another unit")
    start, values = blocks[0]
    return ModbusSequentialDataBlock(start + 1, values)  # type: ignore[no-untyped-call]  # they count from 1


class Device:
    """A pymodbus TCP server on ``host``:``port`` serving ``units`` (unit id → (holding, input) registers).

    ``short_by`` makes it a faulty device: each answer holds that many registers fewer than were asked for.
    """

    def __init__(
        self,
        units: Mapping[int, tuple[Mapping[int, int], Mapping[int, int]]],
        port: int,
        host: str = "127.0.0.1",
        short_by: int = 0,
    ) -> None:
        self.units, self.host, self.port, self.short_by = units, host, port, short_by
        self._server: ModbusTcpServer | None = None

    def _answer(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if sending and self.short_by and len(pdu.registers) > self.short_by:
            pdu.registers = pdu.registers[: -self.short_by]
        return pdu

    async def start(self) -> None:
        devices: dict[int, Any] = {
            unit: ModbusDeviceContext(hr=_datablock(holding), ir=_datablock(inputs))
            for unit, (holding, inputs) in self.units.items()
        }
        context = ModbusServerContext(devices=devices, single=False)
        self._server = ModbusTcpServer(context, address=(self.host, self.port), trace_pdu=self._answer)
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None


class DeviceThread:
    """Devices served from an event loop in a thread of its own; ``stop``/``start`` one to take it away."""

    def __init__(self, devices: Sequence[Device]) -> None:
        self.devices = list(devices)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hubd-simulated-modbus", daemon=True)

    def _call(self, coroutine: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(10)

    def __enter__(self) -> DeviceThread:
        self._thread.start()
        for device in self.devices:
            self._call(device.start())
        return self

    def __exit__(self, *_: object) -> None:
        for device in self.devices:
            self._call(device.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def stop(self, device: Device) -> None:
        self._call(device.stop())

    def start(self, device: Device) -> None:
        self._call(device.start())


COMMON_DEMO = {"Mn": "Simulated Solar", "Md": "SIM-INV-5K", "SN": "INV0001", "Vr": "1.4.2", "DA": 1}


def demo_inverter() -> dict[int, int]:
    """A three-phase inverter (models 1 and 103) producing 3.21 kW, as the demo shows it."""
    return sunspec_image(
        [
            (1, COMMON_DEMO),
            (103, INVERTER_103),
        ]
    )


def demo_battery() -> dict[int, int]:
    """A battery behind its own inverter (models 1, 713 and 802), discharging 1.5 kW at 62.5 % charge."""
    return sunspec_image(
        [
            (1, {"Mn": "Simulated Storage", "Md": "SIM-BAT-10", "SN": "BAT0001", "Vr": "2.0.0", "DA": 1}),
            (713, {"WHRtg": 1000, "WHAvail": 625, "SoC": 625, "SoH": 990, "WH_SF": 1, "Pct_SF": -1}),
            (802, BATTERY_802),
        ]
    )


def demo_site() -> dict[int, int]:
    """The inverter and the battery behind one gateway: each with its own common model before its models."""
    registers = demo_inverter()
    battery = demo_battery()
    end = max(registers) - 1  # the inverter's end marker: the battery's models go there
    for address in range(40002, max(battery) + 1):
        registers[end + address - 40002] = battery[address]
    return registers


async def _serve(port: int) -> None:
    device = Device({1: (demo_site(), {})}, port)
    await device.start()
    print(f"a simulated SunSpec inverter (103) and battery (713, 802) on 127.0.0.1:{port}, unit 1; Ctrl-C stops")
    try:
        await asyncio.Event().wait()
    finally:
        await device.stop()


# Raw register values with their scale factors: W 3210 x 10^0 W, PhVphA 2021 x 10^-1 V, PF 985 x 10^-1 %, ...
INVERTER_103: dict[str, Any] = {
    "A": 1590, "AphA": 530, "AphB": 530, "AphC": 530, "A_SF": -2,
    "PhVphA": 2021, "PhVphB": 2019, "PhVphC": 2023, "V_SF": -1,
    "W": 3210, "W_SF": 0, "Hz": 5002, "Hz_SF": -2, "VAr": 120, "VAr_SF": 0, "PF": 985, "PF_SF": -1,
    "WH": 12345678, "WH_SF": 0, "TmpCab": 412, "Tmp_SF": -1, "St": 4, "Evt1": 0, "Evt2": 0,
}  # fmt: skip
BATTERY_802: dict[str, Any] = {
    "AHRtg": 200, "AHRtg_SF": 0, "WHRtg": 10000, "WHRtg_SF": 0, "WChaRteMax": 5000, "WDisChaRteMax": 5000,
    "WChaDisChaMax_SF": 0, "SoC": 625, "SoC_SF": -1, "LocRemCtl": 1, "AlmRst": 0, "Typ": 4, "State": 3,
    "Evt1": 0, "Evt2": 0, "EvtVnd1": 0, "EvtVnd2": 0, "V": 512, "V_SF": 0, "CellVMax": 3300, "CellVMin": 3200,
    "CellVAvg": 3250, "CellV_SF": -3, "A": 293, "A_SF": -1, "AMax_SF": 0, "W": 1500, "W_SF": 0,
    "SetOp": 1, "SetInvState": 1,
}  # fmt: skip


if __name__ == "__main__":  # python -m hubd.sources.modbus.simulate [PORT]: a device to try a config against
    import contextlib
    import sys

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(int(sys.argv[1]) if len(sys.argv) > 1 else 1502))
