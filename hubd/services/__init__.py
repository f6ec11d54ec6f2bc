"""Services: the hub's answers to requests (registration, extraction, time), one module each.

A service takes a ``Request`` and returns the answer's body; it audits what it decided. It knows nothing of
how the request came or how the answer goes back: the MQTT source routes ``<topic_prefix>/<name>`` to the
service called ``name``, publishes the answer on the requester's response topic and audits that it was sent.
A new service is a module here with a class that satisfies ``Service``, added to the list the wiring
(``hubd.app``) hands the MQTT source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from hubd.model import HubError


@dataclass(frozen=True, slots=True)
class Request:
    """One request: its JSON object, or (``body`` None) why the payload could not be read as one."""

    body: dict[str, Any] | None
    error: HubError | None
    requester: str | None  # where the answer goes, for the audit trail


class Service(Protocol):
    """Answers the requests on one topic."""

    name: str  # the topic under the hub's prefix: hub/v1/<name>

    async def handle(self, request: Request) -> dict[str, Any]: ...


@runtime_checkable
class Settled(Protocol):
    """A service whose answer counts only once delivered (a registration: its answer carries the new password).

    The MQTT source waits for the broker's PUBACK of the answer and calls ``settle`` with its verdict: None when
    the broker took it (reason code below 0x80), else why not (refused with a reason code, no reply address,
    no acknowledgement in time)."""

    async def settle(self, answer: dict[str, Any], topic: str | None, failure: str | None) -> None: ...


def refusal(error: HubError) -> dict[str, Any]:
    """The body of an answer that refuses a request (docs/protocol.md, Errors)."""
    return {"ok": False, "error": error.as_dict()}
