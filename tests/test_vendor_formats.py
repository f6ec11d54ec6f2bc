"""Vendor formats against a running hub: payloads published with mosquitto_pub to hub/v1/data/<code> (with
the MQTT v5 user properties that carry the DER's credentials), a format added by the operator while the hub
runs, and bad definitions refused without taking down the formats already loaded."""

from __future__ import annotations

import gc
import json
import os
import struct
import subprocess
import time
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import RunningHub
from helpers import records

POLL_S = 0.2


@pytest.fixture
def hub(hub_factory: Any, tmp_path: Path) -> RunningHub:
    return hub_factory(formats={"user_dir": str(tmp_path / "user-formats"), "poll_s": POLL_S})  # type: ignore[no-any-return]


def send(hub: RunningHub, code: str, payload: bytes, tmp_path: Path, **properties: str) -> dict[str, Any]:
    """Publish ``payload`` to hub/v1/data/<code> with user properties and a response topic; return the answer."""
    answer_topic = f"test/answers/{os.getpid()}/{time.monotonic_ns()}"
    client = f"test-rr-{time.monotonic_ns()}"
    mqtt = ["-h", "127.0.0.1", "-p", str(hub.broker.port), "-V", "mqttv5", "-q", "1"]
    session = ["-c", "-i", client, "-t", answer_topic]
    subprocess.run(["mosquitto_sub", *mqtt, *session, "-x", "60", "-E"], check=True, timeout=20)
    file = tmp_path / f"payload-{time.monotonic_ns()}"
    file.write_bytes(payload)
    extra = ["-D", "publish", "response-topic", answer_topic, "-D", "publish", "correlation-data", "c-1"]
    for key, value in properties.items():
        extra += ["-D", "publish", "user-property", key, value]
    topic = f"{hub.prefix}/data/{code}"
    subprocess.run(["mosquitto_pub", *mqtt, "-t", topic, "-f", str(file), *extra], check=True, timeout=20)
    out = subprocess.run(
        ["mosquitto_sub", *mqtt, *session, "-x", "0", "-C", "1", "-W", "20"],
        capture_output=True,
        timeout=25,
        check=False,
    )
    assert out.returncode == 0, f"no answer: {out.stderr.decode()}"
    return dict(json.loads(out.stdout))


def stored(hub: RunningHub, der_id: str) -> list[dict[str, Any]]:
    result = hub.cli("query", "--start", "2000-01-01T00:00:00Z", "--end", "2100-01-01T00:00:00Z", "--der", der_id)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def wait_for(hub: RunningHub, event: str, code: str, since: int = 0) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        found = [r for r in records(hub, event) if r.get("code") == code and int(str(r["seq"])) > since]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no {event} for {code}"
        time.sleep(POLL_S / 2)


def last_seq(hub: RunningHub) -> int:
    found = records(hub)
    return int(str(found[-1]["seq"])) if found else 0


YESTERDAY = (datetime.now(ZoneInfo("Asia/Tokyo")) - timedelta(days=1)).strftime("%Y-%m-%d")


def test_shipped_formats_over_mqtt_with_credentials_in_user_properties(hub: RunningHub, tmp_path: Path) -> None:
    pv = hub.register("PV-1")
    ess = hub.register("ESS-1", "ess")
    assert {r["code"] for r in records(hub, "format.loaded")} >= {
        "solaredge.site_power",
        "enphase.telemetry",
        "enphase.battery",
        "echonet.lite",
        "meter.halfhour",
    }

    series = {
        "power": {
            "timeUnit": "QUARTER_OF_AN_HOUR",
            "unit": "W",
            "values": [
                {"date": f"{YESTERDAY} 09:15:00", "value": 2374.4},
                {"date": f"{YESTERDAY} 09:30:00", "value": None},
                {"date": f"{YESTERDAY} 09:45:00", "value": 2410},
            ],
        }
    }
    answer = send(hub, "solaredge.site_power", json.dumps(series).encode(), tmp_path, der_id="PV-1", password=pv)
    assert answer == {"ok": True, "accepted": 2, "rejected": []}
    rows = stored(hub, "PV-1")
    assert [(r["measured_at"], r["power_kw"]) for r in rows] == [
        (f"{YESTERDAY}T00:15:00.000Z", 2.3744),
        (f"{YESTERDAY}T00:45:00.000Z", 2.41),
    ]

    # A wrong password in the user property: refused, as in the native format, and audited.
    answer = send(hub, "solaredge.site_power", json.dumps(series).encode(), tmp_path, der_id="PV-1", password="nope")
    assert answer["accepted"] == 0
    assert [r["error"]["code"] for r in answer["rejected"]] == ["bad_credentials", "bad_credentials"]

    # An ECHONET Lite frame from a storage battery, charging at 1.5 kW (reported positive): -1.5 kW in hubd.
    frame = bytes([0x10, 0x81, 0, 1, 0x02, 0x7D, 0x01, 0x05, 0xFF, 0x01, 0x72, 2, 0xD3, 4])
    frame += (1500).to_bytes(4, "big", signed=True) + bytes([0xE4, 1, 87])
    measured = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    answer = send(hub, "echonet.lite", frame, tmp_path, der_id="ESS-1", password=ess, measured_at=measured.isoformat())
    assert answer == {"ok": True, "accepted": 1, "rejected": []}
    (row,) = stored(hub, "ESS-1")
    assert (row["power_kw"], row["soc_pct"]) == (-1.5, 87.0)

    # A frame the definition cannot read is quarantined whole, and the sender told so.
    answer = send(hub, "echonet.lite", frame[:-2], tmp_path, der_id="ESS-1", password=ess)
    assert answer["ok"] is False and answer["error"]["code"] == "decode_error"
    assert records(hub, "data.quarantined")[-1]["topic"] == "hub/v1/data/echonet.lite"


