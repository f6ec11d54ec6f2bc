"""The embedded Mosquitto broker hubd starts when no broker.url is configured.

Mosquitto runs as a child process with a configuration rendered from
``hubd/mosquitto/embedded.conf.in``. The child is driven with :class:`subprocess.Popen` and
polled, not with asyncio's subprocess support, so that the same code serves the
async hub (``start``/``stop``) and the sync test fixtures (``start_sync``/``stop_sync``)
and works from any thread or event loop.

While the hub runs, ``supervise`` starts Mosquitto again whenever it dies (same port, same persistence). It
cannot outlive hubd: the kernel sends it SIGTERM when hubd's thread that started it dies (even by SIGKILL),
and one left from an earlier run all the same (hubd was root, so Mosquitto's change of user cleared that
signal; or the kernel was older) is found by its pid file and stopped at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from loguru import logger

from hubd.config import LimitsConfig
from hubd.port_holder import describe_holder

__all__ = [
    "TEMPLATE_PATH",
    "BrokerFailed",
    "BrokerNotInstalled",
    "BrokerNotStarted",
    "DataDirInUse",
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

#: Restarts of a broker that keeps dying: more than this many in a row, each within STEADY_S of its start,
#: and hubd gives up (one line; systemd's Restart= then starts the whole hub again).
MAX_RESTARTS = 5
STEADY_S = 60.0
_WATCH_INTERVAL = 0.05  # how often the supervisor looks at the process: a restart begins within this time

_PR_SET_PDEATHSIG = 1
_prctl = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), "prctl", None)

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


class DataDirInUse(BrokerNotStarted):
    """Another hubd runs its embedded broker on the same data directory; starting a second would stop the
    first one's broker (its pid file names it) or fight over the persistence file."""

    def __init__(self, broker_dir: Path) -> None:
        super().__init__(
            f"cannot start the embedded broker: another hubd already runs one on {broker_dir} "
            "(it holds hubd.lock there); stop that hubd, or give this one another data_dir"
        )


class BrokerFailed(BrokerNotStarted):
    """The embedded broker kept dying while the hub ran: it was started again MAX_RESTARTS times in a row."""


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
    dynsec: tuple[str, Path] | None = None,
) -> str:
    """Fill the template's placeholders; values are checked so they cannot inject options. ``max_packet_size``
    defaults to ``packet_limit`` of the default ``limits.max_payload_bytes``. ``dynsec``: the plugin's path and
    its file, for access control at the broker (anonymous access off); without it anonymous access is on."""
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
    access = "allow_anonymous true"
    if dynsec is not None:
        plugin, plugin_file = dynsec
        for value in (plugin, str(plugin_file)):
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"invalid plugin path for the Mosquitto config: {value!r}")
        access = f"allow_anonymous false\nplugin {plugin}\nplugin_opt_config_file {plugin_file.resolve()}"
    text = template
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    text = "\n".join(access if line.strip() == "{access_control}" else line for line in text.splitlines()) + "\n"
    config_lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    leftover = _PLACEHOLDER.findall("\n".join(config_lines))
    if leftover:
        raise ValueError(f"unknown placeholders in the Mosquitto template: {sorted(set(leftover))}")
    return text


