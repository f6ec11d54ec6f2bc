"""MQTT v5 packets as bytes: pure functions that build and take apart the packets hubd sends and receives.

Only what a client needs (CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP,
DISCONNECT). No I/O and no state here, so each function can be tested against the specification alone
(OASIS MQTT 5.0, chapters 1.5, 2 and 3). Properties come out in the shape the hub's code reads: a dict
from property name to a list of values, in the order received (``user_property``: a list of pairs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Packet types (the high nibble of the first byte).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBACK = 11
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

PINGREQ = b"\xc0\x00"
DUP = 0x08  # the DUP flag in a PUBLISH's first byte

MAX_REMAINING_LENGTH = 268_435_455  # four bytes of variable byte integer


class MalformedPacket(ValueError):
    """The bytes break the MQTT v5 encoding rules; the connection cannot continue."""


# -- property table (MQTT 5.0, 2.2.2.2) ------------------------------------------------------------------------

_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)

_PROPERTIES: dict[int, tuple[str, int]] = {
    0x01: ("payload_format_indicator", _BYTE),
    0x02: ("message_expiry_interval", _FOUR),
    0x03: ("content_type", _UTF8),
    0x08: ("response_topic", _UTF8),
    0x09: ("correlation_data", _BINARY),
    0x0B: ("subscription_identifier", _VARINT),
    0x11: ("session_expiry_interval", _FOUR),
    0x12: ("assigned_client_identifier", _UTF8),
    0x13: ("server_keep_alive", _TWO),
    0x15: ("authentication_method", _UTF8),
    0x16: ("authentication_data", _BINARY),
    0x17: ("request_problem_information", _BYTE),
    0x18: ("will_delay_interval", _FOUR),
    0x19: ("request_response_information", _BYTE),
    0x1A: ("response_information", _UTF8),
    0x1C: ("server_reference", _UTF8),
    0x1F: ("reason_string", _UTF8),
    0x21: ("receive_maximum", _TWO),
    0x22: ("topic_alias_maximum", _TWO),
    0x23: ("topic_alias", _TWO),
    0x24: ("maximum_qos", _BYTE),
    0x25: ("retain_available", _BYTE),
    0x26: ("user_property", _PAIR),
    0x27: ("maximum_packet_size", _FOUR),
    0x28: ("wildcard_subscription_available", _BYTE),
    0x29: ("subscription_identifier_available", _BYTE),
    0x2A: ("shared_subscription_available", _BYTE),
}

REASONS: dict[int, str] = {
    0x00: "success",
    0x04: "disconnect with will message",
    0x01: "granted QoS 1",
    0x10: "no matching subscribers",
    0x11: "no subscription existed",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8C: "bad authentication method",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x92: "packet identifier not found",
    0x93: "receive maximum exceeded",
    0x94: "topic alias invalid",
    0x95: "packet too large",
    0x96: "message rate too high",
    0x97: "quota exceeded",
    0x98: "administrative action",
    0x99: "payload format invalid",
    0x9A: "retain not supported",
    0x9B: "QoS not supported",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded",
    0xA0: "maximum connect time",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}


def reason_text(code: int) -> str:
    """A reason code as a person reads it: ``0x87 (not authorized)``."""
    return f"0x{code:02X} ({REASONS.get(code, 'unknown reason')})"


# -- primitives ------------------------------------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """A Variable Byte Integer: 7 bits a byte, low bits first, the top bit set on all but the last byte."""
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"{value} does not fit a variable byte integer")
    if value < 128:
        return bytes((value,))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Read a Variable Byte Integer at ``pos``; return (value, position after it).

    Raises IndexError when ``buf`` ends inside it (the caller waits for more bytes) and MalformedPacket when it
    runs past four bytes.
    """
    value = 0
    for shift in (0, 7, 14, 21):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise MalformedPacket("variable byte integer longer than four bytes")


def encode_string(text: str) -> bytes:
    return encode_binary(text.encode())


def encode_binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"{len(data)} bytes do not fit an MQTT string or binary field (65,535 at most)")
    return len(data).to_bytes(2, "big") + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


# -- properties ------------------------------------------------------------------------------------------------


