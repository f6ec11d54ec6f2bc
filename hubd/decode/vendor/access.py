"""What the reading interpreter asks of a payload kind (JSON, CSV, binary, ECHONET Lite), and what it hands it.

The interpreter (``readings``) knows the rules of a reading; a kind knows its payload: how a source is read,
which sources are the same for a whole message, how the records are walked and how a record is named in a
message. Both meet in ``Message``: what one payload gives, made once per message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import msgspec

from hubd.decode.registry import Limits
from hubd.decode.vendor.language import Source
from hubd.model import HubError

# What a fetched value is: any JSON value, the text of a CSV cell, a number (a binary field, an EPC).
Raw = Literal["json", "text", "number"]
# A scale the message states once: (multiplier, divisor, None), or (1, 1, why it was refused).
Resolved = tuple[float, float, HubError | None]


class Message(msgspec.Struct, gc=False):
    """One payload as the interpreter reads it (a Struct: made in C, once per message).

    ``src`` and ``aux`` are the kind's (the parsed JSON; the CSV reader and its column positions; the binary
    records and header; the EPC values and frame); ``factors`` are the scales the message states once, as
    (multiplier, divisor, refusal), in the order the reading spec gave them slots.
    """

    src: Any
    aux: Any
    props: dict[str, str]
    limits: Limits
    horizon: int  # the latest measured_at the hub takes for this message
    factors: list[Resolved] = []
    last_local: int | None = None  # the last local time judged record by record (times.second_occurrence)


# The records of a message: their places (for messages: see Access.location) and the records, in order.
Records = tuple[Sequence[Any], list[Any]]
# Reads one value: the raw value, None when the payload does not have it. A getter of a message-level source
# (Access.message_level) takes the Message, any other the record: a record's getter can then be a C callable
# (operator.itemgetter of a binary field, dict.get of a JSON key through operator.methodcaller).
Getter = Callable[[Any], Any]


class Access(Protocol):
    """What differs between payload kinds."""

    raw: Raw

    def message_level(self, source: Source) -> bool:
        """True when the value is the same for every record of a message (read once)."""
        ...

    def getter(self, source: Source) -> Getter:
        """How ``source`` is read: from the Message if it is message-level, else from the record."""
        ...

    def records(self, message: Message) -> Records:
        """The records (a record that cannot be walked into is a HubError instead) and their places.

        Raises HubError(decode_error) for a payload whose records cannot be found at all.
        """
        ...

    def readable(self, records: list[Any]) -> bool:
        """True when every record can be read as it is (none is a HubError, each passes check_record)."""
        ...

    def check_record(self) -> Callable[[Any], None] | None:
        """What must hold of a record before it is read (raises HubError), or None when nothing must."""
        ...

    def location(self, message: Message, place: Any) -> str:
        """How messages name the record at ``place``: ``power.values[5]``, ``line 12``, ``records[3]``."""
        ...
