"""What to read from one device and how to turn it into readings: SunSpec (discovered) or a register map.

A profile knows nothing of schedules, audits or the pipeline (the source, ``hubd.sources.modbus``, does
that); it prepares once per connection (discovery, the device's own description) and then polls. One poll is
one instant: its measurement time is the midpoint between the first request sent and the last answer received,
and that span is its *spread*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from hubd.config import ModbusSourceConfig
from hubd.model import QUANTITIES, Reading
from hubd.sources.modbus import regmap, sunspec
from hubd.sources.modbus.client import Exchange, Link, Table


@dataclass(slots=True)
class Poll:
    """One poll's outcome: a reading per DER at one instant, and what is worth telling the operator."""

    measured_at: int = 0  # epoch ms: the midpoint of the poll's exchanges
    spread_ms: float = 0.0  # from the first request sent to the last answer received
    readings: list[Reading] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)  # model → operating state
    problems: list[str] = field(default_factory=list)


class Profile(Protocol):
    described: dict[str, dict[str, str]]  # DER → what the device says of itself (maker, model, serial, version)

    async def prepare(self, link: Link) -> dict[str, Any]: ...

    async def poll(self, link: Link) -> Poll: ...


class _Timer:
    """The exchanges of one poll, for its instant and spread."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.first_sent: int | None = None
        self.last_answered = 0

    async def read(self, table: Table, address: int, count: int) -> list[int]:
        exchange: Exchange = await self.link.read(table, address, count)
        if self.first_sent is None:
            self.first_sent = exchange.sent_ns
        self.last_answered = exchange.answered_ns
        return exchange.registers

    def stamp(self, poll: Poll) -> None:
        first = self.first_sent or self.last_answered
        poll.measured_at = (first + self.last_answered) // 2 // 1_000_000
        poll.spread_ms = round((self.last_answered - first) / 1e6, 3)


def checked(values: dict[str, float], problems: list[str], where: str) -> dict[str, float]:
    """Only the values a reading may hold: finite and in the quantity's range (docs/protocol.md)."""
    out: dict[str, float] = {}
    for name, value in values.items():
        low, high = QUANTITIES[name]
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            problems.append(f"{where}: {name} {value} is out of range; left out")
            continue
        out[name] = value
    return out


class SunSpecProfile:
    """A SunSpec device: models found by discovery; each configured DER gets the quantities of its models."""

    def __init__(self, config: ModbusSourceConfig) -> None:
        self.config = config
        self.bases = (config.sunspec_base,) if config.sunspec_base is not None else sunspec.BASES
        self.discovery: sunspec.Discovery | None = None
        self.selected: dict[str, list[sunspec.Model]] = {}
        self.described: dict[str, dict[str, str]] = {}
        self.missing: list[str] = []

    async def prepare(self, link: Link) -> dict[str, Any]:
        """Discover the models, choose each DER's, and note what the device says of itself."""
        timer = _Timer(link)

        async def read(address: int, count: int) -> list[int]:
            return await timer.read("holding", address, count)

        self.discovery = discovery = await sunspec.discover(read, self.bases, self.config.max_registers)
        by_label = {model.label: model for model in discovery.models}
        self.missing = []
        if self.config.der is not None:
            measured = [m for m in discovery.models if any(m.id in q.models for q in sunspec.QUANTITIES)]
            self.selected = {self.config.der: measured}
        else:
            self.selected = {}
            for der_id, labels in self.config.ders.items():
                self.selected[der_id] = [by_label[str(label)] for label in labels if str(label) in by_label]
                self.missing += [f"{der_id}: model {label}" for label in labels if str(label) not in by_label]
        self.described = {}
        for der_id, models in self.selected.items():
            common = _common_before(discovery, models[0]) if models else None
            if common is not None:
                self.described[der_id] = common
        return {
            "base": discovery.base,
            "models": [f"{m.label} {m.name} at {m.address} ({m.length} registers)" for m in discovery.models],
            "unknown_models": discovery.unknown,
            "ders": {der_id: [m.label for m in models] for der_id, models in self.selected.items()},
            "not_found": self.missing,
        }

    async def poll(self, link: Link) -> Poll:
        assert self.discovery is not None
        timer = _Timer(link)
        poll = Poll()
        wanted = sorted({m.address: m for models in self.selected.values() for m in models}.values(), key=_at)
        registers: dict[int, int] = {}
        for start, count in _spans([(m.address, m.length + 2) for m in wanted], self.config.max_registers):
            for offset, word in enumerate(await timer.read("holding", start, count)):
                registers[start + offset] = word
        timer.stamp(poll)
        for model in wanted:
            sunspec.decode(model, [registers[model.address + i] for i in range(model.length + 2)])
            poll.problems += [f"model {model.label}: {problem}" for problem in model.problems]
            state = sunspec.state(model)
            if state is not None:
                poll.states[model.label] = state
        for der_id, models in self.selected.items():
            values: dict[str, float] = {}
            for model in models:
                for name, value in sunspec.quantities(model).items():
                    values.setdefault(name, value)  # the first model that has a quantity gives it
            values = checked(values, poll.problems, der_id)
            if values:
                poll.readings.append(Reading(der_id, poll.measured_at, values))
        poll.problems += [f"{missing} is not on the device" for missing in self.missing]
        return poll