def decode_properties(buf: bytes, pos: int, end: int) -> dict[str, list[Any]]:
    """The properties in ``buf[pos:end]``, every one by its type, known or not to the caller."""
    properties: dict[str, list[Any]] = {}
    try:
        while pos < end:
            ident = buf[pos]
            if ident & 0x80:
                ident, pos = decode_varint(buf, pos)
            else:
                pos += 1
            name, kind = _PROPERTIES.get(ident, ("", -1))
            value: Any
            if kind in (_UTF8, _BINARY):
                size = (buf[pos] << 8) | buf[pos + 1]
                value = buf[pos + 2 : pos + 2 + size]
                pos += 2 + size
                if kind == _UTF8:
                    value = value.decode()
            elif kind == _PAIR:
                size = (buf[pos] << 8) | buf[pos + 1]
                key = buf[pos + 2 : pos + 2 + size].decode()
                pos += 2 + size
                size = (buf[pos] << 8) | buf[pos + 1]
                value = (key, buf[pos + 2 : pos + 2 + size].decode())
                pos += 2 + size
            elif kind == _BYTE:
                value = buf[pos]
                pos += 1
            elif kind == _TWO:
                value = (buf[pos] << 8) | buf[pos + 1]
                pos += 2
            elif kind == _FOUR:
                value = int.from_bytes(buf[pos : pos + 4], "big")
                pos += 4
            elif kind == _VARINT:
                value, pos = decode_varint(buf, pos)
            else:
                # Its type, and so its length, is unknown: nothing after it can be read.
                raise MalformedPacket(f"unknown property identifier 0x{ident:02X}")
            if pos > end:
                raise MalformedPacket("a property runs past the end of the properties")
            values = properties.get(name)
            if values is None:
                properties[name] = [value]
            else:
                values.append(value)
    except (IndexError, UnicodeDecodeError) as exc:
        raise MalformedPacket(f"bad properties: {exc}") from None
    return properties


def encode_properties(properties: list[tuple[int, Any]]) -> bytes:
    """Properties as (identifier, value) pairs, encoded by each identifier's type, with their length first."""
    out = bytearray()
    for ident, value in properties:
        _, kind = _PROPERTIES[ident]
        out += encode_varint(ident)
        if kind == _BYTE:
            out.append(value)
        elif kind == _TWO:
            out += value.to_bytes(2, "big")
        elif kind == _FOUR:
            out += value.to_bytes(4, "big")
        elif kind == _VARINT:
            out += encode_varint(value)
        elif kind == _UTF8:
            out += encode_string(value)
        elif kind == _BINARY:
            out += encode_binary(value)
        else:
            out += encode_string(value[0]) + encode_string(value[1])
    return encode_varint(len(out)) + bytes(out)


_CONTENT_TYPE_JSON = b"\x03" + encode_string("application/json")
_JSON_ONLY = encode_varint(len(_CONTENT_TYPE_JSON)) + _CONTENT_TYPE_JSON


def publish_properties(
    content_type: str | None = None,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    user_properties: list[tuple[str, str]] | None = None,
) -> bytes:
    """The properties of a PUBLISH hubd sends, encoded (with their length) once, ready for ``publish``."""
    if content_type == "application/json" and response_topic is None and not user_properties:
        if correlation_data is None:  # the hub's answers: the common cases, without the table walk
            return _JSON_ONLY
        body = _CONTENT_TYPE_JSON + b"\x09" + encode_binary(correlation_data)
        return encode_varint(len(body)) + body
    pairs: list[tuple[int, Any]] = []
    if content_type is not None:
        pairs.append((0x03, content_type))
    if response_topic is not None:
        pairs.append((0x08, response_topic))
    if correlation_data is not None:
        pairs.append((0x09, correlation_data))
    pairs.extend((0x26, pair) for pair in user_properties or ())
    return encode_properties(pairs)


# -- CONNECT / CONNACK -----------------------------------------------------------------------------------------


