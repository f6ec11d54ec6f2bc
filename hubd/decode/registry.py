"""The decoder registry: payload bytes → readings in the unified schema, chosen by the format code.

A decoder only decodes and validates: it never authenticates or stores. The native format ``hub.v1``
(``hubd.decode.native``) and the vendor formats (``hubd.decode.vendor``, from definition files) register here
under their codes; ingest asks ``decoder_for(code)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson

from hubd.model import ErrorCode, HubError, Reading


@dataclass(slots=True)
class Decoded:
    """One message decoded: its readings or, per index, why a reading was refused."""

    source_id: str | None
    items: list[Reading | HubError]
    reply_to: str | None = None
    request_id: Any = None
    gateway: tuple[str, str] | None = None  # (name, password) of the gateway system that sent the message
    # The sender's send time (epoch ms): the version of every reading of the message, so a message sent earlier
    # never replaces what a later one stored, whenever it arrives (docs/protocol.md, Power data). None: unsent.
    sent_at: int | None = None


class Limits(msgspec.Struct, frozen=True, gc=False):
    """What a decoder judges a message by: the hub's clock when the message was received, the limits, and the
    sender's MQTT v5 user properties (a vendor format may take the DER id and password from them; the native
    format ignores them). A Struct, made in C: ingest makes one per message."""

    now_ms: int
    max_future_ms: int
    max_readings: int
    properties: dict[str, str] = msgspec.field(default_factory=dict)
    # The broker vouches for the sender (a DER's own topic under access control at the broker): its readings
    # need no password (docs/protocol.md, "Proof of sender").
    vouched: bool = False


Decoder = Callable[[bytes, Limits], Decoded]
_DECODERS: dict[str, Decoder] = {}


def register(code: str) -> Callable[[Decoder], Decoder]:
    """Register a decoder under a format code (the last path segment of ``hub/v1/data/<code>``)."""

    def wrap(decoder: Decoder) -> Decoder:
        _DECODERS[code] = decoder
        return decoder

    return wrap


def unregister(code: str) -> None:
    """Remove a format (a definition file was removed); the native format stays."""
    if code != "hub.v1":
        _DECODERS.pop(code, None)


def decoder_for(code: str) -> Decoder:
    try:
        return _DECODERS[code]
    except KeyError:
        raise HubError(ErrorCode.UNKNOWN_FORMAT, f"no format is registered under the code {code!r}") from None


def codes() -> list[str]:
    return sorted(_DECODERS)


def load_json_object(payload: bytes) -> dict[str, Any]:
    """Parse a JSON object. NaN and Infinity are let through here so that they fail one reading, not all."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        # Python's parser takes NaN and Infinity, but is otherwise held to what orjson takes: UTF-8 only,
        # integers beyond 64 bits as floats, and no lone surrogates (orjson.dumps refuses those, which
        # would break the audit log and the answer further on).
        try:
            data = json.loads(payload.decode("utf-8"), parse_int=_parse_int)
            orjson.dumps(data)
        except (ValueError, TypeError, RecursionError):
            raise HubError(ErrorCode.DECODE_ERROR, "the payload is not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise HubError(ErrorCode.DECODE_ERROR, f"the payload must be a JSON object, not {type(data).__name__}")
    return data


def _parse_int(text: str) -> int | float:
    number = int(text)
    return number if -(2**63) <= number < 2**64 else float(text)
