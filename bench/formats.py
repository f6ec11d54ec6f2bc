"""bench/formats: in-process decode rate of each shipped vendor format, beside the bare parse of the same bytes.

For each format, one realistic message (a day of SolarEdge quarter hours, a day of Enphase five-minute
intervals, a day of battery quarter hours, a day of half-hour meter rows, one ECHONET Lite frame) is decoded
over and over into validated readings, exactly as the hub's ingest calls the decoder; SolarEdge also as a year
of days decoded in turn, so that each message meets the cost of a day its decoder has not seen lately. Beside
it, the floor on this machine, in this run: ``orjson.loads`` and ``json.loads`` of the same bytes
(``csv.reader`` for CSV, ``struct.iter_unpack`` for a fixed binary layout). The ratio is decode time over
floor time per message.

Targets: JSON formats within 3x of a bare orjson parse; binary formats at least 200,000 readings/s.

Rates are those of the fastest of many 10 ms rounds, a decoder's rounds alternating with its floors'.
Run: ``.venv/bin/python bench/formats.py [--seconds 0.5] [--repeat 3]``; the figures of a run are in
bench/FORMATS.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import struct
import sys
from collections.abc import Callable
from datetime import date, timedelta
from itertools import cycle
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import rates

from hubd.decode.native import decode_native
from hubd.decode.registry import Limits
from hubd.decode.vendor import load_definition
from hubd.model import parse_time

ROOT = Path(__file__).resolve().parent.parent
NOW = parse_time("2026-12-01T00:00:00Z")
DAY = 1764201600  # 2025-11-27T00:00:00Z
CREDENTIALS = {"der_id": "PV-0001", "password": "an-issued-password-24chr", "measured_at": "2026-11-27T09:05:00+09:00"}


def solaredge(day: str = "2026-11-27") -> bytes:
    values = []
    for quarter in range(96):
        hour, minute = divmod(quarter * 15, 60)
        values.append({"date": f"{day} {hour:02d}:{minute:02d}:00", "value": round(1000 + quarter * 12.3, 1)})
    body = {"power": {"timeUnit": "QUARTER_OF_AN_HOUR", "unit": "W", "measuredBy": "INVERTER", "values": values}}
    return json.dumps(body).encode()


def solaredge_days() -> list[bytes]:
    """A year of SolarEdge days, one message each, decoded in turn: each message is of a day the decoder has not
    seen lately (more hours than its table keeps), as when a connector backfills a site's history."""
    first = date(2025, 12, 1)
    return [solaredge((first + timedelta(days=n)).isoformat()) for n in range(365)]


def enphase_telemetry() -> bytes:
    intervals = [
        {"end_at": DAY + 300 * i, "devices_reporting": 35, "powr": 1000 + i, "enwh": 80 + i % 7} for i in range(288)
    ]
    body = {"system_id": 698, "granularity": "day", "total_devices": 35, "items": "intervals", "intervals": intervals}
    return json.dumps(body).encode()


def enphase_battery() -> bytes:
    intervals = [
        {
            "end_at": DAY + 900 * i,
            "charge": {"enwh": 120 if i < 48 else 0, "devices_reporting": 2},
            "discharge": {"enwh": 0 if i < 48 else 95, "devices_reporting": 2},
            "soc": {"percent": 20 + i % 70, "devices_reporting": 2},
        }
        for i in range(96)
    ]
    body = {"system_id": 698, "granularity": "day", "total_devices": 2, "items": "intervals", "intervals": intervals}
    return json.dumps(body).encode()


def meter_csv() -> bytes:
    rows = ["supply_point,slot_start,import_kwh,export_kwh"]
    for slot in range(48):
        hour, minute = divmod(slot * 30, 60)
        rows.append(f"0300111234567890123456,2026/11/27 {hour:02d}:{minute:02d},{0.1 + slot / 100:.3f},0.000")
    return ("\r\n".join(rows) + "\r\n").encode()


def echonet_frame() -> bytes:
    frame = bytes([0x10, 0x81, 0x00, 0x01, 0x02, 0x88, 0x01, 0x05, 0xFF, 0x01, 0x72, 4])
    for epc, edt in [
        (0xE7, (830).to_bytes(4, "big", signed=True)),
        (0xE0, (123456).to_bytes(4, "big")),
        (0xE1, bytes([0x01])),
        (0xD3, (1).to_bytes(4, "big")),
    ]:
        frame += bytes([epc, len(edt)]) + edt
    return frame