def _at(model: sunspec.Model) -> int:
    return model.address


def _common_before(discovery: sunspec.Discovery, model: sunspec.Model) -> dict[str, str] | None:
    """The common model (1) that describes ``model``: the last one before it (a gateway has one per device)."""
    common = None
    for candidate in discovery.models:
        if candidate.address > model.address:
            break
        if candidate.id == 1:
            common = candidate
    if common is None:
        return None
    return sunspec.Discovery(discovery.base, [common], []).common()


def _spans(spans: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    """Neighbouring spans of registers joined into reads of at most ``most`` registers."""
    reads: list[tuple[int, int]] = []
    for start, count in sorted(spans):
        while count > 0:
            if reads and reads[-1][0] + reads[-1][1] == start and reads[-1][1] < most:
                take = min(count, most - reads[-1][1])
                reads[-1] = (reads[-1][0], reads[-1][1] + take)
            else:
                take = min(count, most)
                reads.append((start, take))
            start, count = start + take, count - take
    return reads


class MapProfile:
    """A device described by a register map: all its quantities go to the one configured DER."""

    def __init__(self, config: ModbusSourceConfig, register_map: regmap.RegisterMap) -> None:
        assert config.der is not None
        self.der_id = config.der
        self.map = register_map
        self.most = min(config.max_registers, register_map.max_registers)
        self.requests = regmap.plan(register_map.quantities, self.most, register_map.max_gap)
        self.described: dict[str, dict[str, str]] = {}

    async def _read(self, timer: _Timer, requests: list[regmap.Request]) -> dict[tuple[Table, int], int]:
        registers: dict[tuple[Table, int], int] = {}
        for request in requests:
            for offset, value in enumerate(await timer.read(request.table, request.address, request.count)):
                registers[(request.table, request.address + offset)] = value
        return registers

    async def prepare(self, link: Link) -> dict[str, Any]:
        if self.map.info:
            registers = await self._read(_Timer(link), regmap.plan(self.map.info, self.most, self.map.max_gap))
            self.described = {self.der_id: regmap.describe(registers, self.map)}
        return {
            "map": self.map.name,
            "file": str(self.map.file),
            "requests": [f"{r.table} {r.address}+{r.count}" for r in self.requests],
        }

    async def poll(self, link: Link) -> Poll:
        timer = _Timer(link)
        poll = Poll()
        registers = await self._read(timer, self.requests)
        timer.stamp(poll)
        decoded = regmap.decode(registers, self.map)
        poll.problems += decoded.problems
        values = checked(decoded.values, poll.problems, self.der_id)
        if values:
            poll.readings.append(Reading(self.der_id, poll.measured_at, values))
        return poll
