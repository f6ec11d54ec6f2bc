"""The README's walk-through "By hand, with the Mosquitto clients", run as written, step by step.

The block is taken from README.md itself, so the test follows the README and not a copy of it. Only what a
reader would fill in changes: the port (a free one instead of the README's; the status listener's too, as
another hub on the host may hold the default 127.0.0.1:8780), the ``.venv/bin/`` of the
environment running the tests, and the placeholders ``<unique password>`` and ``<its password>``, taken from
the earlier commands' output as the README tells the reader to. It runs in a fresh folder of its own.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from hubd.broker import free_port

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent  # .venv/bin of the environment running the tests
README_PORT = "1884"


def walk_through() -> list[str]:
    """The shell commands of the README's by-hand block, a command continued over lines joined into one."""
    text = README.read_text(encoding="utf-8")
    start = text.index("**By hand, with the Mosquitto clients**")
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block, "the by-hand block is gone from README.md"
    commands: list[str] = []
    pending = ""
    for line in block[1].splitlines():
        pending += line + "\n"
        try:
            shlex.split(pending, comments=True)  # a quote still open: the command goes on
        except ValueError:
            continue
        if not pending.rstrip().endswith("\\"):
            commands.append(pending.strip())
            pending = ""
    assert not pending, f"unfinished command in the README: {pending}"
    return commands


def sh(command: str, cwd: Path) -> str:
    done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, f"{command}\nfailed ({done.returncode}): {done.stderr}"
    return done.stdout


def test_the_walk_through_runs_as_written(tmp_path: Path) -> None:
    commands = walk_through()
    kinds = [kind_of(command) for command in commands]
    assert kinds == ["hash", "config", "der add", "system add", "run", "register", "data", "query", "verify", "stop"]
    port = str(free_port())
    filled: dict[str, str] = {}
    hub: subprocess.Popen[bytes] | None = None
    log = tmp_path / "hubd.log"
    try:
        for kind, command in zip(kinds, commands, strict=True):
            assert README_PORT in command or kind not in ("run", "register", "data", "query"), command
            command = command.replace(".venv/bin/", f"{BIN}/").replace(README_PORT, port)
            for placeholder, value in filled.items():
                command = command.replace(placeholder, value)
            if kind == "stop":  # `kill %1` sends the job SIGTERM
                assert hub is not None
                hub.send_signal(signal.SIGTERM)
                assert hub.wait(30) == 0, log.read_text()
                hub = None
                assert "hubd stopped" in log.read_text()
                continue
            if kind == "run":
                assert shlex.split(command, comments=True)[-1] == "&"
                hub = start(command.split("&")[0], tmp_path, log)
                assert f"hubd serving on mqtt://127.0.0.1:{port}" in log.read_text()
                continue
            out = sh(command, tmp_path)
            if kind == "hash":
                assert (tmp_path / "initial.hash").read_text().startswith("$2b$")
            elif kind == "config":
                assert (tmp_path / "hubd.yaml").exists()
                with (tmp_path / "hubd.yaml").open("a", encoding="utf-8") as config:  # not 8780: another hub's
                    config.write("http:\n  bind: 127.0.0.1:0\n")
            elif kind == "der add":
                assert json.loads(out)["status"] == "allowed"
            elif kind == "system add":
                filled["<its password>"] = one_word(out)
            elif kind == "register":
                answer = json.loads(out)
                assert answer["ok"] and answer["der_id"] == "PV-0001", answer
                filled["<unique password>"] = answer["password"]
            elif kind == "data":
                answer = json.loads(out)
                assert answer == {"ok": True, "accepted": 1, "rejected": []}, answer
            elif kind == "query":
                rows = json.loads(out)["rows"]
                assert [(r["der_id"], r["measured_at"], r["power_kw"]) for r in rows] == [
                    ("PV-0001", "2026-11-27T00:05:00.000Z", 3.21)
                ], rows
            else:
                assert out.startswith("ok: ") and "chain intact" in out, out
    finally:
        if hub is not None:
            hub.send_signal(signal.SIGTERM)
            hub.wait(30)
    assert (tmp_path / "data" / "readings.sqlite3").exists()  # data_dir: data, beside hubd.yaml


def kind_of(command: str) -> str:
    """Which step of the walk-through a command is, by what it says."""
    for needle, kind in (
        ("hash-password", "hash"),
        ("> hubd.yaml", "config"),
        (" der add ", "der add"),
        (" system add ", "system add"),
        ("hub/v1/register", "register"),
        ("hub/v1/data", "data"),
        ("hub/v1/query", "query"),
        (" audit verify", "verify"),
        (" run ", "run"),
        ("kill %1", "stop"),
    ):
        if needle in command:
            return kind
    return command


def start(command: str, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """The README's ``... run &``; ready when it printed the line the README says to wait for."""
    with log.open("wb") as err:
        hub = subprocess.Popen(["bash", "-c", "exec " + command], cwd=cwd, stderr=err)
    deadline = time.monotonic() + 30
    while "hubd serving on" not in log.read_text():
        assert hub.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return hub


def one_word(out: str) -> str:
    words = out.split()
    assert len(words) == 1, out
    return words[0]
