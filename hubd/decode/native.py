"""The hub's native format ``hub.v1`` (docs/protocol.md, Power data), registered under its code.

``hub.v1`` is decoded on two paths with one result. The fast path (msgspec, typed) takes the messages it can
vouch for, all readings good; any other message goes whole to the slow path (orjson, then each reading
checked in Python), which alone refuses messages and readings, with the exact reasons.
"""

from __future__ import annotations

import math
import re
import sys
from datetime import datetime
from typing import Annotated, Any, TypeGuard

import msgspec

from hubd.auth.registry import ID_PATTERN
from hubd.decode.registry import Decoded, Limits, load_json_object, register
from hubd.model import MIN_TIME_MS, QUANTITIES, ErrorCode, HubError, Reading, out_of_range, parse_time

# What a broker refuses in a topic (as Mosquitto's UTF-8 check does): control characters, surrogates and
# non-characters; publishing to such a topic gets the hub disconnected, and the message delivered again.
_NOT_IN_TOPICS = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef#+"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))  # U+xFFFE, U+xFFFF
    + "]"
)
# Reply topics already found good: senders reuse theirs, and a set lookup is cheaper than the check. Bounded.
_GOOD_TOPICS: set[str] = set()
_GOOD_TOPICS_MAX = 10_000


def _is_topic(value: object) -> bool:
    """A topic the hub may answer on, whatever its prefix: 1-65535 bytes of UTF-8, no wildcards, not one of
    the broker's own (``$SYS/...``: a ``$`` first), nothing a broker refuses."""
    if type(value) is not str:
        return False
    if value in _GOOD_TOPICS:
        return True
    if not 0 < len(value.encode("utf-8", "surrogatepass")) <= 65535 or value[0] == "$" or _NOT_IN_TOPICS.search(value):
        return False
    _remember(_GOOD_TOPICS, value, _GOOD_TOPICS_MAX)
    return True


def _topic_refusal(what: str, topic: object, inside: str = "") -> HubError:
    """Why ``topic`` is no reply address, naming the rule it breaks (docs/protocol.md, Answers); a topic
    that breaks none is inside the hub's own topics ``inside``."""
    if type(topic) is not str:
        return HubError(ErrorCode.BAD_REQUEST, f"{what} must be a topic (a string)")
    shown = repr(topic[:64]) + ("..." if len(topic) > 64 else "")
    if topic.startswith("$"):
        rule = "starts with $ (the broker's own topics)"
    elif "#" in topic or "+" in topic:
        rule = "has a wildcard (+ or #)"
    elif not _is_topic(topic):
        rule = "is no topic (empty, longer than 65535 bytes, or with a control character or non-character)"
    else:
        rule = f"is inside the hub's own topics {inside}..."
    return HubError(ErrorCode.BAD_REQUEST, f"{what} {shown} {rule}: the hub does not answer there")


def reply_fields(data: dict[str, Any]) -> tuple[str | None, Any]:
    """MQTT 3.1.1 request/response: ``reply_to`` and ``request_id`` in the JSON body.

    A ``reply_to`` the hub can never answer on refuses the message (HubError ``bad_request``): dropping it
    would process the message while its sender waits for an answer that never comes, and leaves no trace of
    why. The hub's own topics are the caller's to refuse (``ReplyRule``): only it knows the prefix."""
    reply_to = data.get("reply_to")
    if reply_to is not None and not _is_topic(reply_to):
        raise _topic_refusal("reply address (reply_to)", reply_to)
    request_id = data.get("request_id")
    if not isinstance(request_id, str | int) or isinstance(request_id, bool):
        request_id = None
    return reply_to, request_id


class ReplyRule:
    """Where this hub answers: on any topic ``_is_topic`` allows, except inside its own prefix.

    Inside the prefix are the topics the hub takes requests on and those it sends its own requests to
    (``hub/v1/time/set/<source>``): an answer there would be a forged request or a loop. A reply address the
    hub may not use refuses the message (``bad_request``) before anything is stored or asked. Addresses found
    good are remembered (bounded), so a sender's reused reply topic costs one set lookup per message.
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._inside = prefix + "/"
        self._good: set[str] = set()

    def allows(self, topic: str) -> bool:
        if topic in self._good:
            return True
        if not _is_topic(topic) or topic == self._prefix or topic.startswith(self._inside):
            return False
        _remember(self._good, topic, _GOOD_TOPICS_MAX)
        return True

    def check(self, response_topic: str | None, reply_to: str | None) -> None:
        """Raise the refusal of a message's reply addresses, if one is refused; one set lookup each when good."""
        good = self._good
        if (response_topic is None or response_topic in good) and (reply_to is None or reply_to in good):
            return
        refused = self.refusal(response_topic, reply_to)
        if refused is not None:
            raise refused

    def refusal(self, response_topic: str | None, reply_to: str | None) -> HubError | None:
        """Why a message's reply address (MQTT v5 response topic, v3.1.1 ``reply_to``) is refused, if it is."""
        for what, topic in (("reply address (response topic)", response_topic), ("reply address (reply_to)", reply_to)):
            if topic is not None and not self.allows(topic):
                return _topic_refusal(what, topic, self._inside)
        return None