def _die_with_parent(parent: int) -> Callable[[], None]:
    """The child's last step before exec: ask the kernel for SIGTERM when hubd's starting thread dies.

    Only a prctl call, prepared before the fork (the child of a threaded process must not import or lock).
    The kernel would clear the setting if the child changed its user; the embedded config keeps hubd's own
    (``user``), and the pid file covers a broker left running all the same at the next start.
    """
    prctl = _prctl

    def arm() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # hubd died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


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
        dynsec: tuple[str, Path] | None = None,
    ) -> None:
        self.executable = find_mosquitto(executable)
        self.dynsec = dynsec  # (plugin, its file): access control at the broker
        self.max_packet_size = max_packet_size
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.bind = bind
        self.template = template
        self.broker_dir = self.data_dir / "mosquitto"
        self.config_path = self.broker_dir / "mosquitto.conf"
        self.log_path = self.broker_dir / "mosquitto.log"
        self.pid_path = self.broker_dir / "mosquitto.pid"  # written by Mosquitto itself (pid_file)
        self.lock_path = self.broker_dir / "hubd.lock"
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._stopping = False
        self._lock: int | None = None  # the open lock file while this object runs a broker
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
            dynsec=self.dynsec,
        )
        self.broker_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._claim()
        try:
            self._stop_stale()
            # Without this check, our readiness probe would happily connect to whatever
            # already listens there while our Mosquitto is still failing to bind.
            if _accepts(self.host, self.port):
                raise PortInUse(self.port, self.bind, describe_holder(self.port, self.host))
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
                    preexec_fn=_die_with_parent(os.getpid()),
                )
        except BaseException:
            self._unclaim()
            raise
        self._started_at = time.monotonic()
        self._stopping = False

    def _claim(self) -> None:
        """Lock ``hubd.lock`` for as long as this object runs a broker: a second hubd on the same data directory
        is told so, instead of taking the first one's Mosquitto for a stale one and stopping it. The kernel
        releases the lock when hubd dies, however it dies (Mosquitto does not inherit it: close_fds)."""
        if self._lock is not None:
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUse(self.broker_dir) from None
        self._lock = fd

    def _unclaim(self) -> None:
        fd, self._lock = self._lock, None
        if fd is not None:
            os.close(fd)  # closing releases the lock

    def _stop_stale(self) -> None:
        """Stop a Mosquitto left running on our config by an earlier run, which holds our port and our database.

        Its pid file names it; it is stopped only if that process really runs our config (a pid may have been
        reused), and only by a hubd holding the lock (so no live hubd owns it). What cannot be stopped is
        named in one line.
        """
        try:
            pid = int(self.pid_path.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return
        if not self._runs_our_config(pid):
            return
        logger.warning("stopping the embedded broker left running by an earlier hubd (pid {})", pid)
        try:
            for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 1.0)):
                os.kill(pid, sig)  # SIGTERM first: Mosquitto saves its database on the way out
                deadline = time.monotonic() + wait
                while self._runs_our_config(pid) and time.monotonic() < deadline:
                    time.sleep(_POLL_INTERVAL)
                if not self._runs_our_config(pid):
                    return
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        raise BrokerNotStarted(
            f"cannot start the embedded broker: the one an earlier hubd left running (pid {pid}, on "
            f"{self.config_path}) could not be stopped; stop it (kill {pid}) and start hubd again"
        )

    def _runs_our_config(self, pid: int) -> bool:
        """True if process ``pid`` is a Mosquitto started on this broker's config (and not yet a zombie)."""
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"-c" in arguments and os.fsencode(self.config_path) in arguments

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
        self._stopping = True  # an exit from here on is ours: not one for ``supervise`` to repair
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
        self._unclaim()

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

    # -- supervising -------------------------------------------------------------------

    async def supervise(self, restarted: Callable[[int], None]) -> NoReturn:
        """Start the broker again, at once, each time it dies, until cancelled; ``restarted(status)`` follows each.

        Every message it had acknowledged to an edge and saved waits in its database, and hubd's driver
        reconnects by itself, so ingest resumes without an operator. A broker that dies again and again
        (more than MAX_RESTARTS times in a row, each within STEADY_S of its start) will not be helped by
        more of the same: BrokerFailed then says so in one line, with what its log said last.
        """
        in_a_row = 0
        while True:
            process = self._process
            if process is None:
                raise RuntimeError("the embedded broker is not started")
            while process.poll() is None or self._stopping:
                await asyncio.sleep(_WATCH_INTERVAL)
            status = process.returncode
            in_a_row = 1 if time.monotonic() - self._started_at >= STEADY_S else in_a_row + 1
            if in_a_row > MAX_RESTARTS:
                tail = " | ".join(self.log_tail(_FAILED_TAIL_LINES).splitlines())
                raise BrokerFailed(
                    f"the embedded broker died {in_a_row} times in a row within {STEADY_S:g} s of its start, "
                    f"the last time with status {status}; {self.log_path} says: {tail}"
                )
            logger.warning("the embedded broker exited with status {}; starting it again", status)
            self._process = None  # reaped by poll()
            self._unclaim()
            await self.start()
            restarted(status)

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
