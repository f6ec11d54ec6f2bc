"""``hubd demo``, the README's first command, run as a person runs it: the console script in a fresh directory.

The checks are the ones a person reading its account would make: every step happened and says what the
protocol says it should, the numbers add up, and the data it points to afterwards is there and intact.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hubd.broker import free_port

HUBD = Path(sys.executable).parent / "hubd"  # the console script of the environment running the tests


def run_hubd(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``hubd ARGS`` in ``cwd``, with temporary files (where the demo keeps its data) under ``cwd`` too."""
    tmp = cwd / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("HUBD_CONFIG", None)
    return subprocess.run(
        [str(HUBD), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def line(output: str, pattern: str) -> re.Match[str]:
    """The one line of ``output`` that matches ``pattern``."""
    found = [m for m in (re.search(pattern, text) for text in output.splitlines()) if m]
    assert len(found) == 1, f"expected one line matching {pattern!r} in:\n{output}"
    return found[0]


def test_demo_tells_each_step_and_leaves_data_that_verifies(tmp_path: Path) -> None:
    port = free_port()
    demo = run_hubd("demo", "--minutes", "5", "--port", str(port), cwd=tmp_path)
    out = demo.stdout
    assert demo.returncode == 0, f"hubd demo exited {demo.returncode}\n{out}\n{demo.stderr}"
    assert "Traceback" not in demo.stderr, demo.stderr

    data_dir = Path(line(out, r"^hubd demo — data in (.+)$")[1])
    assert data_dir.is_relative_to(tmp_path / "tmp"), "the demo keeps its data in a temporary directory"
    assert line(out, r"Mosquitto on mqtt://127\.0\.0\.1:(\d+)")[1] == str(port)

    # 3. Registration: a unique password for each DER, never printed; the second attempt refused.
    for der_id in ("PV-0001", "ESS-0001"):
        assert line(out, rf"^\s+{der_id}: ok=(\w+), got a unique password \(not shown\)")[1] == "True"
    assert line(out, r"registering PV-0001 a second time: (\w+)$")[1] == "already_registered"

    # 4. Five minutes of two DERs every 10 s, all accepted; the resend, the wrong password, the non-JSON.
    sent = line(out, r"It sends (\d+) readings \(5 min, every 10 s\) in (\d+) messages")
    assert (sent[1], sent[2]) == ("60", "6")
    stored = line(out, r"accepted (\d+); re-sending one message: accepted (\d+) again, stored once")
    assert (stored[1], stored[2]) == ("60", "10")
    assert line(out, r"a reading with a wrong password: rejected with (\w+)$")[1] == "bad_credentials"
    assert line(out, r"a payload that is not JSON: (\w+), kept in quarantine$")[1] == "decode_error"

    # 5. The terminal's clock, 90 s fast: its live reading flagged, the clock checked, corrected, checked again.
    told = line(out, r"checked the terminal's clock \(time\.checked: ([+-][\d.]+) s\), told it to correct")
    assert 89 < float(told[1]) < 91
    assert re.search(r"told it to correct \(time\.set\), checked again: ok, offset [+-]0\.\d+ s", out), out
    assert line(out, r"PV-0001 at \S+: 3\.3 kW, clock_flag (\w+), clock_offset_s \+(8\d|9\d)")[1] == "passive"
    assert "3.4 kW" not in out, "the reading after the correction carries no flag"

    # 6. The vendor-format message: eight quarter-hour values, one of them null, decoded by a shipped definition.
    assert line(out, r"format solaredge\.site_power: .*accepted (\d+)$")[1] == "7"

    # 7. Read back page by page: every reading once, nothing lost to the shuffle nor doubled by the resend.
    pages = line(out, r"(\d+) rows in (\d+) pages, ordered by measurement time")
    assert (pages[1], pages[2]) == ("60", "2")
    assert "per DER: {'PV-0001': 30, 'ESS-0001': 30}" in out
    times = re.findall(r"'measured_at': '([^']+)'", out.split("polled itself")[0])
    assert len(times) == 4 and times == sorted(times), "the first and last rows are in measurement order"
    # ... and the simulated SunSpec inverter and battery the hub polled itself over Modbus TCP.
    assert "{'der_id': 'BAT-0001', 'measured_at'" in out and "'power_kw': 1.5, 'soc_pct': 62.5}" in out
    assert "{'der_id': 'INV-0001', 'measured_at'" in out and "'power_kw': 3.21}" in out
    # collected by the hub from the simulated vendor cloud: the last two hours' quarter hours, up to the last whole one
    assert 7 <= int(line(out, r"collected from the vendor cloud itself: (\d+) quarter hours of PV-0200")[1]) <= 8

    # ... and the vendor site's 30-minute settlement slots: numbered 1..48 in the Tokyo day, starting on the
    # half hour, one row per slot, together holding the seven readings sent.
    slots = re.findall(r"PV-0100 slot\s+(\d+) from (\S+): mean ([\d.]+) kW of (\d+) readings?$", out, re.M)
    assert slots, out
    assert all(1 <= int(slot) <= 48 for slot, *_ in slots)
    assert all(re.search(r"T\d\d:(00|30):00\.000Z$", start) for _, start, *_ in slots)
    assert len({start for _, start, *_ in slots}) == len(slots)
    assert sum(int(n) for *_, n in slots) == 7
    assert all(0.5 < float(mean) < 2.5 for _, _, mean, _ in slots), "watts became kilowatts"

    # 8. The audit trail, as the demo reports it and as the operator's own command finds it afterwards.
    assert re.search(r"Audit log: \d+ records, chain intact\.", out), out
    events = dict(re.findall(r"(\S+) (\d+)", line(out, r"^\s+events: (.+)$")[1]))
    assert events["data.quarantined"] == "1"
    assert events["auth.failed"] == "1"
    assert events["register.failed"] == "1"
    assert events["password.issued"] == "3"
    assert events["modbus.online"] == "2" and "modbus.offline" not in events

    config = data_dir / "hubd.yaml"
    assert str(config) in line(out, r"look around: .*--config (\S+)")[1]
    verify = run_hubd("--config", str(config), "audit", "verify", cwd=tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    ders = run_hubd("--config", str(config), "der", "list", cwd=tmp_path)
    assert ders.returncode == 0, ders.stderr
    listed = sorted(text.split("\t")[0] for text in ders.stdout.splitlines())
    assert listed == ["BAT-0001", "ESS-0001", "INV-0001", "PV-0001", "PV-0100", "PV-0200"]
    quarantine = run_hubd("--config", str(config), "quarantine", "list", cwd=tmp_path)
    assert quarantine.returncode == 0, quarantine.stderr
    (kept,) = quarantine.stdout.splitlines()
    assert "decode_error" in kept


def test_demo_on_a_port_already_taken_says_so_at_once(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        demo = run_hubd("demo", "--minutes", "1", "--port", str(port), cwd=tmp_path, timeout=15)
    assert demo.returncode == 1
    assert f"port {port}" in demo.stderr and "already in use" in demo.stderr, demo.stderr
    assert "Traceback" not in demo.stderr, demo.stderr


@pytest.mark.parametrize("minutes", ["0", "-3"])
def test_demo_refuses_minutes_it_cannot_show(tmp_path: Path, minutes: str) -> None:
    demo = run_hubd("demo", "--minutes", minutes, cwd=tmp_path, timeout=30)
    assert demo.returncode == 2
    assert "--minutes" in demo.stderr and "Traceback" not in demo.stderr, demo.stderr
