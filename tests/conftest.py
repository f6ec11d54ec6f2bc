"""Shared pytest fixtures.

Tests are plain sync functions (no pytest-asyncio): async code runs via asyncio.run or
in a background thread, so fixtures here are sync too.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from loguru import logger

from hubd.app import Hub
from hubd.auth.credentials import hash_password
from hubd.broker import EmbeddedBroker, free_port, load_template
from hubd.cli import main as hubd_main
from hubd.config import load_config

# -- hygiene ---------------------------------------------------------------------------

THREAD_GRACE_SECONDS = 2.0


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves non-daemon threads running.

    A leftover non-daemon thread (a hub loop not shut down, an executor not closed)
    keeps the interpreter from exiting and leaks into later tests. Threads get a short
    grace period to finish after the test's own teardown.
    """
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_SECONDS
    leaked: list[threading.Thread] = []
    for thread in threading.enumerate():
        if thread in before or thread.daemon or thread is threading.current_thread():
            continue
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            leaked.append(thread)
    if leaked:
        names = ", ".join(repr(t.name) for t in leaked)
        pytest.fail(f"test left non-daemon threads running: {names}", pytrace=False)


@pytest.fixture
def problems() -> Iterator[list[str]]:
    """Warnings and errors in the hub's operational log during the test: bad input is an ordinary event, and
    one that makes the hub log a failure (a message not acknowledged, a lost connection) is not handled."""
    found: list[str] = []
    sink = logger.add(lambda m: found.append(str(m)), level="WARNING", format="{level} {message}")
    try:
        yield found
    finally:
        logger.remove(sink)


# -- MQTT broker -----------------------------------------------------------------------


