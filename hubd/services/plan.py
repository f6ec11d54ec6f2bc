"""``hub/v1/plan``: the market system uploads plans per DER or group per slot (kWh); a revision replaces.

A consumer or planner system proves its password; every entry is checked before any is stored (one bad entry
refuses the plan). What each entry replaced is written to the audit trail beside it, so every revision of a
plan can be read back from the trail.
"""

from __future__ import annotations

from typing import Any

from hubd.audit import AuditLog
from hubd.auth import Authenticator
from hubd.market import plans
from hubd.market.data import MarketData
from hubd.model import ErrorCode, HubError, format_time, now_ms
from hubd.query.buckets import zone
from hubd.services import Request, refusal

KEYS = {"client_id", "password", "tz", "plans", "reply_to", "request_id"}
ROLES = ("consumer", "planner")


class PlanService:
    name = "plan"

    def __init__(self, auth: Authenticator, market: MarketData, audit: AuditLog) -> None:
        self._auth = auth
        self._market = market
        self._audit = audit

    async def handle(self, request: Request) -> dict[str, Any]:
        audit, body = self._audit, request.body
        if body is None:
            assert request.error is not None
            error = request.error
            audit.append("plan.failed", error.code.value, requester=request.requester, reason=error.message)
            return refusal(error)
        client_id = body.get("client_id")
        client = client_id if isinstance(client_id, str) else None
        items = body.get("plans")
        count = len(items) if isinstance(items, list) else None
        audit.append("plan.received", requester=request.requester, client_id=client, entries=count)
        try:
            password = body.get("password")
            if client is None or not isinstance(password, str):
                raise HubError(ErrorCode.BAD_REQUEST, "client_id and password are required")
            self._auth.refresh()
            denied = await self._auth.check_system(client, password, ROLES)
            if denied:
                raise denied
            unknown = set(body) - KEYS
            if unknown:
                raise HubError(ErrorCode.BAD_REQUEST, f"unknown key {sorted(unknown)[0]!r}")
            tz = zone(body.get("tz", plans.DEFAULT_TZ))
            entries = plans.entries(items, tz, self._auth.ders, self._market.groups())
            replaced = self._market.store_plans(entries, client, now_ms())
        except HubError as exc:
            audit.append("plan.failed", exc.code.value, client_id=client, reason=exc.message)
            return refusal(exc)
        stored = store_audit(audit, entries, replaced, client_id=client)
        return {"ok": True, "stored": len(entries), "replaced": stored}


def store_audit(audit: AuditLog, entries: list[Any], replaced: list[float | None], **who: Any) -> int:
    """Audit a stored plan entry by entry: [target, slot start, kWh, the kWh it replaced or null]; the count
    of entries that replaced an earlier plan."""
    lines = [[e.target, format_time(e.slot_start), e.kwh, old] for e, old in zip(entries, replaced, strict=True)]
    revised = sum(old is not None for old in replaced)
    audit.append("plan.stored", **who, stored=len(entries), replaced=revised, entries=lines)
    return revised
