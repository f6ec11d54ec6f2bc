"""Start, stop and restart: data published while hubd is down or stopping is delivered later, never lost."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import INITIAL_PASSWORD, TEST_BCRYPT_ROUNDS, RunningHub, write_config

from hubd.auth.credentials import hash_password
from hubd.broker import MAX_RESTARTS, EmbeddedBroker, free_port, load_template, render_config
from hubd.cli import EXIT_CONFIG
from hubd.client import HubClient
from hubd.mqtt.session import MqttError


def _count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])


def _wait_for(predicate: object, timeout: float = 20.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _serving(port: int) -> bool:
    """True once a hub answers on the broker at ``port`` (asked with mosquitto_rr)."""
    probe = subprocess.run(
        [
            "mosquitto_rr",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-t",
            "hub/v1/time",
            "-e",
            "probe/answer",
            "-m",
            "{}",
            "-W",
            "1",
        ],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return probe.returncode == 0 and json.loads(probe.stdout or b"{}").get("ok") is True


def _start_daemon(config: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen([sys.executable, "-m", "hubd.cli", "--config", str(config), "run"], env=env)


def test_data_published_while_hub_is_down_is_stored_after_restart(hub: RunningHub) -> None:
    pv = hub.register("PV-0001")
    hub.stop()
    message = {
        "readings": [{"der_id": "PV-0001", "password": pv, "measured_at": "2026-11-27T00:00:00Z", "power_kw": 4.2}]
    }
    hub.pub("hub/v1/data", message)  # the broker queues it in hubd's persistent session
    hub.start()
    readings = hub.config.readings_path
    assert _wait_for(lambda: readings.exists() and _count(readings) == 1)


def test_sigterm_mid_burst_answers_what_it_committed_exits_quickly_and_loses_nothing(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    config = write_config(tmp_path / "hubd.yaml", broker)
    hub = RunningHub(config, broker)
    hub.start()
    password = hub.register("PV-0001")
    hub.stop()

    total = 20000
    lines = "\n".join(
        json.dumps(
            {
                "reply_to": "burst/answers",
                "request_id": i,
                "readings": [{"der_id": "PV-0001", "password": password, "measured_at": i * 1000, "power_kw": 1.0}],
            }
        )
        for i in range(total)
    )
    answers = tmp_path / "answers.jsonl"
    mqtt = ["-h", "127.0.0.1", "-p", str(broker.port), "-q", "1"]
    with answers.open("wb") as out:
        receiver = subprocess.Popen(["mosquitto_sub", *mqtt, "-t", "burst/answers"], stdout=out)
    daemon = _start_daemon(config)
    publisher = None
    try:
        assert _wait_for(lambda: _serving(broker.port), 20)
        publisher = subprocess.Popen(["mosquitto_pub", *mqtt, "-t", "hub/v1/data", "-l"], stdin=subprocess.PIPE)
        assert publisher.stdin is not None
        publisher.stdin.write(lines.encode())
        publisher.stdin.close()
        assert _wait_for(lambda: _count(hub.config.readings_path) > 500, 20)
        daemon.send_signal(signal.SIGTERM)  # mid-burst: the publisher is still sending
        started = time.monotonic()
        assert daemon.wait(15) == 0
        assert time.monotonic() - started < 10
        assert publisher.wait(60) == 0
        stored_at_stop = _count(hub.config.readings_path)
        # Every message committed before the stop was answered before hubd exited (none waits for the restart).
        assert _wait_for(lambda: _lines(answers) >= stored_at_stop, 5), (_lines(answers), stored_at_stop)
    finally:
        for process in (daemon, publisher, receiver):
            if process is not None and process.poll() is None:
                process.kill()
    assert 0 < stored_at_stop < total, "the burst was not interrupted; make it longer"
    answered = {json.loads(line)["request_id"] for line in answers.read_bytes().splitlines()}
    assert len(answered) == _lines(answers) == stored_at_stop  # each once, and only those
    hub.start()  # whatever was not acknowledged is delivered again
    try:
        assert _wait_for(lambda: _count(hub.config.readings_path) == total, 30), (
            stored_at_stop,
            _count(hub.config.readings_path),
        )
    finally:
        hub.stop()


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def test_embedded_default_starts_and_stops_its_own_broker(tmp_path: Path) -> None:
    port = free_port()
    config = f"data_dir: data\nbroker:\n  embedded_port: {port}\nhttp:\n  bind: 127.0.0.1:0\n"
    (tmp_path / "hubd.yaml").write_text(config, encoding="utf-8")
    daemon = _start_daemon(tmp_path / "hubd.yaml")
    try:
        assert _wait_for(lambda: _serving(port), 20)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    probe = subprocess.run(
        ["mosquitto_pub", "-p", str(port), "-h", "127.0.0.1", "-t", "x", "-m", "1"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    assert probe.returncode != 0, "the embedded broker is still running after hubd stopped"
    assert (tmp_path / "data" / "audit.jsonl").exists()


def test_a_broker_that_does_not_listen_stops_hubd_run_with_one_line(tmp_path: Path, broker: EmbeddedBroker) -> None:
    """broker.url pointing where nothing listens: exit 1, one line naming the broker and the reason, no traceback."""
    port = free_port()
    config = write_config(tmp_path / "hubd.yaml", broker)
    text = config.read_text(encoding="utf-8").replace(broker.url, f"mqtt://127.0.0.1:{port}")
    config.write_text(text, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-c", "from hubd.cli import main; main()", "--config", str(config), "run"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith(f"Error: cannot connect to the broker at mqtt://127.0.0.1:{port}: ")
    )


# -- the embedded broker under a running hub -------------------------------------------------------------------


def _embedded_config(tmp_path: Path, port: int) -> Path:
    """An embedded-default hubd.yaml on ``port`` that lets any DER register (no operator step in these tests)."""
    config = {
        "data_dir": "data",
        "broker": {"embedded_port": port},
        "http": {"bind": "127.0.0.1:0"},  # the operator's listener on a free port, not the shared default
        "auth": {
            "initial_password_hash": hash_password(INITIAL_PASSWORD, TEST_BCRYPT_ROUNDS),
            "bcrypt_rounds": TEST_BCRYPT_ROUNDS,
            "registration_mode": "open",
        },
    }
    path = tmp_path / "hubd.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _rr(port: int, topic: str, body: dict[str, object], wait_s: int = 2) -> dict[str, object] | None:
    mqtt = ["-h", "127.0.0.1", "-p", str(port), "-q", "1"]
    out = subprocess.run(
        ["mosquitto_rr", *mqtt, "-t", topic, "-e", "t/answers", "-m", json.dumps(body), "-W", str(wait_s)],
        capture_output=True,
        timeout=wait_s + 5,
        check=False,
    )
    return dict(json.loads(out.stdout)) if out.returncode == 0 else None


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count: its cmdline is empty)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def _broker_pid(data: Path) -> int:
    return int((data / "mosquitto" / "mosquitto.pid").read_text(encoding="ascii"))


def _audit_events(data: Path, event: str) -> list[dict[str, object]]:
    records = [json.loads(line) for line in (data / "audit.jsonl").read_text(encoding="utf-8").splitlines()]
    return [record for record in records if record["event"] == event]


def test_a_killed_embedded_broker_is_started_again_and_ingest_resumes(tmp_path: Path) -> None:
    port = free_port()
    config = _embedded_config(tmp_path, port)
    data = tmp_path / "data"
    daemon = _start_daemon(config)
    try:
        assert _wait_for(lambda: _serving(port), 20)
        register = {"der_id": "PV-0001", "password": INITIAL_PASSWORD, "type": "pv"}
        answer = _rr(port, "hub/v1/register", register)
        assert answer is not None and answer["ok"], answer
        first = _broker_pid(data)
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        reading = {"der_id": "PV-0001", "password": answer["password"], "measured_at": 0, "power_kw": 1.0}
        stored = None
        while stored is None and time.monotonic() - killed < 5:
            stored = _rr(port, "hub/v1/data", {"readings": [reading]})  # refused while the broker is away
        took = time.monotonic() - killed
        assert stored is not None and stored["ok"], f"no answer within {took:.1f} s of the kill"
        assert _count(data / "readings.sqlite3") == 1
        restarted = _audit_events(data, "broker.restarted")
        assert [record["status"] for record in restarted] == [-signal.SIGKILL]
        second = _broker_pid(data)
        assert second != first and _alive(second)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
        assert not _alive(second)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_the_embedded_broker_does_not_outlive_a_killed_hubd(tmp_path: Path) -> None:
    port = free_port()
    daemon = _start_daemon(_embedded_config(tmp_path, port))
    pid = None
    try:
        assert _wait_for(lambda: _serving(port), 20)
        pid = _broker_pid(tmp_path / "data")
        daemon.kill()  # SIGKILL to hubd's process alone, not its group (the broker has a session of its own)
        daemon.wait()
        assert _wait_for(lambda: not _alive(pid), 2), "the embedded broker outlived hubd"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_broker_left_from_an_earlier_run_is_stopped_by_the_next_run(tmp_path: Path) -> None:
    port = free_port()
    config = _embedded_config(tmp_path, port)
    data = tmp_path / "data"
    # What a hubd killed outright before the parent-death signal left: a Mosquitto on its config, its pid file.
    broker = EmbeddedBroker(data, port=port)
    (data / "mosquitto").mkdir(parents=True)
    broker.config_path.write_text(render_config(load_template(), port=port, bind="127.0.0.1", data_dir=data))
    stale = subprocess.Popen([broker.executable, "-c", str(broker.config_path)], start_new_session=True)
    daemon = None
    try:
        assert _wait_for(lambda: broker.pid_path.exists() and _serving_broker(port), 10)
        assert _broker_pid(data) == stale.pid
        daemon = _start_daemon(config)
        assert _wait_for(lambda: _serving(port), 20)
        assert stale.wait(5) == 0  # SIGTERM: it saved its database on the way out
        assert _broker_pid(data) != stale.pid
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
    finally:
        for process in (daemon, stale):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_a_second_hubd_on_the_same_data_leaves_the_first_ones_broker_alone(tmp_path: Path) -> None:
    port = free_port()
    config = _embedded_config(tmp_path, port)
    daemon = _start_daemon(config)
    try:
        assert _wait_for(lambda: _serving(port), 20)
        pid = _broker_pid(tmp_path / "data")
        second = subprocess.run(
            [sys.executable, "-m", "hubd.cli", "--config", str(config), "run"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        assert second.returncode == EXIT_CONFIG, second.stderr
        assert "another hubd already runs one on" in second.stderr.strip().splitlines()[-1]
        assert _alive(pid) and _serving(port)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def _serving_broker(port: int) -> bool:
    probe = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", "probe", "-m", "1"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def test_a_broker_that_keeps_dying_makes_hubd_stop_in_one_line_audited(tmp_path: Path) -> None:
    """The supervisor's cap: a broker that dies more than MAX_RESTARTS times in a row, each soon after its start,
    is not started a seventh time; hubd stops with status 1 and one line, audits broker.failed, and leaves no
    broker behind."""
    port = free_port()
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "hubd.cli", "--config", str(_embedded_config(tmp_path, port)), "run"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed: list[int] = []
    try:
        assert _wait_for(lambda: _serving(port), 20)
        for _ in range(MAX_RESTARTS + 1):
            assert _wait_for(lambda: _broker_pid(data) not in killed and _serving_broker(port), 20)
            killed.append(_broker_pid(data))
            os.kill(killed[-1], signal.SIGKILL)
        assert daemon.wait(30) == 1
        assert daemon.stderr is not None
        said = daemon.stderr.read().strip().splitlines()
        assert said[-1].startswith("Error: the embedded broker died 6 times in a row"), said[-3:]
        assert "Traceback" not in "\n".join(said)
        assert [r["status"] for r in _audit_events(data, "broker.restarted")] == [-signal.SIGKILL] * MAX_RESTARTS
        failed = _audit_events(data, "broker.failed")
        assert len(failed) == 1 and "died 6 times in a row" in str(failed[0]["reason"])
        assert not any(_alive(pid) for pid in killed) and not _serving_broker(port)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_hubds_process_group_killed_then_run_again_at_once(tmp_path: Path) -> None:
    """kill -9 of hubd's whole process group (hubd and its store process), then `hubd run` again at once: the
    broker went with hubd, the new run starts without a traceback or a port in use, and every reading the hub
    had answered is still there."""
    port = free_port()
    config = _embedded_config(tmp_path, port)
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-m", "hubd.cli", "--config", str(config), "run"]
    first = subprocess.Popen(command, env=env, start_new_session=True)
    second = None
    try:
        assert _wait_for(lambda: _serving(port), 20)
        answer = _rr(port, "hub/v1/register", {"der_id": "PV-0001", "password": INITIAL_PASSWORD, "type": "pv"})
        assert answer is not None and answer["ok"], answer
        password = answer["password"]
        sent = {"der_id": "PV-0001", "password": password, "measured_at": 0, "power_kw": 1.0}
        stored = _rr(port, "hub/v1/data", {"readings": [sent]})
        assert stored is not None and stored["accepted"] == 1
        broker = _broker_pid(data)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        second = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        if not _wait_for(lambda: _serving(port), 20):
            second.kill()
            _, said = second.communicate()
            raise AssertionError(f"the second run did not come up: {said[-2000:]}")
        assert not _alive(broker)
        again = _rr(port, "hub/v1/data", {"readings": [{**sent, "measured_at": 60_000}]})
        assert again is not None and again["accepted"] == 1
        assert _count(data / "readings.sqlite3") == 2
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0
        assert second.stderr is not None and "Traceback" not in second.stderr.read()
    finally:
        for daemon in (first, second):
            if daemon is not None and daemon.poll() is None:
                daemon.kill()
                daemon.wait()


def test_a_broker_killed_mid_load_loses_nothing_the_edge_was_told_was_stored(tmp_path: Path) -> None:
    """The embedded broker killed while an edge sends: the edge (hubd.client) sends again whatever the hub did not
    answer, ingest resumes without an operator, and every reading the hub answered as accepted is in the store."""
    port = free_port()
    data = tmp_path / "data"
    daemon = _start_daemon(_embedded_config(tmp_path, port))
    readings = 400
    try:
        assert _wait_for(lambda: _serving(port), 20)
        answer = _rr(port, "hub/v1/register", {"der_id": "PV-0001", "password": INITIAL_PASSWORD, "type": "pv"})
        assert answer is not None and answer["ok"], answer
        password = str(answer["password"])
        url = f"mqtt://127.0.0.1:{port}"

        def body(i: int) -> dict[str, object]:
            sent = {"der_id": "PV-0001", "password": password, "measured_at": i * 1000, "power_kw": i / 10}
            return {"source_id": "edge-load", "readings": [sent]}

        async def load() -> tuple[set[int], bool]:
            told: set[int] = set()
            killed = False
            deadline = time.monotonic() + 60
            while len(told) < readings and time.monotonic() < deadline:
                try:
                    async with HubClient(url, "edge") as edge:
                        while len(told) < readings:
                            batch = [i for i in range(readings) if i not in told][:25]
                            asked = [edge.request("hub/v1/data", body(i), timeout=3) for i in batch]
                            results = await asyncio.gather(*asked, return_exceptions=True)
                            for i, result in zip(batch, results, strict=True):
                                if isinstance(result, dict) and result.get("accepted") == 1:
                                    told.add(i)
                            if any(isinstance(result, ConnectionError) for result in results):
                                break  # the connection is gone: a new one, then the rest again
                            if not killed and len(told) >= readings // 3:
                                os.kill(_broker_pid(data), signal.SIGKILL)  # with requests in flight
                                killed = True
                except (OSError, MqttError, TimeoutError):  # the broker is away: the edge tries again
                    await asyncio.sleep(0.1)
            return told, killed

        told, killed = asyncio.run(load())
        assert killed and len(told) == readings
        with sqlite3.connect(data / "readings.sqlite3") as db:
            stored = {row[0] // 1000 for row in db.execute("SELECT measured_at FROM readings")}
        assert told <= stored and len(stored) == readings
        assert len(_audit_events(data, "broker.restarted")) == 1
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
