"""systemd's notifications, received on a real datagram socket given as NOTIFY_SOCKET: READY=1 only once the
store and the broker session are up, WATCHDOG=1 while the event loop runs and none while it is blocked,
STOPPING=1 on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import write_config

from hubd.broker import EmbeddedBroker, free_port

HUBD = Path(sys.executable).parent / "hubd"


class Listener:
    """A datagram socket as systemd's: every message with the time it came."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-listener")
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, line: str, timeout: float = 20) -> float:
        """When the first message holding ``line`` came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, text in list(self.messages):
                if line in text.splitlines():
                    return at
            time.sleep(0.01)
        raise AssertionError(f"no {line} in {self.messages}")

    def pings(self, start: float, end: float) -> list[float]:
        return [at for at, text in self.messages if start <= at < end and "WATCHDOG=1" in text.splitlines()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@contextmanager
def listening(address: str) -> Iterator[Listener]:
    listener = Listener(address)
    try:
        yield listener
    finally:
        listener.close()


def test_hubd_run_is_ready_after_the_store_pings_the_watchdog_and_says_stopping(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    port = free_port()
    config = write_config(tmp_path / "hubd.yaml", broker, http={"bind": f"127.0.0.1:{port}"})
    address = f"@hubd-test-{uuid.uuid4().hex}"  # an abstract socket, as systemd may give
    with listening(address) as listener:
        env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
        process = subprocess.Popen([str(HUBD), "--config", str(config), "run"], env=env, stderr=subprocess.PIPE)
        try:
            listener.wait_for("READY=1")
            # Ready means ready: the store holds its table, the broker session and the listener are up.
            readings = tmp_path / "data" / "readings.sqlite3"
            with sqlite3.connect(readings) as db:
                assert db.execute("SELECT count(*) FROM readings").fetchone() == (0,)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                assert response.status == 200
            first = listener.messages[0][1].splitlines()
            assert first[0] == "READY=1" and first[1].startswith("STATUS=broker connected, sources up"), first
            time.sleep(1.0)
            now = time.monotonic()
            assert len(listener.pings(now - 1.0, now)) >= 5  # every 0.1 s (half of WatchdogSec)
            process.send_signal(signal.SIGTERM)
            assert process.wait(20) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            assert process.stderr is not None
            stderr = process.stderr.read().decode()
        stopping = listener.wait_for("STOPPING=1", timeout=1)
        assert not listener.pings(stopping, time.monotonic()), "no watchdog ping after STOPPING=1"
    assert "Traceback" not in stderr, stderr


def test_no_watchdog_ping_while_the_event_loop_is_blocked(tmp_path: Path, hub_factory: Any, monkeypatch: Any) -> None:
    address = str(tmp_path / "notify.sock")
    with listening(address) as listener:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        hub = hub_factory()
        listener.wait_for("READY=1")
        time.sleep(0.5)
        assert hub._loop is not None
        blocked = threading.Event()

        def block() -> None:
            blocked.set()
            time.sleep(1.5)  # a stuck step on the event loop

        hub._loop.call_soon_threadsafe(block)
        assert blocked.wait(5)
        start = time.monotonic()
        time.sleep(1.3)
        assert listener.pings(start + 0.05, start + 1.3) == [], "a ping came while the loop was blocked"
        time.sleep(0.8)  # unblocked at start + 1.5: the pings come again
        assert len(listener.pings(start + 1.5, time.monotonic())) >= 2