# Each quantity's range with the open ends at the largest finite double, so one chained comparison also
# refuses NaN and ±Infinity on the hot path.
_BOUNDS = {
    key: (-sys.float_info.max if low is None else low, sys.float_info.max if high is None else high)
    for key, (low, high) in QUANTITIES.items()
}
_RESERVED = {"der_id", "password", "measured_at"}


def check_reading(item: Any, limits: Limits, needs_password: bool = True) -> Reading:
    """Validate one reading of the unified schema; raise HubError(bad_request) naming the field.

    A reading in a gateway's message (``needs_password`` False) carries no password of its own: the
    gateway's proves it, and one it carries anyway is not looked at."""
    if type(item) is not dict:
        raise HubError(ErrorCode.BAD_REQUEST, "a reading must be a JSON object")
    der_id = item.get("der_id")
    # str first: a JSON list or object is unhashable
    if not ((type(der_id) is str and der_id in KNOWN_IDS) or valid_id(der_id)):
        raise HubError(ErrorCode.BAD_REQUEST, "der_id is missing or not a valid DER id")
    password = item.get("password") if needs_password else None
    if needs_password and (type(password) is not str or not password):
        raise HubError(ErrorCode.BAD_REQUEST, "password is missing or not a string")
    if "measured_at" not in item:
        raise HubError(ErrorCode.BAD_REQUEST, "measured_at is missing")
    measured_at = _measured_at(item["measured_at"])
    if measured_at > limits.now_ms + limits.max_future_ms:
        raise HubError(
            ErrorCode.BAD_REQUEST,
            f"measured_at is more than {limits.max_future_ms // 1000} s in the future; check the sender's clock",
        )
    values: dict[str, float] = {}
    for key, value in item.items():
        bounds = _BOUNDS.get(key)
        if bounds is None:
            if key in _RESERVED:
                continue
            raise HubError(ErrorCode.BAD_REQUEST, f"unknown field {key!r}")
        kind = type(value)  # exact types: a bool is not a number here
        if kind is float:
            number = value
        elif kind is int:
            number = float(value)
        elif value is None:
            continue
        else:
            raise HubError(ErrorCode.BAD_REQUEST, f"{key} must be a number")
        if not bounds[0] <= number <= bounds[1]:  # also false for NaN and ±Infinity
            if not math.isfinite(number):
                raise HubError(ErrorCode.BAD_REQUEST, f"{key} must be a finite number")
            raise HubError(ErrorCode.BAD_REQUEST, out_of_range(key, number))
        values[key] = number
    if not values:
        raise HubError(ErrorCode.BAD_REQUEST, "a reading needs at least one quantity")
    if ("energy_interval_kwh" in values) != ("interval_s" in values):
        raise HubError(ErrorCode.BAD_REQUEST, "energy_interval_kwh and interval_s go together")
    if "power_factor" in values:
        derive_reactive_power(values)
    return Reading(der_id, measured_at, values, password)


# Ids already found well-formed (DER and source ids, one rule for both; the vendor formats' decoders too): a set
# lookup instead of a regular expression per reading. Bounded, as senders choose the ids: past the bound it
# starts over.
KNOWN_IDS: set[str] = set()
_KNOWN_IDS_MAX = 200_000
# RFC 3339 times already parsed: DERs report at the same instants (on the minute, per slot), and parsing is a
# good part of a reading's cost. Bounded like the ids.
_TIMES: dict[str, int] = {}
_TIMES_MAX = 10_000


