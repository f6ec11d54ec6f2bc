"""bench/ingest: hubd's end-to-end ingest rate and memory, against the raw limit of the same broker.

What it does (see bench/README.md for the figures and what limits them):

1. starts its own Mosquitto (hubd.broker.EmbeddedBroker, free loopback port, data in a temp dir) and the hub
   as a separate process (``hubd --config <tmp>/hubd.yaml run``), so the hub's memory can be read from
   /proc/<pid>/status;
2. allowlists the DERs with ``hubd der import`` and registers each over MQTT v5 (one bcrypt hash each);
3. for each case (A: one reading per message, B: many readings per message) publishes native ``hub.v1``
   lines with ``mosquitto_pub -l -q 1``, first to a topic nobody but ``mosquitto_sub`` reads (the raw limit),
   then to the hub's data topic, and times publish start → the last answer (the hub answers after commit)
   received by ``mosquitto_sub``; then checks every answer and the row count of the store;
4. reads the hub's VmRSS/VmHWM after case B, then runs a second hub with 100,000 DERs registered (one
   shared bcrypt hash written into the registry, a bench-only shortcut) and reads them again.

Everything runs on 127.0.0.1, every wait has a timeout, and every process started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import platform
import resource
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import yaml

from hubd.auth.credentials import hash_password
from hubd.broker import EmbeddedBroker, free_port
from hubd.client import HubClient
from hubd.config import Config, load_config
from hubd.store.factory import open_query

HOST = "127.0.0.1"
PREFIX = "hub/v1"
ANSWERS = "bench/answers"
RAW = "bench/raw"
PROBE = "bench/probe"
INITIAL_PASSWORD = "bench-initial-password-0001"
SOURCE_ID = "bench-edge"
TARGET_RSS_MB = 300


# -- processes -----------------------------------------------------------------------------------------


class Processes:
    """Every child process this run starts, so that ``stop_all`` can end each one (and only those)."""

    def __init__(self) -> None:
        self._children: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(args, **kwargs)
        self._children.append(child)
        return child

    def stop_all(self) -> None:
        for child in self._children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.terminate()
        for child in self._children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=5)


HUBD_COMMAND: list[str] = []  # --hubd: the command that runs hubd (default: the venv's console script)


def hubd_executable() -> str:
    """The ``hubd`` console script next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "hubd"
    if beside.exists():
        return str(beside)
    found = shutil.which("hubd")
    if found is None:
        raise SystemExit("hubd is not installed: run ./dev bench, or pip install -e . in a venv")
    return found


