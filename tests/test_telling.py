"""What the hub and the CLI tell a person: DEBUG lines per request and answer; progress only on a terminal.

The daemon runs as ``hubd run`` in a process of its own, so its logging is set up as an operator's is; the
progress cases run the commands with stderr on a pseudo-terminal, then on a pipe.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import INITIAL_PASSWORD, RunningHub, write_config

from hubd.audit import AuditLog
from hubd.broker import EmbeddedBroker

HUBD = Path(sys.executable).parent / "hubd"  # the console script of the environment running the tests


@contextmanager
def daemon(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``hubd run`` with its stderr in ``log``, ready (it said it serves) before the body runs."""
    with log.open("wb") as err:
        process = subprocess.Popen([str(HUBD), "--config", str(config), "run"], stderr=err)
    try:
        deadline = time.monotonic() + 30
        while "hubd serving on" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "hub did not start"
            time.sleep(0.05)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def traffic(hub: RunningHub) -> list[str]:
    """Register a DER, send it a reading, query it back as the market system; the passwords that were used."""
    password = hub.register("PV-0001")
    consumer = hub.consumer()
    reading = {"der_id": "PV-0001", "password": password, "measured_at": "2025-06-01T00:00:00Z", "power_kw": 1.5}
    assert hub.rr("hub/v1/data", {"source_id": "edge-1", "readings": [reading]})["accepted"] == 1
    query = {
        "client_id": "market-1",
        "password": consumer,
        "start": "2025-06-01T00:00:00Z",
        "end": "2025-06-02T00:00:00Z",
    }
    assert len(hub.rr("hub/v1/query", query)["rows"]) == 1
    return [INITIAL_PASSWORD, password, consumer]


def test_debug_logs_each_request_and_answer_without_passwords(tmp_path: Path, broker: EmbeddedBroker) -> None:
    config = write_config(tmp_path / "hubd.yaml", broker, log={"level": "DEBUG"})
    log = tmp_path / "hubd.log"
    with daemon(config, log):
        passwords = traffic(RunningHub(config, broker))
    text = log.read_text()
    lines = text.splitlines()
    register = [line for line in lines if "request on hub/v1/register from PV-0001 via test/answers/" in line]
    assert len(register) == 1 and register[0].split(" DEBUG ")[1].count(": ok in ") == 1, text
    assert any("data on hub/v1/data from edge-1: ok, accepted 1, rejected 0 in " in line for line in lines), text
    assert any("request on hub/v1/query from market-1 via " in line and ": ok in " in line for line in lines), text
    for password in passwords:
        assert password not in text


def test_info_logs_nothing_per_request(tmp_path: Path, broker: EmbeddedBroker) -> None:
    config = write_config(tmp_path / "hubd.yaml", broker, log={"level": "INFO"})
    log = tmp_path / "hubd.log"
    with daemon(config, log):
        traffic(RunningHub(config, broker))
    text = log.read_text()
    assert "hubd serving on" in text
    assert "request on" not in text and "data on" not in text, text


# -- progress ------------------------------------------------------------------------------------------------


def stderr_of(args: list[str], terminal: bool) -> str:
    """Run ``hubd ARGS`` with stdout to a pipe and stderr to a pseudo-terminal (or a pipe); its stderr."""
    if not terminal:
        done = subprocess.run([str(HUBD), *args], capture_output=True, timeout=60, check=True)
        return done.stderr.decode()
    leader, follower = pty.openpty()
    process = subprocess.Popen([str(HUBD), *args], stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    while True:  # read as it comes: a pseudo-terminal's buffer is small and would block the command
        ready, _, _ = select.select([leader], [], [], 60)
        assert ready, "no output for 60 s"
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command closed its end
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.wait(30) == 0, seen
    return seen.decode(errors="replace")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A config whose audit trail has 30,000 records and a CSV of 2,000 DERs beside it."""
    config = tmp_path / "hubd.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n", encoding="utf-8")
    (tmp_path / "data").mkdir()
    with AuditLog(tmp_path / "data" / "audit.jsonl", fsync=False) as audit:
        for n in range(30_000):
            audit.append("der.added", der_id=f"PV-{n}", by="operator")
    (tmp_path / "ders.csv").write_text("der_id,type\n" + "".join(f"PV-{n:05d},pv\n" for n in range(2000)))
    return config


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["audit", "verify"], "checking the chain"),
        (["der", "import", "ders.csv"], "importing DERs"),
        (["query", "--start", "2025-06-01T00:00:00Z", "--end", "2025-06-02T00:00:00Z"], "rows read: 0"),
    ],
)
def test_progress_on_a_terminal_only(site: Path, command: list[str], shown: str) -> None:
    args = [*command[:2], *(str(site.parent / a) if a.endswith(".csv") else a for a in command[2:])]
    args += ["--config", str(site)]
    assert shown in stderr_of(args, terminal=True)
    assert stderr_of(args, terminal=False) == ""
