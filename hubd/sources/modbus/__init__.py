"""The Modbus TCP source: the hub polls a device itself (SunSpec discovered, anything else by a register map).

One ``ModbusSource`` per configured device, each with its own poll loop, so a slow or dead device never delays
another. A poll hands the pipeline decoded readings tagged with the source as their sender: the DERs the
operator configured for it, written without passwords (auth by sender), and they must be registered.

What the operator hears of, audited once each rather than at every poll:

- ``modbus.online`` / ``modbus.offline``: the device answers again / stopped answering (no connection, no
  answer within ``timeout_s``); reconnecting waits ``poll_s`` doubled at each failure up to
  ``reconnect_max_s``, with jitter;
- ``modbus.problem`` / ``modbus.recovered``: the device answers, but not usably (a Modbus exception, a short
  read, an absurd scale factor, a value out of range, no SunSpec marker); recovered when a poll is clean;
- ``modbus.discovered``: the models found (and those pysunspec2 does not know, skipped by their length);
- ``modbus.state``: a model's operating state changed; ``der.described``: the device's maker, model, serial
  or version, recorded on its DER, changed.

The source's status (for ``hubd source status``) is a small JSON file in ``<data_dir>/sources/``, written on
each transition and at most every few seconds otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from hubd.audit import AuditLog
from hubd.config import Config, ConfigError, ModbusSourceConfig
from hubd.model import RawMessage, Sender, format_time, now_ms
from hubd.sources import Health, Pipeline, write_status
from hubd.sources.modbus import regmap
from hubd.sources.modbus.client import Link, NoAnswer, Offline, ShortRead
from hubd.sources.modbus.profile import MapProfile, Poll, Profile, SunSpecProfile
from hubd.sources.modbus.sunspec import NotSunSpec

Describe = Callable[[str, dict[str, str]], dict[str, str]]  # DER, reported → what changed (Registry.describe)
Maps = tuple[dict[str, regmap.RegisterMap], dict[str, str]]  # maps by name, and refusals by name
STATUS_EVERY_S = 30.0  # a status file costs a write and a rename (~1 ms): 200 devices, 7 a second
QUIET_S = 60.0  # a DER the hub refused is sent again after this, not at every poll (each refusal is audited)
SHIPPED_MAPS = Path(__file__).resolve().parent.parent.parent / "drivers" / "modbus"


def map_folders(config: Config) -> list[Path]:
    """Where register maps are: those shipped with hubd, then the operator's (which win on a name)."""
    return [SHIPPED_MAPS, config.drivers_user_path / "modbus"]


def profile_for(config: Config, index: int, maps: Maps | None = None) -> Profile:
    """The profile of ``config.sources[index]``; a map that is missing or refused stops the hub, named."""
    source = config.sources[index]
    assert isinstance(source, ModbusSourceConfig)
    if source.profile == "sunspec":
        return SunSpecProfile(source)
    folders = map_folders(config)
    found, refused = maps if maps is not None else regmap.load_maps(folders)
    assert source.map is not None
    if source.map not in found:
        why = refused.get(source.map) or f"no {source.map}.yaml in {' or '.join(str(f) for f in folders)}"
        raise ConfigError(f"sources[{index}].map: {why}")
    return MapProfile(source, found[source.map])


def build_sources(config: Config, audit: AuditLog, describe: Describe | None = None) -> list[ModbusSource]:
    """The configured Modbus sources; register maps are read once, and a refused one is said even when no
    source uses it (a map dropped in for later)."""
    if not config.sources:
        return []
    maps = regmap.load_maps(map_folders(config))
    for reason in maps[1].values():
        logger.warning("register map refused: {}", reason)
    status_dir = config.data_path / "sources"
    return [
        ModbusSource(source, profile_for(config, index, maps), audit, describe, status_dir)
        for index, source in enumerate(config.sources)
        if isinstance(source, ModbusSourceConfig)
    ]