def hubd_cli(config: Path, *args: str, timeout: float) -> str:
    out = subprocess.run(
        [*(HUBD_COMMAND or [hubd_executable()]), "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"hubd {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


class HubProcess:
    """``hubd --config FILE run`` as a child process, its log in a file."""

    def __init__(self, processes: Processes, config: Path, log: Path) -> None:
        self._processes = processes
        self.config = config
        self.log = log
        self._child: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._child is not None
        return self._child.pid

    def start(self, timeout: float) -> float:
        """Start the hub and wait until it serves; return how long that took."""
        began = time.monotonic()
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self._child = self._processes.start(
                [*(HUBD_COMMAND or [hubd_executable()]), "--config", str(self.config), "run"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = began + timeout
        while time.monotonic() < deadline:
            if self._child.poll() is not None:
                raise RuntimeError(f"the hub exited with {self._child.returncode} at start:\n{self.log_tail(offset)}")
            if b"hubd serving on" in self.log.read_bytes()[offset:]:
                return time.monotonic() - began
            time.sleep(0.05)
        raise RuntimeError(f"the hub did not serve within {timeout:g} s:\n{self.log_tail(offset)}")

    def log_tail(self, offset: int = 0, lines: int = 20) -> str:
        text = self.log.read_bytes()[offset:].decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MB of the hub with its store writer process, from /proc/<pid>/status."""
        values: dict[str, float] = {"VmRSS": 0.0, "VmHWM": 0.0}
        for pid in (self.pid, *child_pids(self.pid)):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] += int(rest.split()[0]) / 1024  # kB → MB
        return values["VmRSS"], values["VmHWM"]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the hub commits and answers what it holds), then SIGKILL after ``timeout``."""
        child, self._child = self._child, None
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"  the hub did not stop within {timeout:g} s; killing it", flush=True)
            child.kill()
            child.wait(timeout=5)


# -- setup ---------------------------------------------------------------------------------------------


def write_config(path: Path, data_dir: Path, broker_url: str, client_id: str, rounds: int, sets: list[str]) -> None:
    config: dict[str, Any] = {
        "data_dir": str(data_dir),
        "broker": {"url": broker_url, "client_id": client_id},
        "auth": {"initial_password_hash": hash_password(INITIAL_PASSWORD, rounds), "bcrypt_rounds": rounds},
        "log": {"level": "INFO"},
        "http": {"bind": "127.0.0.1:0"},  # the operator's listener on a free port
    }
    for item in sets:  # --set store.sqlite.synchronous=normal
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def write_allowlist(path: Path, der_ids: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["der_id", "type"])
        writer.writerows([der_id, "pv"] for der_id in der_ids)


async def register_all(url: str, der_ids: list[str], concurrency: int, timeout: float) -> dict[str, str]:
    """Register every DER over MQTT v5 (``concurrency`` requests in flight); return their unique passwords."""
    passwords: dict[str, str] = {}
    async with HubClient(url, "bench-register") as client:
        slots = asyncio.Semaphore(concurrency)

        async def one(der_id: str) -> None:
            async with slots:
                answer = await client.request(
                    f"{PREFIX}/register",
                    {"der_id": der_id, "password": INITIAL_PASSWORD, "type": "pv"},
                    timeout=timeout,
                )
            if not answer.get("ok"):
                raise RuntimeError(f"registration of {der_id} failed: {answer}")
            passwords[der_id] = str(answer["password"])

        await asyncio.gather(*(one(der_id) for der_id in der_ids))
    return passwords


def iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_lines(path: Path, messages: int, per_message: int, passwords: dict[str, str], base_ms: int) -> int:
    """One native hub.v1 message per line; reading k goes to DER k mod D at base + (k div D) seconds, and each
    message carries its send time (``sent_at``), as an edge sends it.

    So every reading has its own (der_id, measured_at) and each DER's readings are one second apart.
    Returns the number of readings written.
    """
    der_ids = list(passwords)
    count = len(der_ids)
    k = 0
    with path.open("wb") as out:
        for m in range(messages):
            readings = []
            for _ in range(per_message):
                der_id = der_ids[k % count]
                readings.append(
                    {
                        "der_id": der_id,
                        "password": passwords[der_id],
                        "measured_at": iso(base_ms + (k // count) * 1000),
                        "power_kw": round(3.0 + (k % 997) / 1000, 3),
                        "energy_kwh": round(1000 + k / 1000, 3),
                        "voltage_v": round(200 + (k % 50) / 10, 1),
                        "power_factor": 0.98,
                    }
                )
                k += 1
            line = {"source_id": SOURCE_ID, "reply_to": ANSWERS, "request_id": m, "readings": readings}
            line["sent_at"] = iso(base_ms + ((k - 1) // count) * 1000)  # the send time: its last reading's
            out.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
    return k


# -- one timed run -------------------------------------------------------------------------------------


@dataclass
class Timed:
    seconds: float  # publish start → last message (or answer) received
    publish_s: float  # publish start → mosquitto_pub exited (all PUBACKs in)
    received: list[bytes] = field(default_factory=list)
    cpu: dict[str, tuple[float, float]] = field(default_factory=dict)  # process → (user s, system s)

    def cpu_text(self) -> str:
        parts = [f"{name} {u + s:.1f} s ({u:.1f} user + {s:.1f} sys)" for name, (u, s) in self.cpu.items()]
        return "CPU " + ", ".join(parts)


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds a live process (or one of its threads) has used, from /proc."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK  # utime, stime: fields 14 and 15 of the line


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started (the hub's store writer)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def watched_cpu(watch: dict[str, int]) -> dict[str, tuple[float, float]]:
    """CPU of each watched process; the hub's includes its store writer process, and its main thread (the
    event loop) and that writer are also given alone."""
    cpu = {key: cpu_seconds(pid) for key, pid in watch.items()}
    if "hub" in watch:
        cpu["hub event loop"] = cpu_seconds(watch["hub"], watch["hub"])
        writers = [cpu_seconds(child) for child in child_pids(watch["hub"])]
        cpu["hub store process"] = (sum(u for u, _ in writers), sum(s for _, s in writers))
        cpu["hub"] = (cpu["hub"][0] + cpu["hub store process"][0], cpu["hub"][1] + cpu["hub store process"][1])
    return cpu


def children_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def _delta(after: tuple[float, float], before: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


class Receiver:
    """``mosquitto_sub`` on a topic (and a probe topic), counting what arrives with its arrival time."""

    def __init__(self, processes: Processes, port: int, topic: str, n: int, name: str, keep: bool) -> None:
        self._probe = f"{PROBE}/{name}".encode()
        self._port = port
        self._keep = keep
        self._child = processes.start(
            # -v: "topic payload" per line, so probes (another topic) are told apart from data.
            ["mosquitto_sub", "-h", HOST, "-p", str(port), "-q", "1", "-v", "-t", topic, "-t", self._probe.decode()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._probed = threading.Event()
        self._enough = threading.Event()
        self._want = n
        self.count = 0
        self.nth_at = 0.0  # when the n-th message arrived
        self.lines: list[bytes] = []
        self._thread = threading.Thread(target=self._read, name=f"bench-sub-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stdout: IO[bytes] | None = self._child.stdout
        assert stdout is not None
        for line in stdout:
            if line.startswith(self._probe):
                self._probed.set()
                continue
            self.count += 1
            if self._keep:
                self.lines.append(line)
            if self.count == self._want:
                self.nth_at = time.monotonic()
                self._enough.set()

    def wait_subscribed(self, timeout: float) -> None:
        """Publish probes until one comes back: then the subscription is certainly in place."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            subprocess.run(
                ["mosquitto_pub", "-h", HOST, "-p", str(self._port), "-q", "1", "-t", self._probe.decode(), "-n"],
                check=True,
                timeout=10,
            )
            if self._probed.wait(1.0):
                return
        raise RuntimeError(f"mosquitto_sub did not subscribe within {timeout:g} s")

    def wait_all(self, timeout: float) -> bool:
        return self._enough.wait(timeout)

    def stop(self) -> None:
        if self._child.poll() is None:
            self._child.terminate()
        self._child.wait(timeout=10)
        self._thread.join(timeout=10)


def timed_publish(
    processes: Processes,
    port: int,
    lines: Path,
    topic: str,
    listen: str,
    n: int,
    inflight: int,
    timeout: float,
    name: str,
    keep: bool,
    watch: dict[str, int],
) -> Timed:
    """Publish every line of ``lines`` to ``topic``; time until ``n`` messages arrived on ``listen``.

    Also counts the CPU time of the ``watch`` processes (name → pid) and of the MQTT clients meanwhile.
    """
    receiver = Receiver(processes, port, listen, n, name, keep)
    try:
        receiver.wait_subscribed(20)
        with lines.open("rb") as stdin:
            cpu_before = watched_cpu(watch)
            clients_before = children_cpu()
            began = time.monotonic()
            publisher = processes.start(
                ["mosquitto_pub", "-h", HOST, "-p", str(port), "-q", "1", "-M", str(inflight), "-t", topic, "-l"],
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                publisher.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{name}: mosquitto_pub did not finish within {timeout:g} s") from None
            published = time.monotonic() - began
        if publisher.returncode != 0:
            assert publisher.stderr is not None
            raise RuntimeError(f"{name}: mosquitto_pub failed: {publisher.stderr.read().decode().strip()}")
        if not receiver.wait_all(max(1.0, timeout - published)):
            raise RuntimeError(f"{name}: only {receiver.count} of {n} messages arrived within {timeout:g} s")
        cpu = {key: _delta(value, cpu_before[key]) for key, value in watched_cpu(watch).items()}
        time.sleep(0.3)  # a moment more to catch duplicates or strays, if any
    finally:
        receiver.stop()
    cpu["mosquitto_pub+sub"] = _delta(children_cpu(), clients_before)
    if receiver.count != n:
        raise RuntimeError(f"{name}: {receiver.count} messages arrived, {n} were sent (duplicates?)")
    return Timed(receiver.nth_at - began, published, receiver.lines, cpu)


def check_answers(lines: list[bytes], messages: int, per_message: int) -> None:
    """Every message answered once, ok, with all its readings accepted."""
    seen: set[int] = set()
    for line in lines:
        _, _, payload = line.partition(b" ")
        answer = orjson.loads(payload)
        if not answer.get("ok") or answer.get("accepted") != per_message or answer.get("rejected"):
            raise RuntimeError(f"unexpected answer: {payload[:300]!r}")
        request_id = answer.get("request_id")
        if not isinstance(request_id, int) or request_id in seen:
            raise RuntimeError(f"answer with a missing or repeated request_id: {payload[:300]!r}")
        seen.add(request_id)
    if seen != set(range(messages)):
        raise RuntimeError(f"answers for {len(seen)} of {messages} messages")


def stored_rows(config: Config) -> int:
    """Readings in the hub's store, read through the store's own query side (whichever backend --set chose)."""
    store = open_query(config)
    try:
        return store.count()
    finally:
        store.close()


# -- the run -------------------------------------------------------------------------------------------


def machine_pace() -> float:
    """Milliseconds for a fixed pure-Python workload (the fastest of three): how fast this shared machine runs
    Python just now. The same build's CPU per message follows it, so runs of different hours compare by it."""
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        table = {f"PV-{i:05d}": i * 0.5 for i in range(20_000)}
        rows = sorted(table.items(), key=lambda row: -row[1])
        sum(value for _, value in rows)
        best = min(best, time.perf_counter() - began)
    return best * 1000


@dataclass
class CaseResult:
    name: str
    messages: int
    per_message: int
    raw: Timed
    hub: Timed
    pace_ms: float  # machine_pace() around the hub's run: before and after, averaged

    @property
    def readings(self) -> int:
        return self.messages * self.per_message


def run_case(
    processes: Processes,
    port: int,
    work: Path,
    name: str,
    messages: int,
    per_message: int,
    passwords: dict[str, str],
    base_ms: int,
    watch: dict[str, int],
    args: argparse.Namespace,
) -> CaseResult:
    lines = work / f"case-{name}.jsonl"
    readings = write_lines(lines, messages, per_message, passwords, base_ms)
    size_mb = lines.stat().st_size / 1e6
    print(f"case {name}: {messages} messages × {per_message} readings = {readings} readings ({size_mb:.1f} MB)")
    raw = timed_publish(
        processes, port, lines, RAW, RAW, messages, args.inflight, args.timeout, f"raw-{name}", False, watch
    )
    print(f"  raw: {raw.seconds:.2f} s → {messages / raw.seconds:,.0f} messages/s; {raw.cpu_text()}")
    pace_before = machine_pace()
    profiler = start_profiler(processes, watch["hub"], args, name) if args.profile else None
    try:
        hub = timed_publish(
            processes,
            port,
            lines,
            f"{PREFIX}/data",
            ANSWERS,
            messages,
            args.inflight,
            args.timeout,
            f"hub-{name}",
            True,
            watch,
        )
    finally:
        if profiler is not None:
            stop_profiler(profiler)
    print(
        f"  hub: {hub.seconds:.2f} s → {messages / hub.seconds:,.0f} messages/s, "
        f"{readings / hub.seconds:,.0f} readings/s (publishing took {hub.publish_s:.2f} s)"
    )
    print(f"       {hub.cpu_text()}")
    pace = (pace_before + machine_pace()) / 2
    print(f"       machine pace {pace:.1f} ms (a fixed Python workload, before and after; lower is faster)")
    check_answers(hub.received, messages, per_message)
    hub.received = []
    if not args.keep:
        lines.unlink()
    return CaseResult(name, messages, per_message, raw, hub, pace)


def memory_run(processes: Processes, broker: EmbeddedBroker, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """A fresh hub with ``args.mem_ders`` DERs registered; its memory at start and after a sample sent data."""
    data = work / "mem"
    data.mkdir()
    config = data / "hubd.yaml"
    write_config(config, data, broker.url, "hubd-bench-mem", args.bcrypt_rounds, args.set)
    der_ids = [f"MEM-{i:06d}" for i in range(args.mem_ders)]
    allowlist = data / "allowlist.csv"
    write_allowlist(allowlist, der_ids)
    began = time.monotonic()
    hubd_cli(config, "der", "import", str(allowlist), timeout=args.timeout)
    print(f"memory: {args.mem_ders} DERs imported in {time.monotonic() - began:.1f} s")
    # Bench-only shortcut: one bcrypt hash, computed once, for every DER (instead of one registration each).
    shared = "bench-shared-password-0001"
    hashed = hash_password(shared, args.mem_rounds)
    registry = sqlite3.connect(data / "hub.sqlite3", timeout=30)
    with registry:
        registry.execute(
            "UPDATE ders SET status = 'registered', password_hash = ?, registered_at = ?",
            (hashed, int(time.time() * 1000)),
        )
    registry.close()
    hub = HubProcess(processes, config, data / "hubd.log")
    figures: dict[str, float] = {}
    try:
        started = hub.start(args.timeout)
        figures["rss_start"], figures["hwm_start"] = hub.memory_mb()
        print(f"  hub up in {started:.1f} s: VmRSS {figures['rss_start']:.0f} MB, VmHWM {figures['hwm_start']:.0f} MB")
        sample = der_ids[:: max(1, len(der_ids) // args.mem_sample)][: args.mem_sample]
        per_message = min(100, len(sample))
        messages = -(-len(sample) // per_message)  # ceil
        lines = data / "sample.jsonl"
        base_ms = (int(time.time()) - 3600) * 1000
        write_lines(lines, messages, per_message, {der_id: shared for der_id in sample}, base_ms)
        timed = timed_publish(
            processes,
            broker.port,
            lines,
            f"{PREFIX}/data",
            ANSWERS,
            messages,
            args.inflight,
            args.timeout,
            "mem-sample",
            True,
            {"hub": hub.pid, "mosquitto": broker.pid or 0},
        )
        check_answers(timed.received, messages, per_message)
        figures["sample"] = len(sample)
        figures["sample_s"] = timed.seconds
        figures["rss"], figures["hwm"] = hub.memory_mb()
        print(
            f"  {len(sample)} DERs sent a reading each ({timed.seconds:.1f} s, one bcrypt check per DER at cost "
            f"{args.mem_rounds}): VmRSS {figures['rss']:.0f} MB, VmHWM {figures['hwm']:.0f} MB"
        )
    finally:
        hub.stop()
    return figures


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mosquitto = subprocess.run(["mosquitto_pub", "--help"], capture_output=True, text=True, check=False, timeout=10)
    version = next((ln for ln in mosquitto.stdout.splitlines() if "version" in ln), "?").strip()
    return (
        f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {version}; load average {os.getloadavg()[0]:.2f}"
    )


def _per_reading(timed: Timed, case: CaseResult, process: str) -> str:
    user, system = timed.cpu.get(process, (0.0, 0.0))
    return f"{(user + system) / case.readings * 1e6:.0f}"


def print_table(cases: list[CaseResult], registration: tuple[int, float], memory: dict[str, float], args: Any) -> None:
    targets = {1: 10_000, 100: 100_000}
    print()
    print(
        "| case | path | messages | readings | seconds | messages/s | readings/s | hub ÷ raw (messages/s) "
        "| CPU µs/reading (hub / broker) | target |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    runs: dict[str, list[CaseResult]] = {}
    for case in cases:
        runs.setdefault(case.name, []).append(case)
    for each in runs.values():
        # The median run by the hub's rate: the row's figures all come from that one run.
        case = sorted(each, key=lambda c: c.messages / c.hub.seconds)[len(each) // 2]
        raw_rate = case.messages / case.raw.seconds
        hub_rate = case.messages / case.hub.seconds
        target = targets.get(case.per_message)
        verdict = "-"
        if target is not None:
            verdict = f"≥ {target:,} readings/s: {'met' if hub_rate * case.per_message >= target else 'MISSED'}"
        label = f"{case.name}: {case.per_message} reading{'s' if case.per_message > 1 else ''}/message"
        print(
            f"| {label} | raw Mosquitto | {case.messages:,} | {case.readings:,} | {case.raw.seconds:.2f} | "
            f"{raw_rate:,.0f} | {raw_rate * case.per_message:,.0f} | "
            f"| - / {_per_reading(case.raw, case, 'mosquitto')} | |"
        )
        print(
            f"| {label} | hub (committed + answered) | {case.messages:,} | {case.readings:,} | {case.hub.seconds:.2f} "
            f"| {hub_rate:,.0f} | {hub_rate * case.per_message:,.0f} | {hub_rate / raw_rate:.2f} "
            f"| {_per_reading(case.hub, case, 'hub')} / {_per_reading(case.hub, case, 'mosquitto')} | {verdict} |"
        )
    print()
    for name, each in runs.items():
        if len(each) > 1:
            rates = ", ".join(f"{c.readings / c.hub.seconds:,.0f} (pace {c.pace_ms:.1f} ms)" for c in each)
            print(f"case {name}, hub readings/s of each run in order (the table shows the median run): {rates}")
    ders, seconds = registration
    print(f"registration: {ders:,} DERs in {seconds:.1f} s ({ders / seconds:.1f}/s, bcrypt cost {args.bcrypt_rounds})")
    if "rss_b" in memory:
        print(
            f"hub memory after case B ({ders:,} DERs): VmRSS {memory['rss_b']:.0f} MB, VmHWM {memory['hwm_b']:.0f} MB"
        )
    if "rss" in memory:
        met = "met" if memory["hwm"] < TARGET_RSS_MB else "MISSED"
        print(
            f"hub memory with {args.mem_ders:,} DERs registered: VmRSS {memory['rss_start']:.0f} MB at start, "
            f"{memory['rss']:.0f} MB after {memory['sample']:.0f} of them sent data; VmHWM {memory['hwm']:.0f} MB "
            f"(target < {TARGET_RSS_MB} MB: {met})"
        )


def main() -> int:
    store = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    store.add_argument("--store", choices=("sqlite", "influxdb"), default="sqlite")
    chosen, rest = store.parse_known_args()
    if chosen.store == "influxdb":  # the InfluxDB figures: bench/influx.py, with its own options
        import influx

        return influx.main(rest)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--store", choices=("sqlite", "influxdb"), default="sqlite", help="influxdb: bench/influx.py (its --help)"
    )
    parser.add_argument("--ders", type=int, default=1000, help="DERs registered over MQTT (default 1000)")
    parser.add_argument("--messages-a", type=int, default=50_000, help="case A messages (default 50000)")
    parser.add_argument("--messages-b", type=int, default=5_000, help="case B messages (default 5000)")
    parser.add_argument("--per-message-b", type=int, default=100, help="case B readings per message (default 100)")
    parser.add_argument("--bcrypt-rounds", type=int, default=10, help="bcrypt cost of the hub (default 10)")
    parser.add_argument("--register-concurrency", type=int, default=16, help="registrations in flight (default 16)")
    parser.add_argument("--inflight", type=int, default=100, help="mosquitto_pub -M: QoS 1 messages in flight")
    parser.add_argument("--mem-ders", type=int, default=100_000, help="DERs for the memory run (0: skip it)")
    parser.add_argument("--mem-sample", type=int, default=200, help="of those, how many send a reading")
    parser.add_argument("--mem-rounds", type=int, default=None, help="bcrypt cost of the memory run's shared hash")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case, alternating A and B (default 3)")
    parser.add_argument("--timeout", type=float, default=300.0, help="limit for each wait, in seconds")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hubd.yaml override, e.g. store.sqlite.synchronous=normal",
    )
    parser.add_argument("--hubd", metavar="CMD", help="the command that runs hubd (default: the venv's hubd)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data, logs) and say where")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy record the hub during each timed hub run into DIR/hub-<case>.<format> (pip install py-spy)",
    )
    parser.add_argument(
        "--profile-format", choices=("raw", "flamegraph", "speedscope"), default="raw", help="py-spy output format"
    )
    args = parser.parse_args()
    if args.hubd:
        HUBD_COMMAND.extend(shlex.split(args.hubd))
    if args.mem_rounds is None:
        args.mem_rounds = args.bcrypt_rounds
    # SIGTERM ends the bench like Ctrl-C: through the finally blocks that stop what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    print(f"machine: {machine()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="hubd-bench-"))
    processes = Processes()
    broker = EmbeddedBroker(work / "broker", port=free_port(), bind=HOST)
    hub: HubProcess | None = None
    cases: list[CaseResult] = []
    memory: dict[str, float] = {}
    try:
        broker.start_sync()
        data = work / "hub"
        data.mkdir()
        config = work / "hubd.yaml"
        write_config(config, data, broker.url, "hubd-bench", args.bcrypt_rounds, args.set)
        der_ids = [f"BENCH-{i:05d}" for i in range(args.ders)]
        write_allowlist(work / "allowlist.csv", der_ids)
        print(hubd_cli(config, "der", "import", str(work / "allowlist.csv"), timeout=args.timeout), flush=True)
        hub = HubProcess(processes, config, work / "hubd.log")
        hub.start(args.timeout)
        print(f"hub pid {hub.pid} on {broker.url}; registering {args.ders} DERs ...", flush=True)
        began = time.monotonic()
        registering = register_all(broker.url, der_ids, args.register_concurrency, args.timeout)
        passwords = asyncio.run(asyncio.wait_for(registering, args.timeout))
        registration = (len(passwords), time.monotonic() - began)
        print(f"  registered {registration[0]} in {registration[1]:.1f} s", flush=True)

        now_s = int(time.time())
        store_config = load_config(config)
        watch = {"hub": hub.pid, "mosquitto": broker.pid or 0}
        expected = 0
        for run in range(args.repeat):
            for day, (name, messages, per_message) in enumerate(
                (("A", args.messages_a, 1), ("B", args.messages_b, args.per_message_b))
            ):
                if messages <= 0:
                    continue
                # A day of its own, each run's later than the last (as a fleet's data comes): every reading is new.
                base_ms = (now_s - (2 * (args.repeat - run) - day + 1) * 86400) * 1000
                case = run_case(
                    processes, broker.port, work, name, messages, per_message, passwords, base_ms, watch, args
                )
                cases.append(case)
                expected += case.readings
                rows = stored_rows(store_config)
                if rows != expected:
                    raise RuntimeError(f"the store holds {rows} readings, expected {expected}")
                print(f"  checked: {case.messages} answers ok, accepted {per_message} each; store holds {rows} rows")
                memory["rss_b"], memory["hwm_b"] = hub.memory_mb()
        hub.stop()
        hub = None
        if args.mem_ders > 0:
            memory |= memory_run(processes, broker, work, args)
        print_table(cases, registration, memory, args)
        if args.keep:
            print(f"\ndata, lines and logs kept in {work}")
        return 0
    finally:
        if hub is not None:
            hub.stop()
        processes.stop_all()
        broker.stop_sync()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def start_profiler(processes: Processes, pid: int, args: argparse.Namespace, case: str) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    directory = Path(args.profile)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = {"raw": "txt", "flamegraph": "svg", "speedscope": "json"}[args.profile_format]
    output = directory / f"hub-{case}.{suffix}"
    profiler = processes.start(
        [
            *(
                str(py_spy),
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                "--threads",
                "--subprocesses",
                "--nonblocking",
            ),
            *("--format", args.profile_format, "--output", str(output)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # let it attach before the clock starts
    return profiler


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        profiler.wait(timeout=60)
    except subprocess.TimeoutExpired:
        profiler.kill()


if __name__ == "__main__":
    sys.exit(main())
