"""The hub's own clock, measured against NTP servers with ``ntplib``.

hubd measures and never sets the system clock: keeping it right is the system's time service's job (chrony or
systemd-timesyncd, docs/operations.md); two programs steering one clock fight. Each poll asks every configured
server once, each in a thread of its own (``ntplib`` blocks on a UDP socket, and a name lookup can block
longer: never on the event loop), and keeps the answer with the shortest round trip, NTP's own rule for
the most trustworthy sample. ``Clocks.judge_hub`` turns it into synchronised or an alarm.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

import ntplib  # type: ignore[import-untyped]
from loguru import logger

from hubd.clock.state import Clocks
from hubd.config import NtpConfig, ntp_address

T = TypeVar("T")


class NtpWatch:
    """Polls the configured NTP servers every ``poll_s`` and tells ``Clocks`` what it found."""

    def __init__(self, clocks: Clocks, config: NtpConfig) -> None:
        self._clocks = clocks
        self._config = config
        self._failing = False  # said once in the log when it starts failing, once when it recovers

    async def run(self) -> None:
        if not self._config.servers:
            return  # not measured: hub/v1/time says so, with the reason
        while True:
            await self.poll()
            await asyncio.sleep(self._config.poll_s)

    async def poll(self) -> None:
        """Ask every server once; record the best answer, or why there was none."""
        results = await asyncio.gather(*(self._ask(server) for server in self._config.servers))
        answers = [r for r in results if not isinstance(r, str)]
        if answers:
            server, stats = min(answers, key=lambda answer: answer[1].delay)
            self._clocks.hub_measured(server, round(stats.offset, 6), round(stats.delay, 6), int(stats.stratum))
            if self._failing:
                logger.info("NTP answers again: {} (offset {:+.4f} s)", server, stats.offset)
            self._failing = False
        else:
            error = "; ".join(r for r in results if isinstance(r, str))
            self._clocks.hub_failed(error)
            if not self._failing:
                logger.warning("no NTP server answered: {}", error)
            self._failing = True
        self._clocks.save()

    async def _ask(self, server: str) -> tuple[str, ntplib.NTPStats] | str:
        address = ntp_address(server)
        assert address is not None  # the config was checked
        host, port = address
        timeout = self._config.timeout_s
        try:
            stats = await in_thread(lambda: ntplib.NTPClient().request(host, version=4, port=port, timeout=timeout))
        except (OSError, ntplib.NTPException) as exc:
            return f"{server}: {exc or type(exc).__name__}"
        if stats.leap == 3 or not 1 <= stats.stratum <= 15:  # the server says it is not synchronised itself
            return f"{server}: not synchronised itself (stratum {stats.stratum})"
        return server, stats


async def in_thread(work: Callable[[], T]) -> T:
    """``work()`` in a daemon thread of its own, awaited: a lookup that hangs past the hub's stop must neither
    hold up its exit nor leave a worker that the interpreter waits for."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="hubd-ntp", daemon=True).start()
    return await done