def _cancel_if_asked() -> None:
    """Raise CancelledError when this task was asked to stop: a cancellation that lands as an awaited future
    completes can be lost inside ``asyncio.wait_for`` (pymodbus awaits its answers so on Python 3.11), and the
    poll loop would go on while the hub waits for it to end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def sender_of(config: ModbusSourceConfig) -> Sender:
    ders = {config.der} if config.der is not None else set(config.ders)
    return Sender("modbus", config.name, frozenset(ders))


class ModbusSource:
    """Polls one device every ``poll_s`` and hands its readings to the pipeline."""

    kind = "modbus"

    def __init__(
        self,
        config: ModbusSourceConfig,
        profile: Profile,
        audit: AuditLog,
        describe: Describe | None = None,
        status_dir: Path | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.profile = profile
        self.sender = sender_of(config)
        self._audit = audit
        self._describe = describe
        self._status_file = status_dir / f"{config.name}.json" if status_dir is not None else None
        self._link = Link(config.host, config.port, config.unit_id, config.timeout_s)
        self._pipeline: Pipeline | None = None
        self._stopped = asyncio.Event()
        self._health: Health = "stopped"
        self._online: bool | None = None  # None: not known yet
        self._offline_reason = ""
        self._prepared = False
        self._problems: set[str] = set()
        self._states: dict[str, str] = {}
        self._quiet: dict[str, tuple[float, str]] = {}  # DER → until when its readings are held back, and why
        self._status_at = 0.0
        self.polls = 0
        self.latencies_ms: deque[float] = deque(maxlen=1000)  # the last polls' (for the status; bench/modbus)
        self.last: Poll | None = None
        self.discovered: dict[str, Any] = {}

    @property
    def health(self) -> Health:
        return self._health

    @property
    def last_success(self) -> int | None:
        """When the last good poll measured (epoch ms), for the status page."""
        return self.last.measured_at if self.last is not None else None

    @property
    def last_error(self) -> str | None:
        """Why the device is offline, or its current problems, for the status page."""
        if self._online is False:
            return self._offline_reason
        return "; ".join(sorted(self._problems)) or None

    async def start(self, pipeline: Pipeline) -> None:
        """Nothing to open yet: a device that is off (at night, say) must not stop the hub; run() connects."""
        self._pipeline = pipeline
        self._stopped.clear()
        self._health = "starting"

    async def stop(self) -> None:
        self._stopped.set()
        self._link.close()
        self._health = "stopped"
        self._write_status(force=True)

    async def run(self) -> None:
        """Poll on schedule until stopped; a device that fails is retried with a growing, jittered wait."""
        delay = self.config.poll_s
        # The first poll within a second (or poll_s) at random: many devices then do not all poll in one instant.
        next_at = time.monotonic() + random.uniform(0.0, min(self.config.poll_s, 1.0))
        await self._sleep_until(next_at)
        while not self._stopped.is_set():
            _cancel_if_asked()
            try:
                await self.poll_once()
                delay = self.config.poll_s
                next_at += self.config.poll_s
                if next_at < time.monotonic():  # a poll took longer than the interval: skip, do not pile up
                    next_at = time.monotonic() + self.config.poll_s
            except Offline as exc:
                self._went_offline(str(exc))
                next_at = time.monotonic() + delay * random.uniform(0.8, 1.2)
                delay = min(delay * 2, self.config.reconnect_max_s)
            self._write_status()
            await self._sleep_until(next_at)

    async def _sleep_until(self, moment: float) -> None:
        """Wait until ``moment`` (monotonic) or until stopped, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + moment - time.monotonic()):
                await self._stopped.wait()

    async def poll_once(self) -> Poll | None:
        """One poll: connect and discover when needed, read, hand the readings on. Raises Offline."""
        started = time.perf_counter()
        try:
            if not self._link.connected:
                self._prepared = False
                await self._link.connect()
            if not self._prepared:
                discovered = await self.profile.prepare(self._link)
                self._prepared = True
                self._came_online()
                if discovered != self.discovered:  # said again only when the device holds something else
                    self.discovered = discovered
                    self._record_description()
            poll = await self.profile.poll(self._link)
        except (NoAnswer, ShortRead, NotSunSpec) as exc:
            self._came_online()  # it answered, though not usably
            self._prepared = False  # the device's layout may have changed: discover again
            self._note_problems([str(exc)])
            return None
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        self.polls += 1
        self.last = poll
        if self.polls == 1:
            self._status_at = 0.0  # the first readings are worth showing at once
        self._came_online()
        self._note_states(poll.states)
        await self._hand_on(poll)
        self._note_problems(poll.problems)
        return poll

    async def _hand_on(self, poll: Poll) -> None:
        now = time.monotonic()
        held = {der_id: why for der_id, (until, why) in self._quiet.items() if until > now}
        poll.problems += [held[r.der_id] for r in poll.readings if r.der_id in held]
        readings = [r for r in poll.readings if r.der_id not in held]
        if not readings or self._pipeline is None:
            return
        raw = RawMessage(self.name, "modbus", b"", now_ms(), sender=self.sender, readings=list(readings))
        outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(result: Any) -> None:  # the wait may have been cancelled (the hub stopping) before the commit
            if not outcome.done():
                outcome.set_result(result)

        self._pipeline.submit(raw, settle)
        result = await outcome
        if isinstance(result, asyncio.CancelledError):  # the hub stopped before the commit: nothing to say
            return
        if isinstance(result, BaseException):
            logger.error("modbus {}: the pipeline failed on a poll: {!r}", self.name, result)
            return
        answer, _ = result
        for refused in answer.get("rejected", ()):
            der_id = refused.get("der_id")
            if der_id:  # already audited by the pipeline (auth.failed); held back for a while, said once
                error = refused["error"]
                why = f"{der_id}: refused {error['code']}: {error['message']}"
                self._quiet[der_id] = (now + QUIET_S, why)
                poll.problems.append(why)

    # -- what the operator hears of, once each ------------------------------------------------------------

    def _came_online(self) -> None:
        self._health = "up"
        if self._online is not True:
            self._online = True
            logger.info("modbus {}: {}:{} answers", self.name, self.config.host, self.config.port)
            self._audit.append("modbus.online", source=self.name, host=self.config.host, port=self.config.port)
            self._audit.flush()
            self._write_status(force=True)

    def _went_offline(self, reason: str) -> None:
        self._health = "down"
        self._offline_reason = reason
        if self._online is not False:
            self._online = False
            logger.warning("modbus {}: offline: {}", self.name, reason)
            self._audit.append("modbus.offline", "error", source=self.name, reason=reason)
            self._audit.flush()
            self._write_status(force=True)

    def _note_problems(self, problems: list[str]) -> None:
        new = [problem for problem in problems if problem not in self._problems]
        for problem in new:
            logger.warning("modbus {}: {}", self.name, problem)
            self._audit.append("modbus.problem", "error", source=self.name, reason=problem)
        if not problems and self._problems:
            self._audit.append("modbus.recovered", source=self.name)
            new.append("")
        self._problems = set(problems)
        if new:
            self._audit.flush()
            self._write_status(force=True)

    def _note_states(self, states: dict[str, str]) -> None:
        for model, state in states.items():
            if self._states.get(model) != state:
                self._audit.append("modbus.state", source=self.name, model=model, state=state)
        if states != self._states:
            self._states = dict(states)
            self._audit.flush()

    def _record_description(self) -> None:
        self._audit.append("modbus.discovered", source=self.name, **self.discovered)
        if self._describe is not None:
            for der_id, reported in self.profile.described.items():
                changed = self._describe(der_id, reported)
                if changed:
                    self._audit.append("der.described", der_id=der_id, source=self.name, **changed)
        self._audit.flush()

    # -- status for `hubd source status` ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        last = self.last
        latencies = sorted(self.latencies_ms)
        return {
            "name": self.name,
            "kind": self.kind,
            "health": self._health,
            "online": self._online,
            "polls": self.polls,
            "last_poll": None
            if last is None
            else {
                "measured_at": format_time(last.measured_at),
                "spread_ms": last.spread_ms,
                "readings": [{"der_id": r.der_id, **r.values} for r in last.readings],
            },
            "latency_ms_p50": round(latencies[len(latencies) // 2], 3) if latencies else None,
            "latency_ms_p99": round(latencies[int(len(latencies) * 0.99)], 3) if latencies else None,
            "states": self._states,
            "problems": sorted(self._problems),
            "discovered": self.discovered,
            "written_at": format_time(now_ms()),
        }

    def _write_status(self, force: bool = False) -> None:
        every = max(STATUS_EVERY_S, self.config.poll_s) * 0.9  # a slower poll: its status after each
        if self._status_file is None or (not force and time.monotonic() - self._status_at < every):
            return
        self._status_at = time.monotonic()
        write_status(self._status_file, self.status(), self.kind, self.name)
