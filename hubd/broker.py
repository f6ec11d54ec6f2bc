"""The embedded Mosquitto broker hubd starts when no broker.url is configured.

Mosquitto runs as a child process with a configuration rendered from
``hubd/mosquitto/embedded.conf.in``. The child is driven with :class:`subprocess.Popen` and
polled, not with asyncio's subprocess support, so that the same code serves the
async hub (``start``/``stop``) and the sync test fixtures (``start_sync``/``stop_sync``)
and works from any thread or event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from hubd.config import LimitsConfig
from hubd.port_holder import describe_holder

__all__ = [
    "TEMPLATE_PATH",
    "BrokerNotInstalled",
    "BrokerNotStarted",
    "EmbeddedBroker",
    "PortInUse",
    "find_mosquitto",
    "free_port",
    "load_template",
    "packet_limit",
    "render_config",
]

#: The template, shipped inside the package (package data), so an installed wheel has it too.
TEMPLATE_PATH = Path(__file__).resolve().parent / "mosquitto" / "embedded.conf.in"

#: Where Mosquitto lives when it is not on PATH: Debian/Ubuntu install it to
#: /usr/sbin, which is often missing from a normal user's PATH; source builds use
#: /usr/local/sbin.
FALLBACK_EXECUTABLES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.02
_LOG_TAIL_LINES = 15
_FAILED_TAIL_LINES = 3  # enough for Mosquitto's reason, short enough for one line

_PLACEHOLDER = re.compile(r"\{[a-z_]+\}")
PACKET_HEADROOM = 256 * 1024  # a packet's bytes besides its payload that the broker allows (packet_limit)
_MOSQUITTO_LARGEST_PACKET = 268_435_456  # Mosquitto refuses a larger max_packet_size


class BrokerUnreachable(Exception):
    """The hub could not connect to its broker at start (not listening, refused, or its TLS certificate not
    trusted): said in one line, and the daemon exits (systemd's Restart= tries again)."""


class BrokerNotStarted(RuntimeError):
    """The embedded Mosquitto exited during start-up or did not listen in time; the message is one line that
    ends with what its log said last."""


class PortInUse(BrokerNotStarted):
    """Something else listens on the embedded broker's port: most often the system's own Mosquitto, which
    Debian's ``mosquitto`` package enables on 127.0.0.1:1883. Retrying cannot help, so the message names the
    holder and the ways out, and the CLI exits with the configuration-error status."""

    def __init__(self, port: int, bind: str, holder: str) -> None:
        self.port = port
        self.bind = bind
        self.holder = holder
        host = _connect_host(bind)
        url = f"mqtt://[{host}]:{port}" if ":" in host else f"mqtt://{host}:{port}"
        if "another hubd" in holder:  # two hubs on one broker would take the client id from each other
            ways = "stop that hubd, or set broker.embedded_port to a free port"
        else:
            ways = (
                f"to use that broker, set broker.url: {url}; to free the port, stop it "
                "(the system's Mosquitto: sudo systemctl disable --now mosquitto); "
                "or set broker.embedded_port to a free port"
            )
        super().__init__(
            f"cannot start the embedded broker: port {port} on {bind} is already in use by {holder}; {ways}"
        )


class BrokerNotInstalled(Exception):
    """Mosquitto is needed for the embedded broker but cannot be found."""

    def __init__(self, detail: str = "") -> None:
        message = (
            "Mosquitto is not installed: install it with `sudo apt-get install mosquitto` "
            "(Debian/Ubuntu), or set broker.url in hubd.yaml to use an existing broker."
        )
        super().__init__(f"{message} ({detail})" if detail else message)


def find_mosquitto(executable: str | None = None) -> str:
    """Return the path of the mosquitto binary, or raise BrokerNotInstalled.

    An explicit ``executable`` may be a path or a command name looked up on PATH.
    Without one, PATH is searched first and then the usual sbin locations.
    """
    if executable is not None:
        found = shutil.which(executable)
        if found is None:
            raise BrokerNotInstalled(f"{executable} not found or not executable")
        return found
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    for candidate in FALLBACK_EXECUTABLES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerNotInstalled("mosquitto is neither on PATH nor in " + ", ".join(FALLBACK_EXECUTABLES))


def load_template(template: Path | None = None) -> str:
    """Read the config template: ``template``, else the one shipped with hubd."""
    if template is not None:
        return template.read_text(encoding="utf-8")
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def _current_user() -> str:
    """The user name Mosquitto should keep running as (only matters when hubd is root)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # uid without a passwd entry; cannot be root, so `user` is ignored
        return "mosquitto"


def packet_limit(max_payload_bytes: int) -> int:
    """The broker's ``max_packet_size`` for hubd's ``limits.max_payload_bytes``: the payload and room for a
    PUBLISH's topic and properties (a topic, a response topic and correlation data of up to 64 KiB each), so a
    message hubd would take always gets through and a larger one is stopped at the broker. At most what
    Mosquitto accepts."""
    return min(max_payload_bytes + PACKET_HEADROOM, _MOSQUITTO_LARGEST_PACKET)


def render_config(
    template: str,
    *,
    port: int,
    bind: str,
    data_dir: Path,
    user: str | None = None,
    max_packet_size: int | None = None,
) -> str:
    """Fill the template's placeholders; values are checked so they cannot inject options. ``max_packet_size``
    defaults to ``packet_limit`` of the default ``limits.max_payload_bytes``."""
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    if max_packet_size is None:
        max_packet_size = packet_limit(LimitsConfig().max_payload_bytes)
    if not 20 <= max_packet_size <= _MOSQUITTO_LARGEST_PACKET:
        raise ValueError(f"max_packet_size out of range: {max_packet_size}")
    values = {
        "port": str(port),
        "bind": bind,
        "data_dir": str(data_dir.resolve()),
        "user": user if user is not None else _current_user(),
        "max_packet_size": str(max_packet_size),
    }
    for key, value in values.items():
        if not value or any(c in value for c in "\r\n\0"):
            raise ValueError(f"invalid {key} for the Mosquitto config: {value!r}")
        if key in ("bind", "user") and any(c.isspace() for c in value):
            raise ValueError(f"invalid {key} for the Mosquitto config: {value!r}")
    text = template
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    config_lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    leftover = _PLACEHOLDER.findall("\n".join(config_lines))
    if leftover:
        raise ValueError(f"unknown placeholders in the Mosquitto template: {sorted(set(leftover))}")
    return text


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now (the OS picks it; it may be taken later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _connect_host(bind: str) -> str:
    """The address to reach a listener bound to ``bind`` (wildcards mean loopback)."""
    if bind in ("0.0.0.0", ""):
        return "127.0.0.1"
    if bind == "::":
        return "::1"
    return bind


def _accepts(host: str, port: int) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A local Mosquitto that hubd starts from hubd/mosquitto/embedded.conf.in and stops on exit.

    Its files live in ``<data_dir>/mosquitto/``: the rendered ``mosquitto.conf``, the
    ``mosquitto.log`` (the broker's stderr, appended across runs) and the persistence
    database ``mosquitto.db``, which keeps hubd's queued QoS 1 messages across restarts.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 1883,
        bind: str = "127.0.0.1",
        executable: str | None = None,
        template: Path | None = None,
        max_packet_size: int | None = None,
    ) -> None:
        self.executable = find_mosquitto(executable)
        self.max_packet_size = max_packet_size
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.bind = bind
        self.template = template
        self.broker_dir = self.data_dir / "mosquitto"
        self.config_path = self.broker_dir / "mosquitto.conf"
        self.log_path = self.broker_dir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def host(self) -> str:
        """The address clients on this machine use to reach the broker."""
        return _connect_host(self.bind)

    @property
    def url(self) -> str:
        """The broker URL for hubd's MQTT client, e.g. ``mqtt://127.0.0.1:1883``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the Mosquitto process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id of the running broker, if any."""
        return self._process.pid if self._process is not None else None

    # -- start ------------------------------------------------------------------

    def _launch(self) -> None:
        """Render the config and spawn Mosquitto (does not wait for it to listen)."""
        if self._process is not None:
            raise RuntimeError("the embedded broker is already started")
        config = render_config(
            load_template(self.template),
            port=self.port,
            bind=self.bind,
            data_dir=self.data_dir,
            max_packet_size=self.max_packet_size,
        )
        # Without this check, our readiness probe would happily connect to whatever
        # already listens there while our Mosquitto is still failing to bind.
        if _accepts(self.host, self.port):
            raise PortInUse(self.port, self.bind, describe_holder(self.port, self.host))
        self.broker_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config_path.write_text(config, encoding="utf-8")
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self._process = subprocess.Popen(
                [self.executable, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.broker_dir,
                # Own process group: a Ctrl-C on hubd's terminal must not kill the broker
                # before hubd has disconnected; hubd stops it explicitly.
                start_new_session=True,
            )

    def _check_ready(self) -> bool:
        """True once Mosquitto listens; raise BrokerNotStarted if it has exited."""
        process = self._process
        assert process is not None
        if process.poll() is not None:
            self._failed(f"mosquitto exited with status {process.returncode} during start-up")
        if not _accepts(self.host, self.port):
            return False
        if process.poll() is not None:
            self._failed(f"mosquitto exited with status {process.returncode} during start-up")
        return True

    def _failed(self, reason: str) -> NoReturn:
        """Kill what is left of the process and raise in one line, with the log's tail."""
        self._kill_now()
        tail = self.log_tail(_FAILED_TAIL_LINES)
        if "Address already in use" in tail:  # bound by something that does not listen, so _launch missed it
            raise PortInUse(self.port, self.bind, describe_holder(self.port, self.host))
        raise BrokerNotStarted(f"{reason}; {self.log_path} says: {' | '.join(tail.splitlines())}")

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines the broker logged in this run (for error messages)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        tail = text.splitlines()[-lines:]
        return "\n".join(tail) if tail else "(log is empty)"

    def start_sync(self, timeout: float = START_TIMEOUT) -> None:
        """Start the broker and block until it accepts connections (for sync callers, tests)."""
        self._launch()
        deadline = time.monotonic() + timeout
        try:
            while not self._check_ready():
                if time.monotonic() >= deadline:
                    self._failed(f"mosquitto did not listen on port {self.port} within {timeout:g} s")
                time.sleep(_POLL_INTERVAL)
        except BaseException:  # interrupted: do not leave an orphan broker behind
            self._kill_now()
            raise

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the broker and wait until it accepts connections.

        Raises PortInUse if something else holds the port, else BrokerNotStarted with the last lines of the
        broker log if Mosquitto exits during start-up (e.g. an unreadable data dir) or does not listen in time.
        """
        self._launch()
        deadline = time.monotonic() + timeout
        try:
            while not self._check_ready():
                if time.monotonic() >= deadline:
                    self._failed(f"mosquitto did not listen on port {self.port} within {timeout:g} s")
                await asyncio.sleep(_POLL_INTERVAL)
        except BaseException:  # cancelled or interrupted: do not leave an orphan broker behind
            self._kill_now()
            raise

    # -- stop -------------------------------------------------------------------

    def _terminate(self) -> subprocess.Popen[bytes] | None:
        """Send SIGTERM (Mosquitto then saves its database) and return the process to wait for."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        return process

    def _kill_now(self) -> None:
        """SIGKILL and reap; used when start-up failed and there is nothing to save."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            process.wait()

    def stop_sync(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the broker: SIGTERM, wait up to ``timeout`` s, then SIGKILL. Idempotent."""
        process = self._terminate()
        if process is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
        self._kill_now()

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the broker: SIGTERM, wait up to ``timeout`` s, then SIGKILL. Idempotent."""
        process = self._terminate()
        if process is None:
            return
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_INTERVAL)
        self._kill_now()

    # -- context managers ----------------------------------------------------------

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __enter__(self) -> EmbeddedBroker:
        self.start_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_sync()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<EmbeddedBroker {self.url} {state}>"