@contextmanager
def broker_allowing(tmp_path: Path, in_flight: int) -> Iterator[EmbeddedBroker]:
    """A running embedded Mosquitto that takes at most ``in_flight`` unacknowledged QoS 1 messages from a
    client (max_inflight_messages, which it announces as its Receive Maximum)."""
    text, count = re.subn(r"(?m)^max_inflight_messages \d+$", f"max_inflight_messages {in_flight}", load_template())
    assert count == 1, "the embedded template no longer sets max_inflight_messages"
    template = tmp_path / f"inflight-{in_flight}.conf.in"
    template.write_text(text, encoding="utf-8")
    embedded = EmbeddedBroker(tmp_path / f"inflight-{in_flight}-data", port=free_port(), template=template)
    embedded.start_sync()
    try:
        yield embedded
    finally:
        embedded.stop_sync()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A running embedded Mosquitto on a free loopback port, with its data in tmp_path.

    Use ``broker.url`` (``mqtt://127.0.0.1:<port>``), ``broker.host``/``broker.port``;
    its log is ``broker.log_path``. Stopped (SIGTERM, then SIGKILL) after the test.
    """
    embedded = EmbeddedBroker(tmp_path / "broker-data", port=free_port())
    embedded.start_sync()
    try:
        yield embedded
    finally:
        embedded.stop_sync()


# -- a running hub ---------------------------------------------------------------------


INITIAL_PASSWORD = "initial-secret-0f9a"  # the hub's initial password in tests
TEST_BCRYPT_ROUNDS = 4  # bcrypt's cost does not change behaviour; cost 4 keeps the suite fast


@dataclass
class RunningHub:
    """A hub running in a background thread against the test broker, driven like a user would."""

    config_path: Path
    broker: EmbeddedBroker
    prefix: str = "hub/v1"
    initial_password: str = INITIAL_PASSWORD
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _hub: Hub | None = None
    errors: list[BaseException] = field(default_factory=list)

    @property
    def config(self) -> Any:
        return load_config(self.config_path)

    def start(self) -> None:
        ready = threading.Event()

        def serve() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                self._hub = Hub(load_config(self.config_path))
                task = asyncio.create_task(self._hub.run())
                waiter = asyncio.create_task(self._hub.ready.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                ready.set()
                await task

            try:
                asyncio.run(main())
            except BaseException as exc:  # surfaced by stop()
                self.errors.append(exc)
                ready.set()

        self._thread = threading.Thread(target=serve, name="hubd-test-hub")
        self._thread.start()
        if not ready.wait(20):
            raise RuntimeError("hub did not become ready")
        if self.errors:
            raise self.errors[0]

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._hub is not None:
            self._loop.call_soon_threadsafe(self._hub.stop)
        self._thread.join(30)
        assert not self._thread.is_alive(), "hub did not stop"
        self._thread = None
        if self.errors:
            raise self.errors[0]

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- talking to it as a user would ------------------------------------------------------------------

    def cli(self, *args: str, input: str | None = None) -> Result:
        """Run ``hubd --config <file> ARGS`` in-process."""
        return CliRunner().invoke(hubd_main, ["--config", str(self.config_path), *args], input=input)

    def rr(self, topic: str, body: dict[str, Any] | bytes | str, timeout: int = 10) -> dict[str, Any]:
        """Request/response with ``mosquitto_rr`` (MQTT v5 response topic + correlation data)."""
        payload = body if isinstance(body, bytes | str) else json.dumps(body)
        out = subprocess.run(
            [
                "mosquitto_rr",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.broker.port),
                "-q",
                "1",
                "-t",
                topic,
                "-e",
                f"test/answers/{os.getpid()}/{time.monotonic_ns()}",
                "-m",
                payload,
                "-W",
                str(timeout),
            ],
            capture_output=True,
            timeout=timeout + 5,
            check=False,
        )
        assert out.returncode == 0, f"mosquitto_rr failed ({out.returncode}): {out.stderr.decode()}"
        return dict(json.loads(out.stdout))

    def pub(self, topic: str, body: dict[str, Any] | bytes | str) -> None:
        """Fire and forget with ``mosquitto_pub`` at QoS 1."""
        payload = body if isinstance(body, bytes | str) else json.dumps(body)
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.broker.port), "-q", "1", "-t", topic, "-m", payload],
            check=True,
            timeout=10,
        )

    def register(self, der_id: str, der_type: str = "pv", **extra: Any) -> str:
        """Allowlist and register a DER; return its unique password."""
        assert self.cli("der", "add", der_id, "--type", der_type).exit_code == 0
        answer = self.rr(
            f"{self.prefix}/register", {"der_id": der_id, "password": self.initial_password, "type": der_type, **extra}
        )
        assert answer["ok"], answer
        return str(answer["password"])

    def consumer(self, name: str = "market-1") -> str:
        """Create a consumer system; return its password."""
        result = self.cli("system", "add", name, "--role", "consumer")
        assert result.exit_code == 0, result.output
        return result.output.strip()


def write_config(path: Path, broker: EmbeddedBroker, **overrides: Any) -> Path:
    """A hubd.yaml for tests: the test broker, fast bcrypt, data in ``path``'s folder."""
    config: dict[str, Any] = {
        "data_dir": str(path.parent / "data"),
        "broker": {"url": broker.url, "client_id": f"hubd-test-{broker.port}"},
        "auth": {
            "initial_password_hash": hash_password(INITIAL_PASSWORD, TEST_BCRYPT_ROUNDS),
            "bcrypt_rounds": TEST_BCRYPT_ROUNDS,
        },
        "log": {"level": "WARNING"},
        "http": {"bind": "127.0.0.1:0"},  # the operator's listener on a free port
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def hub_factory(tmp_path: Path, broker: EmbeddedBroker) -> Iterator[Any]:
    """Start hubs with config overrides: ``hub_factory(auth={"registration_mode": "open"})``."""
    started: list[RunningHub] = []

    def make(**overrides: Any) -> RunningHub:
        path = write_config(tmp_path / f"hubd-{len(started)}.yaml", broker, **overrides)
        running = RunningHub(path, broker)
        running.start()
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def hub(hub_factory: Any) -> RunningHub:
    """A hub with the default settings (allowlist registration) on the test broker."""
    return hub_factory()  # type: ignore[no-any-return]