def logger_frame() -> bytes:
    records = b"".join(
        struct.pack("<8sIiQHhbxxxf", b"LG000001", DAY + 60 * i, 1500 - i, 123456789 + i, 2021, 153, -1, 50.01)
        for i in range(100)
    )
    return struct.pack("<HBB", 0xA55A, 1, 100) + records


def native() -> bytes:
    readings = [
        {"der_id": "PV-0001", "password": "an-issued-password-24chr", "measured_at": (DAY + 60 * i) * 1000,
         "power_kw": 1.0 + i / 100, "energy_kwh": 1000.0 + i}
        for i in range(100)
    ]  # fmt: skip
    return json.dumps({"source_id": "edge-1", "readings": readings}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="seconds of rounds per function, per repeat")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logger_definition = ROOT / "tests" / "formats" / "definitions" / "test.logger.yaml"
    cases: list[tuple[str, str, Callable[..., Any], bytes | list[bytes], dict[str, str]]] = [
        ("hub.v1 (native)", "json", decode_native, native(), {}),
        ("solaredge.site_power", "json", _load("solaredge.site_power"), solaredge(), CREDENTIALS),
        ("solaredge, a new day each", "json", _load("solaredge.site_power"), solaredge_days(), CREDENTIALS),
        ("enphase.telemetry", "json", _load("enphase.telemetry"), enphase_telemetry(), CREDENTIALS),
        ("enphase.battery", "json", _load("enphase.battery"), enphase_battery(), CREDENTIALS),
        ("meter.halfhour", "csv", _load("meter.halfhour"), meter_csv(), CREDENTIALS),
        ("echonet.lite", "binary", _load("echonet.lite"), echonet_frame(), CREDENTIALS),
        (
            "test.logger (fixed layout)",
            "binary",
            load_definition(logger_definition).decoder,
            logger_frame(),
            {"password:ESS-1": "an-issued-password-24chr"},
        ),
    ]
    print(
        f"{'format':28} {'bytes':>7} {'readings':>8} {'readings/s':>12} {'floor':>22} {'floor rdg/s':>12} {'ratio':>6}"
    )
    for name, kind, decoder, payloads, props in cases:
        limits = Limits(NOW, 300_000, 100_000, props)
        payload = payloads[0] if isinstance(payloads, list) else payloads
        decoded = decoder(payload, limits)
        bad = [item for item in decoded.items if not hasattr(item, "values")]
        assert not bad, (name, bad[:1])
        readings = len(decoded.items)
        floors: list[tuple[str, Callable[[], Any]]] = []
        if kind == "json":
            floors += [
                ("orjson.loads", lambda p=payload: orjson.loads(p)),
                ("json.loads", lambda p=payload: json.loads(p)),
            ]
        elif kind == "csv":
            text = payload.decode()
            floors.append(("csv.reader", lambda t=text: list(csv.reader(io.StringIO(t)))))
        elif name.startswith("test.logger"):
            unpack = struct.Struct("<8sIiQHhbxxxf").iter_unpack
            floors.append(("struct.iter_unpack", lambda p=payload, u=unpack: list(u(p[4:]))))
        functions = [lambda d=decoder, p=payload, lim=limits: d(p, lim), *(floor for _, floor in floors)]
        if isinstance(payloads, list):  # the decoder and each floor take the messages in turn
            functions = [_in_turn(function, payloads) for function in functions]
        measured = rates(functions, args.seconds * args.repeat)
        decode_rate = measured[0]
        shown = [(floor_name, floor_rate) for (floor_name, _), floor_rate in zip(floors, measured[1:], strict=True)]
        shown = shown or [("bytes walk (none)", 0.0)]
        first = True
        for floor_name, floor_rate in shown:
            ratio = f"{floor_rate / decode_rate:5.2f}x" if floor_rate else "    -"
            head = f"{name:28} {len(payload):7d} {readings:8d} {decode_rate * readings:12,.0f}" if first else " " * 59
            floor_readings = f"{floor_rate * readings:12,.0f}" if floor_rate else f"{'-':>12}"
            print(f"{head} {floor_name:>22} {floor_readings} {ratio}")
            first = False
    print("ratio: decode time over floor time for the same message (lower is better; 1.00x = as fast as the parse)")


def _in_turn(function: Callable[..., Any], payloads: list[bytes]) -> Callable[[], Any]:
    """``function`` called with each payload in turn (it takes the payload as its ``p`` default)."""
    following = cycle(payloads).__next__
    return lambda: function(p=following())


def _load(code: str) -> Callable[..., Any]:
    return load_definition(ROOT / "hubd" / "formats" / f"{code}.yaml").decoder


if __name__ == "__main__":
    main()