def valid_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a well-formed DER or source id, remembering it in KNOWN_IDS if so."""
    if type(value) is not str:
        return False
    if value in KNOWN_IDS:
        return True
    if not ID_PATTERN.match(value):
        return False
    _remember(KNOWN_IDS, value, _KNOWN_IDS_MAX)
    return True


def _remember(cache: set[str], value: str, most: int) -> None:
    """Add to a bounded cache of values found good: past ``most`` it starts over."""
    if len(cache) >= most:
        cache.clear()
    cache.add(value)


def _measured_at(stated: object) -> int:
    """``measured_at`` in epoch ms (HubError if it is no time the hub takes), a string parsed once."""
    if type(stated) is not str:
        return parse_time(stated, "measured_at")
    measured_at = _TIMES.get(stated)
    if measured_at is None:
        measured_at = parse_time(stated, "measured_at")
        if len(_TIMES) >= _TIMES_MAX:
            _TIMES.clear()
        _TIMES[stated] = measured_at
    return measured_at


def sent_at_of(stated: object, limits: Limits) -> int:
    """A message's ``sent_at`` in epoch ms; HubError(bad_request) when it is no time the hub takes, or is more
    than ``max_future_s`` ahead of the hub's clock: a send time far ahead would make its readings the newest
    version for good, so that no later correction could replace them."""
    sent_at = parse_time(stated, "sent_at")
    if sent_at > limits.now_ms + limits.max_future_ms:
        raise HubError(
            ErrorCode.BAD_REQUEST,
            f"sent_at is more than {limits.max_future_ms // 1000} s in the future; check the sender's clock",
        )
    return sent_at


def derive_reactive_power(values: dict[str, float]) -> None:
    """Fill ``reactive_power_kvar`` from power and power factor when it was not sent.

    Q = P·tan(arccos|pf|); a negative power factor (leading, capacitive) gives a negative Q. A power
    factor of 0 says nothing about P, so nothing is derived.
    """
    pf = values.get("power_factor")
    power = values.get("power_kw")
    if pf is None or pf == 0 or power is None or "reactive_power_kvar" in values:
        return
    magnitude = abs(pf)
    if magnitude > 1.0:  # min(abs(pf), 1.0), without min(): the call costs more than the trigonometry
        magnitude = 1.0
    q = abs(power) * math.tan(math.acos(magnitude))
    values["reactive_power_kvar"] = q if pf > 0 else -q


@register("hub.v1")
def decode_native(payload: bytes, limits: Limits) -> Decoded:
    """The native format: ``{"source_id": ..., "readings": [...]}``.

    The fast path where it can vouch for the result, else the slow path (the same result, only slower).
    """
    decoded = _decode_fast(payload, limits)
    return decode_native_slow(payload, limits) if decoded is None else decoded


def decode_native_slow(payload: bytes, limits: Limits) -> Decoded:
    """The native format, every rule checked in Python: the reference, and what refuses with reasons."""
    data = load_json_object(payload)
    reply_to, request_id = reply_fields(data)
    source_id = data.get("source_id")
    if source_id is not None and not valid_id(source_id):
        raise HubError(ErrorCode.DECODE_ERROR, "source_id must be 1-64 characters of letters, digits and ._:-")
    gateway = _gateway(data.get("gateway"))
    sent_at = data.get("sent_at")
    if sent_at is not None:
        sent_at = sent_at_of(sent_at, limits)
    readings = data.get("readings")
    if not isinstance(readings, list):
        raise HubError(ErrorCode.DECODE_ERROR, "the message needs a readings list")
    if len(readings) > limits.max_readings:
        raise HubError(
            ErrorCode.TOO_LARGE,
            f"{len(readings)} readings in one message; the limit is {limits.max_readings}",
        )
    items: list[Reading | HubError] = []
    for item in readings:
        try:
            items.append(check_reading(item, limits, gateway is None and not limits.vouched))
        except HubError as exc:
            named = item.get("der_id") if isinstance(item, dict) else None
            exc.der_id = named if valid_id(named) else None
            items.append(exc)
    return Decoded(source_id, items, reply_to, request_id, gateway, sent_at)


def _gateway(stated: object) -> tuple[str, str] | None:
    """A gateway's message names the gateway system and its password: ``{"name": ..., "password": ...}``."""
    if stated is None:
        return None
    if type(stated) is not dict or stated.keys() != {"name", "password"}:
        raise HubError(ErrorCode.DECODE_ERROR, "gateway must be an object with exactly a name and a password")
    name, password = stated["name"], stated["password"]
    if not valid_id(name):
        raise HubError(ErrorCode.DECODE_ERROR, "gateway.name must be 1-64 characters of letters, digits and ._:-")
    if type(password) is not str or not password:
        raise HubError(ErrorCode.DECODE_ERROR, "gateway.password is missing or not a string")
    return name, password


