"""``hub/v1/time``: the hub's clock and how far it is from NTP time, for an edge terminal to compare its own
with (docs/protocol.md, Time). The measuring is ``hubd.clock``; this only answers."""

from __future__ import annotations

from typing import Any

from hubd.audit import AuditLog
from hubd.clock.state import Clocks
from hubd.model import format_time, now_ms
from hubd.services import Request


class TimeService:
    name = "time"

    def __init__(self, audit: AuditLog, clocks: Clocks) -> None:
        self._audit = audit
        self._clocks = clocks

    async def handle(self, request: Request) -> dict[str, Any]:
        self._audit.append("time.asked", requester=request.requester)
        return {"ok": True, "hub_time": format_time(now_ms()), "ntp": self._clocks.hub.public()}
