"""Vendor sample cases as data: ``cases/<code>/<case>/`` holds the payload (``input.json``, ``input.csv`` or
``input.bin``), the MQTT v5 user properties it is sent with (``properties.json``, optional) and what it must
decode to: ``expected.jsonl`` (one reading or refusal per line, in order) or ``error.txt`` (``<code>: <message>``
for a payload refused whole). Adding a sample is adding files.

Definitions come from the shipped ``hubd/formats/`` and, for the language features no shipped format uses, from
``tests/formats/definitions/``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from hubd.decode.registry import Decoder, Limits
from hubd.decode.vendor import load_definition
from hubd.model import HubError, Reading, format_time, parse_time

HERE = Path(__file__).parent
REPO = HERE.parent.parent
CASES = HERE / "cases"
DEFINITION_FOLDERS = (REPO / "hubd" / "formats", HERE / "definitions")
NOW = parse_time("2026-12-01T00:00:00Z")  # the hub's clock for every case: after every sample


def definition_files() -> list[Path]:
    return sorted(p for folder in DEFINITION_FOLDERS for p in folder.glob("*.yaml"))


@cache
def decoder(code: str) -> Decoder:
    for path in definition_files():
        if path.stem == code:
            return load_definition(path).decoder
    raise LookupError(f"no definition for the case folder {code}")


def case_dirs() -> list[Path]:
    return sorted(p for p in CASES.glob("*/*") if p.is_dir())


def payload_of(case: Path) -> bytes:
    (found,) = [p for p in case.iterdir() if p.name.startswith("input.")]
    return found.read_bytes()


def limits_of(case: Path) -> Limits:
    properties = case / "properties.json"
    props = json.loads(properties.read_text()) if properties.exists() else {}
    return Limits(NOW, 300_000, 10_000, props)


def as_line(index: int, item: Reading | HubError) -> dict[str, Any]:
    """One decoded item as an expected.jsonl line (passwords included: these are test data)."""
    if isinstance(item, HubError):
        return {"index": index, "der_id": item.der_id, "error": item.as_dict()}
    return {
        "der_id": item.der_id,
        "password": item.password,
        "measured_at": format_time(item.measured_at),
        **item.values,
    }