# The fast path's message types, typed so that msgspec does most checks in C: a message without unknown keys,
# readings without unknown fields, and each quantity a finite number in its range (an int becomes a float, as on
# the slow path; a bool or a string is no number; null is absent). The quantities come from QUANTITIES, so the
# two paths cannot drift apart. Unknown keys at the top are left to the slow path: msgspec skips a value it does
# not decode without checking its UTF-8, and the slow path's fallback parser refuses some that orjson takes.
_FastReading = msgspec.defstruct(
    "_FastReading",
    [
        ("der_id", str),
        ("measured_at", str | int),
        ("password", str | None, None),  # absent in a gateway's message
        *((key, Annotated[float, msgspec.Meta(ge=low, le=high)] | None, None) for key, (low, high) in _BOUNDS.items()),
    ],
    forbid_unknown_fields=True,
    omit_defaults=True,  # to_builtins then leaves out the absent quantities
    gc=False,
)
_FastGateway = msgspec.defstruct("_FastGateway", [("name", str), ("password", str)], forbid_unknown_fields=True)
_FastMessage = msgspec.defstruct(
    "_FastMessage",
    [
        ("readings", list[_FastReading]),  # type: ignore[valid-type]
        ("gateway", _FastGateway | None, None),
        ("source_id", str | None, None),
        ("reply_to", str | None, None),
        ("request_id", str | int | None, None),
        ("sent_at", str | int | None, None),
    ],
    forbid_unknown_fields=True,
    gc=False,
)
_FAST_DECODER = msgspec.json.Decoder(_FastMessage)
_FROM_ISO = datetime.fromisoformat
# request_id ints the slow path keeps as ints; orjson reads wider ones as floats (and reply_fields drops those).
_INT_IDS = range(-(2**63), 2**64)


def _decode_fast(payload: bytes, limits: Limits) -> Decoded | None:
    """The message decoded, or None when the slow path must judge it (it would refuse something, or msgspec
    cannot tell). It never refuses: every refusal and its reason comes from the slow path."""
    try:
        message: Any = _FAST_DECODER.decode(payload)
    except (msgspec.DecodeError, ValueError, RecursionError):  # ValueError: invalid UTF-8 in a string
        return None
    source_id = message.source_id
    if source_id is not None and not valid_id(source_id):
        return None
    request_id = message.request_id
    if type(request_id) is int and request_id not in _INT_IDS:
        return None
    if len(message.readings) > limits.max_readings:
        return None
    gateway = message.gateway
    if gateway is not None:
        if not valid_id(gateway.name) or not gateway.password:
            return None
        gateway = (gateway.name, gateway.password)
    items = _fast_readings(
        message.readings, limits.now_ms + limits.max_future_ms, gateway is None and not limits.vouched
    )
    if items is None:
        return None
    reply_to = message.reply_to
    if reply_to is not None and not _is_topic(reply_to):
        return None  # refused by the slow path
    sent_at = message.sent_at
    if sent_at is not None:
        sent_at = _fast_sent_at(sent_at, limits.now_ms + limits.max_future_ms)
        if sent_at is None:
            return None  # refused by the slow path
    return Decoded(source_id, items, reply_to, request_id, gateway, sent_at)


def _fast_sent_at(stated: str | int, latest_ms: int) -> int | None:
    """``sent_at`` as ``sent_at_of`` takes it, or None for the slow path to judge. Each message has its own,
    so no cache helps: parsed inline, without parse_time's calls and steps for the forms edges do not send
    (a lower-case z, spaces), which fail ``fromisoformat`` here and go to the slow path (~1 µs less a message).
    """
    if type(stated) is str:
        try:
            parsed = _FROM_ISO(stated)
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        sent_at = int(parsed.timestamp() * 1000)
    else:
        sent_at = int(stated)
    return sent_at if MIN_TIME_MS <= sent_at <= latest_ms else None


def _fast_readings(readings: list[Any], latest_ms: int, needs_password: bool) -> list[Reading | HubError] | None:
    """The readings msgspec decoded, checked for what it cannot check; None if one fails.

    The hub's hottest loop: it keeps to the fewest Python steps per reading, so derive_reactive_power's
    arithmetic is written out here (without its clamp of ``|pf|`` to 1, which msgspec has checked).
    """
    items: list[Reading | HubError] = []
    append = items.append
    times, valid_ids = _TIMES, KNOWN_IDS
    tan, acos = math.tan, math.acos
    for values in msgspec.to_builtins(readings):  # a dict per reading, without its absent quantities
        der_id = values.pop("der_id")
        password = values.pop("password", None)
        stated = values.pop("measured_at")
        measured_at = times.get(stated)  # None for an int: only strings are kept
        if measured_at is None:
            measured_at = _fast_time(stated)
        if (
            (der_id not in valid_ids and not valid_id(der_id))
            or (needs_password and not password)
            or measured_at is None
            or measured_at > latest_ms
            or not values  # no quantity
            or ("energy_interval_kwh" in values) != ("interval_s" in values)
        ):
            return None
        pf = values.get("power_factor")
        if pf:  # as derive_reactive_power: not for a power factor of 0, nor over a sent reactive power
            power = values.get("power_kw")
            if power is not None and "reactive_power_kvar" not in values:
                q = abs(power) * tan(acos(abs(pf)))
                values["reactive_power_kvar"] = q if pf > 0 else -q
        append(Reading(der_id, measured_at, values, password if needs_password else None))
    return items


def _fast_time(stated: str | int) -> int | None:
    """``measured_at`` in epoch ms; None when it is no time the hub takes (the slow path then says why)."""
    try:
        return _measured_at(stated)
    except HubError:
        return None