NEW_FORMAT = """\
description: a vendor's edge box, many DERs in one message
kind: json
source_id: acme-box
records: $.sites[*].points[*]
reading:
  der_id: {path: "$.sites[*].site", map: {north: PV-1, south: PV-2}}
  password: {property: "password:{der_id}"}
  measured_at: {path: ts, time: rfc3339}
  power_kw: {path: kw}
  voltage_v: {path: dv, scale: 0.1, unit: V}
"""


def test_operator_adds_changes_and_removes_a_format_while_the_hub_runs(hub: RunningHub, tmp_path: Path) -> None:
    pv1, pv2 = hub.register("PV-1"), hub.register("PV-2")
    t = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    message = {
        "sites": [
            {"site": "north", "points": [{"ts": t.isoformat(), "kw": 1.25, "dv": 2021}]},
            {"site": "south", "points": [{"ts": t.isoformat(), "kw": 0.5}, {"ts": t.isoformat(), "kw": None}]},
        ]
    }
    payload = json.dumps(message).encode()
    credentials = {"password:PV-1": pv1, "password:PV-2": pv2}
    assert send(hub, "acme.box", payload, tmp_path, **credentials)["error"]["code"] == "unknown_format"

    definition = tmp_path / "acme.box.yaml"
    definition.write_text(NEW_FORMAT, encoding="utf-8")
    since = last_seq(hub)
    added = hub.cli("format", "add", str(definition))
    assert added.exit_code == 0, added.output
    loaded = wait_for(hub, "format.loaded", "acme.box", since)
    assert loaded["file"].endswith("acme.box.yaml")
    assert send(hub, "acme.box", payload, tmp_path, **credentials) == {"ok": True, "accepted": 2, "rejected": []}
    assert [(r["power_kw"], r.get("voltage_v")) for r in stored(hub, "PV-1")] == [(1.25, 202.1)]
    assert [r["power_kw"] for r in stored(hub, "PV-2")] == [0.5]

    # A broken change is refused by `format add` (file and key named) and, dropped into the folder directly,
    # by the hub: the version loaded before keeps serving.
    broken = tmp_path / "broken" / "acme.box.yaml"
    broken.parent.mkdir()
    broken.write_text(NEW_FORMAT.replace("unit: V", "unit: volts"), encoding="utf-8")
    refused = hub.cli("format", "add", str(broken))
    assert refused.exit_code != 0
    assert "acme.box.yaml: reading.voltage_v.unit: voltage_v takes mV, V, kV, not 'volts'" in refused.output
    since = last_seq(hub)
    user_copy = hub.config.formats_user_path / "acme.box.yaml"
    user_copy.write_text(broken.read_text(), encoding="utf-8")
    record = wait_for(hub, "format.refused", "acme.box", since)
    assert record["outcome"] == "error" and "reading.voltage_v.unit" in record["reason"]
    point = {"ts": (t + timedelta(minutes=1)).isoformat(), "kw": 2.0}
    later = json.dumps({"sites": [{"site": "north", "points": [point]}]})
    assert send(hub, "acme.box", later.encode(), tmp_path, **credentials)["accepted"] == 1

    listed = hub.cli("format", "list")
    assert "REFUSED\tacme.box.yaml" in listed.output and "solaredge.site_power\tjson\tshipped" in listed.output

    since = last_seq(hub)
    removed = hub.cli("format", "remove", "acme.box")
    assert removed.exit_code == 0, removed.output
    wait_for(hub, "format.removed", "acme.box", since)
    assert send(hub, "acme.box", payload, tmp_path, **credentials)["error"]["code"] == "unknown_format"
    assert hub.cli("format", "remove", "echonet.lite").exit_code != 0  # shipped: not removed


