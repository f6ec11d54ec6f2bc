"""A real InfluxDB 1.x server (Debian's ``influxd``) for the tests: free loopback ports, temporary directories.

Both of its listeners are moved off their fixed defaults: the HTTP API (``[http] bind-address``) and the RPC
service used for backups (the top-level ``bind-address``, 8088 by default), so several test runs can share a
machine. Usage reporting and the ``_internal`` monitor database are off. ``kill`` and ``start`` let a test take
it away mid-stream and bring it back on the same port with the same data.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hubd.broker import free_port
from hubd.config import Config, parse_config

_CONFIG = """\
reporting-enabled = false
bind-address = "127.0.0.1:{rpc}"

[meta]
  dir = "{root}/meta"
  logging-enabled = false

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false

[monitor]
  store-enabled = false

[http]
  bind-address = "127.0.0.1:{http}"
  log-enabled = false
  auth-enabled = {auth}

[logging]
  level = "warn"
"""


def available() -> bool:
    return shutil.which("influxd") is not None


class InfluxServer:
    """``influxd run`` on free ports, with its meta, data and WAL under ``root``."""

    def __init__(self, root: Path, auth: bool = False, cpus: set[int] | None = None) -> None:
        self.root = root
        self.cpus = cpus  # the CPUs it may run on (bench/influx --pin); None: any
        self.port = free_port()
        self.rpc_port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "influxdb.conf"
        self.config_path.write_text(
            _CONFIG.format(root=root, rpc=self.rpc_port, http=self.port, auth=str(auth).lower()), encoding="utf-8"
        )
        self.log_path = root / "influxd.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The running ``influxd``'s process id (the benches count its CPU)."""
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        """Start it and wait for /ping; if it does not answer, it is stopped before the error is raised."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                ["influxd", "run", "-config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "INFLUXDB_REPORTING_DISABLED": "true"},
                preexec_fn=None if self.cpus is None else lambda: os.sched_setaffinity(0, self.cpus or set()),
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"influxd ended: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as answer:
                    if answer.status == 204:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("influxd did not answer /ping within 30 s")

    def kill(self) -> None:
        """SIGKILL: no shutdown, as a crash or an OOM kill would end it."""
        if self._process is not None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(10)
            self._process = None

    def pause(self) -> None:
        """SIGSTOP: it keeps its connections but answers nothing, as an overloaded server would."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
            self._process = None

    def query(self, q: str, database: str | None = None, auth: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        """The series of an InfluxQL statement (``epoch=ms``), for checking what the hub wrote."""
        params = {"q": q, "epoch": "ms", **({"db": database} if database else {})}
        url = f"{self.url}/query"
        if auth is not None:  # in the URL: 1.x reads the credentials from the URL or a header, not a form
            url = f"{self.url}/query?" + urllib.parse.urlencode({"u": auth[0], "p": auth[1]})
        body = urllib.parse.urlencode(params).encode()
        with urllib.request.urlopen(url, data=body, timeout=10) as answer:
            result = json.loads(answer.read())["results"][0]
        if "error" in result:
            raise RuntimeError(result["error"])
        return list(result.get("series", []))

    def write(self, database: str, lines: str) -> None:
        url = f"{self.url}/write?db={database}&precision=ms"
        with urllib.request.urlopen(url, data=lines.encode(), timeout=10) as answer:
            assert answer.status == 204


_databases = iter(range(1, 1_000_000))


def fresh_database(server: InfluxServer) -> str:
    """A new, empty database on ``server``: each test its own."""
    name = f"hubd_test_{next(_databases)}"
    server.query(f'CREATE DATABASE "{name}"')
    return name


@pytest.fixture(scope="module")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """One server per test module (each test takes its own database); import it into the module."""
    server = InfluxServer(tmp_path_factory.mktemp("influxd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_influxd(tmp_path: Path) -> Iterator[InfluxServer]:
    """A server for one test alone, which the test may kill and start again."""
    server = InfluxServer(tmp_path / "influxd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def drained(sink: Any, seconds: float = 10.0) -> None:
    """Wait until an InfluxSink's spool is empty (its replay done), or ``seconds``."""
    for _ in range(int(seconds / 0.05)):
        if not sink.spooled:
            return
        await asyncio.sleep(0.05)


def sqlite_and_influx(tmp_path: Path, server: InfluxServer) -> dict[str, Config]:
    """Configs of both backends, the InfluxDB one on a fresh database of ``server``."""
    influx = {"url": server.url, "database": fresh_database(server)}
    return {
        "sqlite": parse_config({"data_dir": str(tmp_path / "sqlite")}),
        "influxdb": parse_config(
            {"data_dir": str(tmp_path / "influx"), "store": {"backend": "influxdb", "influxdb": influx}}
        ),
    }