def connect(
    client_id: str,
    *,
    keepalive_s: int,
    clean_start: bool,
    session_expiry_s: int,
    receive_maximum: int,
    username: str | None = None,
    password: str | None = None,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    """CONNECT, protocol level 5. Topic Alias Maximum is left at 0: the broker sends no aliases. ``will``: a topic
    and payload the broker publishes (QoS 1, retained) when the connection ends without a normal DISCONNECT."""
    flags = (0x02 if clean_start else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    if will is not None:
        flags |= 0x04 | (1 << 3) | 0x20  # will, will QoS 1, will retain
    pairs: list[tuple[int, Any]] = []
    if session_expiry_s:
        pairs.append((0x11, session_expiry_s))
    if receive_maximum != 65535:
        pairs.append((0x21, receive_maximum))
    body = b"\x00\x04MQTT\x05" + bytes((flags,)) + keepalive_s.to_bytes(2, "big") + encode_properties(pairs)
    body += encode_string(client_id)
    if will is not None:
        body += b"\x00" + encode_string(will[0]) + encode_binary(will[1])  # no will properties
    if username is not None:
        body += encode_string(username)
    if password is not None:
        body += encode_binary(password.encode())
    return _packet(CONNECT << 4, body)


@dataclass(frozen=True)
class ConnAck:
    """What the broker answered to CONNECT."""

    session_present: bool
    reason: int
    properties: dict[str, list[Any]] = field(default_factory=dict)

    def first(self, name: str, default: Any = None) -> Any:
        values = self.properties.get(name)
        return values[0] if values else default


def parse_connack(body: bytes) -> ConnAck:
    if len(body) < 2:
        raise MalformedPacket("CONNACK shorter than two bytes")
    properties: dict[str, list[Any]] = {}
    if len(body) > 2:
        length, pos = decode_varint(body, 2)
        properties = decode_properties(body, pos, pos + length)
    return ConnAck(bool(body[0] & 1), body[1], properties)


# -- PUBLISH / PUBACK ------------------------------------------------------------------------------------------


_ONE_BYTE = [bytes((i,)) for i in range(128)]


def publish(
    topic: str, payload: bytes, qos: int, packet_id: int, properties: bytes = b"\x00", retain: bool = False
) -> bytes:
    """A PUBLISH; ``properties`` as ``publish_properties`` returns them (length included), the default none."""
    name = topic.encode()
    head = len(name).to_bytes(2, "big") + name
    if qos:
        head += packet_id.to_bytes(2, "big")
    size = len(head) + len(properties) + len(payload)
    length = _ONE_BYTE[size] if size < 128 else encode_varint(size)
    return b"".join((_ONE_BYTE[0x30 | qos << 1 | retain], length, head, properties, payload))


def with_dup(packet: bytes) -> bytes:
    """The same PUBLISH marked as sent before (DUP=1), for resending after a reconnect."""
    return bytes((packet[0] | DUP,)) + packet[1:]


# An inbound PUBLISH taken apart: (topic, payload, qos, packet id, properties). A plain tuple, not a class:
# it is built once per message on the hub's hot path, and unpacked at once.
Publish = tuple[str, bytes, int, int, dict[str, list[Any]]]


def parse_publish(first: int, body: bytes) -> Publish:
    """Take apart the body of a PUBLISH whose first byte was ``first``; the hot path of the hub's ingest."""
    try:
        qos = (first >> 1) & 3
        pos = 2 + ((body[0] << 8) | body[1])
        topic = body[2:pos].decode()
        packet_id = 0
        if qos:
            packet_id = (body[pos] << 8) | body[pos + 1]
            pos += 2
        length = body[pos]
        if length & 0x80:
            length, pos = decode_varint(body, pos)
        else:
            pos += 1
        properties = decode_properties(body, pos, pos + length) if length else {}
    except (IndexError, UnicodeDecodeError) as exc:
        raise MalformedPacket(f"bad PUBLISH: {exc}") from None
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    return topic, body[pos + length :], qos, packet_id, properties


def puback(packet_id: int) -> bytes:
    """PUBACK, reason Success (left out, as MQTT v5 allows), no properties."""
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def parse_ack(body: bytes) -> tuple[int, int]:
    """(packet id, reason code) of a PUBACK; a two-byte one means Success."""
    if len(body) < 2:
        raise MalformedPacket("acknowledgement shorter than two bytes")
    return (body[0] << 8) | body[1], body[2] if len(body) > 2 else 0


# -- SUBSCRIBE / SUBACK ----------------------------------------------------------------------------------------


def subscribe(packet_id: int, topics: list[str], qos: int) -> bytes:
    """SUBSCRIBE to each topic filter at ``qos`` (no local, retain handling left at their defaults)."""
    body = packet_id.to_bytes(2, "big") + b"\x00"
    for topic in topics:
        body += encode_string(topic) + bytes((qos,))
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def parse_suback(body: bytes) -> tuple[int, list[int], dict[str, list[Any]]]:
    """(packet id, one reason code per topic filter, properties) of a SUBACK."""
    if len(body) < 3:
        raise MalformedPacket("SUBACK shorter than three bytes")
    length, pos = decode_varint(body, 2)
    properties = decode_properties(body, pos, pos + length)
    return (body[0] << 8) | body[1], list(body[pos + length :]), properties


# -- DISCONNECT ------------------------------------------------------------------------------------------------


def disconnect(reason: int = 0) -> bytes:
    """DISCONNECT; reason 0 (normal, the session is kept for its expiry interval) in its two-byte form."""
    return b"\xe0\x00" if reason == 0 else bytes((0xE0, 1, reason))


def parse_disconnect(body: bytes) -> tuple[int, dict[str, list[Any]]]:
    """(reason code, properties) of a DISCONNECT from the broker."""
    if not body:
        return 0, {}
    properties: dict[str, list[Any]] = {}
    if len(body) > 1:
        length, pos = decode_varint(body, 1)
        properties = decode_properties(body, pos, pos + length)
    return body[0], properties


def split(data: bytes, pos: int = 0) -> tuple[int, int, int] | None:
    """Where the packet at ``pos`` lies: (first byte, start of its body, end of its body).

    None while its fixed header is incomplete; ``end`` beyond ``len(data)`` says how many bytes are still due.
    """
    if len(data) - pos < 2:
        return None
    length = data[pos + 1]
    start = pos + 2
    if length & 0x80:
        try:
            length, start = decode_varint(data, pos + 1)
        except IndexError:
            return None
    return data[pos], start, start + length
