"""systemd's notification protocol (sd_notify), spoken directly: one datagram per message to $NOTIFY_SOCKET.

The protocol is a few lines of text over a Unix datagram socket, so hubd speaks it itself rather than
depending on libsystemd or a wrapper. ``READY=1`` is sent once the broker session, the store and the sources
are up; ``STOPPING=1`` when the hub starts to drain; ``WATCHDOG=1`` from a task on the event loop, so a
blocked or stuck loop stops the pings and systemd restarts the hub after ``WatchdogSec``; ``STATUS=`` a
one-line summary ``systemctl status`` shows.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

from loguru import logger


class Notifier:
    """Sends notifications to the service manager; without $NOTIFY_SOCKET (not under systemd) it does nothing."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket: its name starts with a NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        self.watchdog_s = _watchdog_interval(env)
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` (``READY=1``, ``STATUS=…``) as one message; False when not under systemd or it failed."""
        if self._socket is None:
            return False
        try:
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # said once: the hub serves on without its service manager's notifications
            if not self._failed:
                logger.warning("cannot notify systemd at {}: {}", self._address.replace("\0", "@"), exc)
                self._failed = True
            return False
        return True

    async def watchdog(self, status: Callable[[], str]) -> None:
        """Ping at half the watchdog interval, with the status line, for as long as the event loop runs it."""
        if self.watchdog_s is None:
            return
        while True:
            self.send("WATCHDOG=1", f"STATUS={status()}")
            await asyncio.sleep(self.watchdog_s / 2)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """systemd's WatchdogSec in seconds, when it asked this process (WATCHDOG_PID, if set, names us)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1_000_000
