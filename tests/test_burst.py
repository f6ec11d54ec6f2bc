"""A burst of data messages: every one committed and answered, even past the broker's in-flight limits.

The broker takes at most its Receive Maximum (Mosquitto: max_inflight_messages; 100 for this test, 1,000 in
the embedded config) of the hub's QoS 1 answers unacknowledged; a commit of a few hundred messages owes more
answers than that at once. They must wait for packet ids, not fail (which left messages unacknowledged and the
hub stalled). The burst is queued by the broker while the hub is down, so that it arrives all at once.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningHub, broker_allowing

from hubd.broker import EmbeddedBroker

IN_FLIGHT = 100  # the broker's Receive Maximum here, below the hub's broker.receive_maximum (10,000)
BURST = 400  # messages: four times that


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """This module's hubs run on a broker that takes fewer answers in flight than the hub has messages in hand."""
    with broker_allowing(tmp_path, IN_FLIGHT) as embedded:
        yield embedded


def test_a_burst_is_committed_and_every_message_answered(hub: RunningHub) -> None:
    password = hub.register("PV-BURST")
    port = str(hub.broker.port)
    now_ms = int(time.time() * 1000)
    lines = "".join(
        json.dumps(
            {
                "reply_to": "burst/answers",
                "request_id": i,
                "readings": [
                    {"der_id": "PV-BURST", "password": password, "measured_at": now_ms - 1000 * i, "power_kw": 1.5}
                ],
            }
        )
        + "\n"
        for i in range(BURST)
    )
    receiver = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-q", "1", "-v", "-t", "burst/answers", "-t", "burst/probe"],
        stdout=subprocess.PIPE,
    )
    answers: list[dict[str, object]] = []
    probed = threading.Event()
    done = threading.Event()

    def read() -> None:
        assert receiver.stdout is not None
        for line in receiver.stdout:
            topic, _, payload = line.partition(b" ")
            if topic == b"burst/probe":
                probed.set()
                continue
            answers.append(json.loads(payload))
            if len(answers) == BURST:
                done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for _ in range(20):  # the subscription is in place once a probe comes back
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-t", "burst/probe", "-n"], check=True)
            if probed.wait(0.5):
                break
        assert probed.is_set(), "mosquitto_sub did not subscribe"
        hub.stop()  # the broker queues the burst in the hub's persistent session
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1", "-t", "hub/v1/data", "-l"],
            input=lines.encode(),
            check=True,
            timeout=60,
        )
        hub.start()
        assert done.wait(60), f"{len(answers)} of {BURST} answers arrived"
    finally:
        receiver.terminate()
        receiver.wait(10)
    assert sorted(a["request_id"] for a in answers) == list(range(BURST))  # type: ignore[type-var]
    assert all(a["ok"] is True and a["accepted"] == 1 and a["rejected"] == [] for a in answers)
    with sqlite3.connect(hub.config.readings_path) as db:
        assert db.execute("SELECT count(*) FROM readings WHERE der_id = 'PV-BURST'").fetchone()[0] == BURST