def test_bad_definition_at_start_is_refused_and_the_others_serve(hub_factory: Any, tmp_path: Path) -> None:
    user = tmp_path / "user-formats"
    user.mkdir()
    (user / "bad.csv.yaml").write_text("kind: csv\ncsv: {delimiter: ';;'}\nreading: {}\n", encoding="utf-8")
    (user / "worse.yaml").write_text("kind: [json\n", encoding="utf-8")
    hub = hub_factory(formats={"user_dir": str(user), "poll_s": POLL_S})
    refused = {r["code"]: r["reason"] for r in records(hub, "format.refused")}
    assert "bad.csv.yaml: csv.delimiter: one character" in refused["bad.csv"]
    assert "worse.yaml: not valid YAML" in refused["worse"]
    pv = hub.register("PV-1")
    t = int((datetime.now(UTC) - timedelta(hours=1)).timestamp()) // 300 * 300
    body = {"system_id": 698, "intervals": [{"end_at": t, "devices_reporting": 1, "powr": 812, "enwh": 67}]}
    answer = send(hub, "enphase.telemetry", json.dumps(body).encode(), tmp_path, der_id="PV-1", password=pv)
    assert answer == {"ok": True, "accepted": 1, "rejected": []}
    (row,) = stored(hub, "PV-1")
    assert (row["power_kw"], row["energy_interval_kwh"], row["interval_s"]) == (0.812, 0.067, 300.0)


def test_a_definition_replaced_or_removed_while_the_hub_runs_is_freed(hub_factory: Any, tmp_path: Path) -> None:
    # The hub freezes what it loaded at start out of garbage collection, so a definition loaded then is freed
    # only by reference counting: it must hold no reference cycle, or each replacement would stay in memory.
    user = tmp_path / "user-formats"
    user.mkdir()
    (user / "acme.box.yaml").write_text(NEW_FORMAT, encoding="utf-8")
    hub = hub_factory(formats={"user_dir": str(user), "poll_s": POLL_S})
    catalog = hub._hub.catalog  # the running hub's own catalog
    first = weakref.ref(catalog.find("acme.box").decoder)
    since = last_seq(hub)
    (user / "acme.box.yaml").write_text(NEW_FORMAT.replace("acme-box", "acme-box-2"), encoding="utf-8")
    wait_for(hub, "format.loaded", "acme.box", since)
    second = weakref.ref(catalog.find("acme.box").decoder)
    assert freed(first)
    since = last_seq(hub)
    (user / "acme.box.yaml").unlink()
    wait_for(hub, "format.removed", "acme.box", since)
    assert freed(second)


def freed(ref: weakref.ref[Any]) -> bool:
    """Whether the object is gone within a few seconds (the hub drops it once it has audited the change)."""
    deadline = time.monotonic() + 5
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()  # skips what the hub froze: a frozen cycle would survive it
        time.sleep(0.05)
    return ref() is None


def test_format_test_prints_readings_or_where_it_fails(hub: RunningHub, tmp_path: Path) -> None:
    sample = tmp_path / "sample.bin"
    header = struct.pack(">BBHBBBBBBBB", 0x10, 0x81, 1, 0x02, 0x79, 1, 0x05, 0xFF, 1, 0x72, 1)
    sample.write_bytes(header + bytes([0xE0, 2, 0x01, 0x00]))  # PV, 0xE0 = 256 W
    ok = hub.cli(
        "format", "test", "echonet.lite", str(sample), "-p", "der_id=PV-1", "-p", "password=x",
        "-p", "measured_at=2026-11-27T09:00:00+09:00",
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.splitlines()[0]) == {
        "der_id": "PV-1",
        "measured_at": "2026-11-27T00:00:00.000Z",
        "power_kw": 0.256,
    }
    assert "password" not in ok.stdout
    missing = hub.cli("format", "test", "echonet.lite", str(sample))
    assert missing.exit_code == 1
    assert "SEOJ 0x027901: der_id is missing or not a valid DER id (user property der_id)" in missing.stdout
    sample.write_bytes(sample.read_bytes()[:-1])
    broken = hub.cli("format", "test", "echonet.lite", str(sample))
    assert broken.exit_code == 1
    assert "sample.bin: decode_error: property 1 of 1 (EPC 0xE0) runs past the end of the frame" in broken.stdout


def test_each_message_is_decoded_with_its_own_receive_time_and_user_properties() -> None:
    """Messages are decoded in groups, but a format's ``default: received`` time and "too far in the future"
    are each message's own receive time, and one message's MQTT v5 user properties never reach another's."""
    from hubd import decode
    from hubd.config import LimitsConfig
    from hubd.decode.registry import Decoded, Limits
    from hubd.ingest import Ingest
    from hubd.model import RawMessage, Reading

    seen: list[Limits] = []

    def decoder(payload: bytes, limits: Limits) -> Decoded:
        seen.append(limits)
        return Decoded(None, [Reading("PV-1", limits.now_ms, {"power_kw": 1.0}, limits.properties.get("password"))])

    decode.registry.register("test.receive_time")(decoder)
    try:
        ingest = Ingest(None, None, None, None, LimitsConfig(max_future_s=60))  # type: ignore[arg-type]
        first = RawMessage("edge", "test.receive_time", b"x", received_at=1_000, properties={"password": "pw-1"})
        second = RawMessage("edge", "test.receive_time", b"x", received_at=2_000)
        times = [ingest._decode(raw).items[0] for raw in (first, second)]
    finally:
        decode.registry.unregister("test.receive_time")
    assert [r.measured_at for r in times if isinstance(r, Reading)] == [1_000, 2_000]
    assert [limits.max_future_ms for limits in seen] == [60_000, 60_000]
    assert [limits.properties for limits in seen] == [{"password": "pw-1"}, {}]
