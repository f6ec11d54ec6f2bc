"""bench/native: microseconds per reading to decode and validate native ``hub.v1`` messages, in process.

Messages like the ingest benchmark's: each reading carries a DER id, its password, an RFC 3339 ``Z`` time
shared by the readings of the message, and four quantities (power, energy, voltage, power factor: reactive
power is derived). Timed: ``decode_native`` (what the hub calls), ``decode_native_slow`` (the orjson path
every message took before the msgspec fast path, and the one a message falls back to), and the bare
``orjson.loads`` of the same bytes as a floor. Each message size is timed both with every reading valid and
with one bad reading (which sends the message to the slow path). Figures are the fastest of many 10 ms
rounds, the functions' rounds alternating, as in bench/formats.py.

Run: ``.venv/bin/python bench/native.py [--seconds 0.5]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import rates

from hubd import decode
from hubd.decode.registry import Limits
from hubd.model import parse_time

NOW = parse_time("2026-12-01T00:00:00Z")
LIMITS = Limits(NOW, 300_000, 10_000)


def message(count: int, bad: bool = False) -> bytes:
    """One message of ``count`` readings of distinct DERs at one time; with ``bad``, the last one is refused."""
    readings = [
        {
            "der_id": f"PV-{k:04d}",
            "password": "an-issued-password-24chr",
            "measured_at": "2026-11-30T23:59:00Z",
            "power_kw": round(3.0 + k / 1000, 3),
            "energy_kwh": round(1000 + k / 7, 3),
            "voltage_v": round(200 + (k % 50) / 10, 1),
            "power_factor": 0.98,
        }
        for k in range(count)
    ]
    if bad:
        readings[-1]["soc_pct"] = 101
    return orjson.dumps({"source_id": "edge-1", "reply_to": "edge-1/answers", "request_id": 7, "readings": readings})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="seconds of rounds per function")
    args = parser.parse_args()
    slow = getattr(decode.native, "decode_native_slow", None)  # absent before the fast path existed
    named: list[tuple[str, Callable[[bytes, Limits], Any]]] = [("decode_native", decode.native.decode_native)]
    if slow is not None:
        named.append(("decode_native_slow", slow))
    named.append(("orjson.loads (floor)", lambda payload, _limits: orjson.loads(payload)))
    print(f"{'message':26} {'bytes':>6} " + " ".join(f"{name:>21}" for name, _ in named) + "   (µs per reading)")
    for count in (100, 1):
        for bad in (False, True):
            payload = message(count, bad)
            decoded = decode.native.decode_native(payload, LIMITS)
            refused = sum(1 for item in decoded.items if not hasattr(item, "values"))
            assert refused == int(bad), refused
            functions = [lambda f=function, p=payload: f(p, LIMITS) for _, function in named]
            per_call = [1 / rate for rate in rates(functions, args.seconds)]
            label = f"{count} reading{'s' if count > 1 else ''}{', 1 refused' if bad else ''}"
            cells = " ".join(f"{seconds / count * 1e6:21.2f}" for seconds in per_call)
            print(f"{label:26} {len(payload):6d} {cells}")


if __name__ == "__main__":
    main()
