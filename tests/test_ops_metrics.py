"""The operator's HTTP listener on a real hub: /metrics scraped and parsed as Prometheus would, with values
checked against what the test sent; /healthz and /readyz as a load balancer sees them, also while the broker
is gone; ``hubd status`` and its exit status."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningHub, write_config
from helpers import reading
from prometheus_client.parser import text_string_to_metric_families

from hubd.broker import EmbeddedBroker
from hubd.config import ConfigError, parse_config


def url_of(hub: RunningHub) -> str:
    assert hub._hub is not None
    url = hub._hub.ops.url
    assert url is not None
    return url


def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def scrape(hub: RunningHub) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and labels."""
    status, body, headers = get(url_of(hub) + "metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_count_what_was_sent_accepted_and_refused_by_code(hub: RunningHub) -> None:
    password = hub.register("PV-1")
    before = scrape(hub)
    assert before["hubd_readings_stored_total", ()] == 0
    good = [reading("PV-1", password, f"2026-11-01T00:0{i}:00Z") for i in range(5)]
    wrong = [reading("PV-1", "not-its-password", f"2026-11-01T01:0{i}:00Z") for i in range(2)]
    unknown = [reading("XX-9", "whatever", "2026-11-01T02:00:00Z")]
    answer = hub.rr("hub/v1/data", {"source_id": "edge-1", "readings": good + wrong + unknown})
    assert answer["accepted"] == 5 and len(answer["rejected"]) == 3, answer
    hub.rr("hub/v1/data", b"this is not JSON")  # quarantined, decode_error

    samples = scrape(hub)
    assert samples["hubd_messages_received_total", ()] == 2
    assert samples["hubd_readings_received_total", ()] == 8
    assert samples["hubd_readings_stored_total", ()] == 5
    assert samples["hubd_readings_refused_total", (("code", "bad_credentials"),)] == 2
    assert samples["hubd_readings_refused_total", (("code", "unknown_der"),)] == 1
    assert samples["hubd_messages_quarantined_total", (("code", "decode_error"),)] == 1
    assert samples["hubd_quarantine_entries", ()] == 1
    assert samples["hubd_answers_sent_total", (("topic", "data"),)] == 2
    assert samples["hubd_answers_sent_total", (("topic", "register"),)] == 1
    assert samples["hubd_ders", (("status", "registered"),)] == 1
    assert samples["hubd_commit_readings_sum", ()] == 5
    assert samples["hubd_commit_duration_seconds_count", ()] >= 1
    assert samples["hubd_broker_connected", ()] == 1
    assert samples["hubd_source_state", (("kind", "mqtt"), ("name", hub.config.broker.client_id), ("state", "up"))] == 1
    assert samples["hubd_store_queue_messages", ()] == 0
    assert samples["process_resident_memory_bytes", ()] > 10_000_000
    # No DER id anywhere in the labels (cardinality): only the fixed label names.
    labels = {name for _, pairs in samples for name, _ in pairs}
    assert labels <= {"code", "topic", "status", "kind", "name", "state", "le"}, labels


def test_health_probes_follow_the_broker(hub: RunningHub) -> None:
    status, body, _ = get(url_of(hub) + "healthz")
    assert (status, json.loads(body)) == (200, {"alive": True})
    status, body, _ = get(url_of(hub) + "readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"] is True, ready
    assert ready["checks"]["broker"]["ok"] and ready["checks"]["store"]["ok"] and ready["checks"]["sources"]["ok"]

    hub.broker.stop_sync()  # the broker goes away: alive, but not ready, and says why
    try:
        found: dict[str, Any] = {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status, body, _ = get(url_of(hub) + "readyz")
            found = json.loads(body)
            if status == 503:
                break
            time.sleep(0.1)
        assert status == 503 and found["ready"] is False, found
        assert found["checks"]["broker"]["ok"] is False
        assert [s["state"] for s in found["checks"]["sources"]["sources"]] == ["down"]
        assert get(url_of(hub) + "healthz")[0] == 200
        result = hub.cli("status", "--url", url_of(hub))
        assert result.exit_code == 1, result.output
        assert "NOT READY" in result.output and "broker" in result.output
    finally:
        hub.broker.start_sync()


def test_status_command_tells_ready_from_not_running(hub: RunningHub) -> None:
    password = hub.register("PV-1")
    hub.rr("hub/v1/data", {"source_id": "edge-1", "readings": [reading("PV-1", password)]})
    result = hub.cli("status", "--url", url_of(hub))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("hubd: ready")
    assert "readings stored: 1" in result.output
    hub.stop()
    result = hub.cli("status", "--url", url_of(hub))
    assert result.exit_code == 3, result.output
    assert "no answer" in result.output


def test_http_section_is_checked_and_a_taken_port_stops_the_hub_with_one_line(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    for bad, said in (
        ({"bind": "localhost"}, "http.bind: must be host:port"),
        ({"bind": "127.0.0.1:70000"}, "http.bind: the port must be 0 … 65535"),
        ({"bind": "127.0.0.1:80; rm -rf /"}, "http.bind: must be host:port"),
        ({"fresh_s": 600, "silent_s": 300}, "http.silent_s: must be at least http.fresh_s"),
        ({"port": 8780}, "http.port: unknown key"),
    ):
        with pytest.raises(ConfigError, match=re.escape(said)):
            parse_config({"http": bad})
    assert parse_config({"http": {"bind": "[::1]:0"}}).http.address == ("::1", 0)
    assert parse_config({}).http.url == "http://127.0.0.1:8780/"  # loopback by default
    assert parse_config({"http": {"bind": None}}).http.address is None

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = write_config(tmp_path / "hubd.yaml", broker, http={"bind": f"127.0.0.1:{port}"})
        run = subprocess.run(
            [str(Path(sys.executable).parent / "hubd"), "--config", str(config), "run"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert run.returncode == 78, run.stderr  # a configuration problem: systemd does not restart into it
    assert f"http.bind: 127.0.0.1:{port} is in use by" in run.stderr
    assert "Traceback" not in run.stderr
