"""The sources' clocks over MQTT: checked on a schedule, told to correct themselves, checked again.

A check is a few requests on ``<prefix>/time/check/<source_id>`` (docs/protocol.md, Time), one after the
other. Each gives the four timestamps of NTP: the hub's send time t1, the source's receive time t2 (its
``received_at``, when it says it; else its ``source_time``), the source's send time t3 (``source_time``), the
hub's receive time t4. Offset ``((t2 - t1) + (t3 - t4)) / 2`` (the source minus the hub), round trip
``(t4 - t1) - (t3 - t2)``. A sample whose round trip is far above the shortest is discarded: a delay on one
leg only (a broker busy for a moment) biases the offset by half of it, and the shortest round trip is the
least biased. Beyond the tolerance the hub sends ``<prefix>/time/set/<source_id>`` and checks again.

Checks run on a connection of their own, not the hub's data session: a source that answers slowly or never
costs the data path nothing. The answers come to ``<prefix>/time/answers/<client id>``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from functools import partial
from typing import Any

from loguru import logger

from hubd.audit import AuditLog
from hubd.client import HubClient
from hubd.clock.state import Clocks, SourceClock, SourceState
from hubd.config import BrokerConfig, EdgeClockConfig
from hubd.model import HubError, format_time, now_ms, parse_time
from hubd.mqtt.driver import tls_context

_TICK_S = 1.0  # how often the schedule looks for sources due
_AT_ONCE = 8  # sources checked at the same time
_RECONNECT_S = (1.0, 60.0)
_AFTER_SET_S = (0.0, 1.0, 3.0)  # pauses before the checks that follow a set command
_OFF_AGAIN_S = 300.0  # a source still off after a set is checked (and told) again this soon


class EdgeChecks:
    """Checks every source that sent data, every ``interval_s``; a new source at once."""

    def __init__(
        self,
        clocks: Clocks,
        config: EdgeClockConfig,
        prefix: str,
        broker: BrokerConfig,
        url: str,
        audit: AuditLog,
        password: str | None = None,
    ) -> None:
        self._clocks = clocks
        self._config = config
        self._prefix = prefix
        self._url = url
        self._broker = broker
        self._password = password
        self._audit = audit
        self.inbox = f"{prefix}/time/answers/{broker.client_id}"
        self._running: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Until cancelled; the connection is made again, with a growing pause, when the broker goes away."""
        delay = _RECONNECT_S[0]
        while True:
            try:
                # Under access control at the broker, its own principal bound to this one client id (hubd.auth.dynsec)
                pinned = self._broker.access_control != "none"
                async with HubClient(
                    self._url,
                    f"{self._broker.client_id}-clock",
                    inbox=self.inbox,
                    username=f"{self._broker.username}-clock" if pinned else self._broker.username,
                    password=self._password if self._broker.username else None,
                    client_id=f"{self._broker.client_id}-clock" if pinned else None,
                    tls=tls_context(self._broker) if self._url.startswith("mqtts") else None,
                ) as client:
                    delay = _RECONNECT_S[0]
                    await self._schedule(client)
            except Exception as exc:  # OSError, MqttError, a lost connection: all end in a new connection
                logger.warning("clock checks: no connection to the broker ({}); trying again", exc)
            finally:
                for task in self._running.values():
                    task.cancel()
                await asyncio.gather(*self._running.values(), return_exceptions=True)
                self._running.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_S[1])

    async def _schedule(self, client: HubClient) -> None:
        while client.connected:
            now = time.monotonic()
            recent = now_ms() - max(3 * self._config.interval_s, 3600) * 1000
            for source in list(self._clocks.sources.values()):
                if source.source_id == "unknown" or not source.checkable or source.source_id in self._running:
                    continue
                if source.due > now or source.last_seen < recent or len(self._running) >= _AT_ONCE:
                    continue
                source.due = now + self._config.interval_s
                task = asyncio.create_task(self._check(client, source), name=f"hubd-clock-{source.source_id}")
                self._running[source.source_id] = task
                task.add_done_callback(partial(self._finished, source.source_id))
            self._clocks.save()
            await asyncio.sleep(_TICK_S)

    def _finished(self, source_id: str, _: object) -> None:
        self._running.pop(source_id, None)

    async def _check(self, client: HubClient, source: SourceClock) -> None:
        """One check; beyond the tolerance a set command and a second check. Every step audited."""
        try:
            state, offset, rtt = await self.measure(client, source.source_id)
            self._record(source, state, offset, rtt)
            if state != "off" or not self._config.set_clock or offset is None:
                return
            told = await self._set(client, source, offset)
            if told != "ok":
                return
            self._clocks.corrected(source)
            # A terminal may answer before its correction takes effect: a few checks, further apart each time.
            for pause in _AFTER_SET_S:
                await asyncio.sleep(pause)
                state, offset, rtt = await self.measure(client, source.source_id)
                self._record(source, state, offset, rtt, after_set=True)
                if state != "off":
                    return
            # Still off: told again at the next check, which comes sooner than the schedule's.
            source.due = min(source.due, time.monotonic() + _OFF_AGAIN_S)
        except Exception:  # one source's trouble must not end the schedule
            logger.exception("checking the clock of {} failed", source.source_id)
        finally:
            self._clocks.save()

    async def measure(self, client: HubClient, source_id: str) -> tuple[SourceState, float | None, float | None]:
        """(state, offset in s, shortest round trip in s) from up to ``samples`` requests."""
        topic = f"{self._prefix}/time/check/{source_id}"
        samples: list[tuple[float, float]] = []
        for _ in range(self._config.samples):
            t1 = time.time()
            try:
                answer = await client.request(
                    topic,
                    {"hub_time": format_time(int(t1 * 1000))},
                    timeout=self._config.answer_timeout_s,
                    with_reply_to=True,
                )
            except TimeoutError:
                break
            t4 = time.time()
            sample = _sample(answer, t1, t4)
            if sample is None:
                return "refused", None, None
            samples.append(sample)
        if not samples:
            return "unanswered", None, None
        shortest = min(rtt for rtt, _ in samples)
        kept = [offset for rtt, offset in samples if rtt <= 2 * shortest + 0.002]
        offset = round(statistics.median(kept), 4)
        state: SourceState = "off" if abs(offset) > self._config.tolerance_s else "ok"
        return state, offset, round(shortest, 4)

    def _record(
        self, source: SourceClock, state: SourceState, offset: float | None, rtt: float | None, after_set: bool = False
    ) -> None:
        self._clocks.checked(source, offset, rtt, state)
        fields: dict[str, Any] = {"source_id": source.source_id, "offset_s": offset, "rtt_s": rtt}
        if after_set:
            fields["after_set"] = True
        self._audit.append("time.checked", state, **fields)
        self._audit.flush()
        if state in ("off", "unanswered", "refused"):
            logger.info("clock of {}: {} (offset {} s)", source.source_id, state, offset)

    async def _set(self, client: HubClient, source: SourceClock, offset: float) -> str:
        """Tell the source to correct its clock by ``offset`` (source minus hub); the outcome, audited."""
        topic = f"{self._prefix}/time/set/{source.source_id}"
        body = {"hub_time": format_time(now_ms()), "offset_s": offset}
        try:
            answer = await client.request(topic, body, timeout=self._config.answer_timeout_s, with_reply_to=True)
            outcome = "ok" if answer.get("ok") is True else "refused"
        except TimeoutError:
            outcome = "unanswered"
        self._audit.append("time.set", outcome, source_id=source.source_id, offset_s=offset)
        self._audit.flush()
        return outcome


def _sample(answer: dict[str, Any], t1: float, t4: float) -> tuple[float, float] | None:
    """(round trip, offset) from one answer, or None when it is not a good one."""
    if answer.get("ok") is not True:
        return None
    try:
        t3 = parse_time(answer.get("source_time"), "source_time") / 1000
        t2 = parse_time(answer["received_at"], "received_at") / 1000 if "received_at" in answer else t3
    except HubError:
        return None
    if t3 < t2:
        t2 = t3
    return (t4 - t1) - (t3 - t2), ((t2 - t1) + (t3 - t4)) / 2
