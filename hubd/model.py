"""The hub's vocabulary: raw messages, readings, error codes and time.

Everything downstream of a driver speaks these types, so a reader can follow one reading from the wire
to the store without meeting protocol details.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec


class ErrorCode(StrEnum):
    """The error codes of PROTOCOL.md; the only codes an answer may carry."""

    BAD_REQUEST = "bad_request"
    BAD_CREDENTIALS = "bad_credentials"
    NOT_ALLOWED = "not_allowed"
    UNKNOWN_DER = "unknown_der"
    ALREADY_REGISTERED = "already_registered"
    UNKNOWN_FORMAT = "unknown_format"
    DECODE_ERROR = "decode_error"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class HubError(Exception):
    """An error with a protocol code and a message meant for a person (never a secret)."""

    def __init__(self, code: ErrorCode, message: str, der_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.der_id = der_id  # the DER a refused reading named, when it named one validly

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


DER_TYPES = ("pv", "ess", "generator", "fuel_cell", "meter", "ev", "load", "other")

# Unified quantities: name -> (lowest, highest) allowed value; None means unbounded on that side.
QUANTITIES: dict[str, tuple[float | None, float | None]] = {
    "energy_kwh": (None, None),
    "energy_interval_kwh": (None, None),
    "interval_s": (0.0, None),
    "power_kw": (None, None),
    "reactive_power_kvar": (None, None),
    "voltage_v": (0.0, None),
    "current_a": (None, None),
    "power_factor": (-1.0, 1.0),
    "frequency_hz": (0.0, None),
    "soc_pct": (0.0, 100.0),
}
FIELDS = tuple(QUANTITIES)


# Characters that change how a line reads on a terminal or in a table: C0 and C1 controls, DEL, and the
# Unicode line and paragraph separators. No text the hub takes from outside may hold one.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def visible(text: str) -> str:
    """``text`` with each control character shown as its Python escape (``\\n``, ``\\x1b``), for a table
    row: a value written before the checks, or by other means, cannot add or rewrite rows."""
    return CONTROL_CHARACTERS.sub(lambda found: repr(found.group())[1:-1], text)


def out_of_range(name: str, value: float) -> str:
    """The refusal of a quantity outside its range: ``soc_pct 104.0 is out of range [0.0, 100.0]``, or with one
    bound only ``voltage_v -1.0 is out of range: it must be at least 0.0``."""
    low, high = QUANTITIES[name]
    if low is not None and high is not None:
        return f"{name} {value} is out of range [{low}, {high}]"
    return f"{name} {value} is out of range: it must be " + (f"at least {low}" if high is None else f"at most {high}")


class Reading(msgspec.Struct, gc=False):
    """One DER's quantities at one measurement time (epoch milliseconds, UTC).

    A msgspec Struct rather than a dataclass: decoders make hundreds of thousands a second, and its constructor
    runs in C (about half the cost of the dataclass ``__init__``, bench/FORMATS.md). ``gc=False``: a reading
    holds no reference cycle, so the garbage collector need not track it.
    """

    der_id: str
    measured_at: int
    values: dict[str, float]
    password: str | None = None

    def __repr__(self) -> str:  # never the password
        return f"Reading(der_id={self.der_id!r}, measured_at={self.measured_at!r}, values={self.values!r})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:  # msgspec's own would show the password to rich
        return [("der_id", self.der_id), ("measured_at", self.measured_at), ("values", self.values)]


@dataclass(frozen=True, slots=True)
class Sender:
    """Who a message comes from, as the source that took it in knows it: what auth judges its readings by.

    ``ders`` is None for a sender that proves each reading with its DER's password (an MQTT edge terminal);
    for a gateway system that proved its own password, and for a source the operator configured (a polled
    device, a cloud account), it is the DERs bound to it, whose readings it may write without their passwords
    and no other's.
    """

    kind: str  # "mqtt" (an edge terminal), "gateway" (a gateway system), or a configured source's protocol
    name: str  # the source instance, or the gateway system's name
    ders: frozenset[str] | None = None


EDGE = Sender("mqtt", "edge")
"""An MQTT data message: every reading carries its DER's password (docs/protocol.md)."""


@dataclass(slots=True)
class RawMessage:
    """What a source hands on: bytes plus where and whom they came from. Sources never decode.

    A source that reads values rather than payloads (a Modbus register map) hands on decoded ``readings``
    instead, with an empty payload; they are judged and stored like any others.
    """

    source_id: str
    format_code: str
    payload: bytes
    received_at: int
    topic: str = ""
    requester: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    sender: Sender = EDGE
    readings: list[Reading | HubError] | None = None


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


# The times the hub takes: years 1000 to 9998. Wider ones fit neither SQLite's integers nor the date
# arithmetic of formatting and bucketing, and no measurement or query needs them.
MIN_TIME_MS = -30_610_224_000_000  # 1000-01-01T00:00:00Z
MAX_TIME_MS = 253_370_764_800_000  # 9999-01-01T00:00:00Z, exclusive


def parse_time(value: object, name: str = "time") -> int:
    """Parse an RFC 3339 time with an explicit offset, or integer epoch milliseconds, to epoch ms.

    A time without an offset is refused, never guessed: a wrong zone silently moves a value into
    another settlement slot.
    """
    epoch_ms = _parse_time(value, name)
    if not MIN_TIME_MS <= epoch_ms < MAX_TIME_MS:
        raise HubError(ErrorCode.BAD_REQUEST, f"{name} is out of range: the hub takes the years 1000 to 9998")
    return epoch_ms


def _parse_time(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise HubError(ErrorCode.BAD_REQUEST, f"{name} must be RFC 3339 with an offset or epoch milliseconds")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if not isinstance(value, str):
        raise HubError(ErrorCode.BAD_REQUEST, f"{name} must be RFC 3339 with an offset or epoch milliseconds")
    text = value.strip()
    if text.endswith("z"):  # fromisoformat takes a capital Z itself
        text = text[:-1] + "Z"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise HubError(ErrorCode.BAD_REQUEST, f"{name} {value!r} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise HubError(ErrorCode.BAD_REQUEST, f"{name} {value!r} has no UTC offset; add one such as Z or +09:00")
    return int(parsed.timestamp() * 1000)


def format_time(epoch_ms: int) -> str:
    """Epoch milliseconds as the hub's UTC form, e.g. ``2026-11-27T00:05:00.000Z``."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"
