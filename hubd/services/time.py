"""``hub/v1/time``: the hub's clock, for an edge terminal to compare its own with (docs/protocol.md, Time)."""

from __future__ import annotations

from typing import Any

from hubd.audit import AuditLog
from hubd.model import format_time, now_ms
from hubd.services import Request


class TimeService:
    name = "time"

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    async def handle(self, request: Request) -> dict[str, Any]:
        self._audit.append("time.asked", requester=request.requester)
        return {
            "ok": True,
            "hub_time": format_time(now_ms()),
            # Not measured yet: the hub's own clock against NTP is the next step (docs/protocol.md says so).
            "ntp": {"synced": False, "offset_s": None, "server": None, "checked_at": None},
        }
