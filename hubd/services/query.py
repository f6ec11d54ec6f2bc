"""``hub/v1/query``: the market system extracts readings (conditions, buckets, 30-minute slots).

A consumer system proves its password; the conditions are parsed (``hubd.query.conditions``) and run on the
store's query side in a thread of its own, so a long settlement query never holds up incoming data.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any

from hubd.audit import AuditLog
from hubd.auth import Authenticator
from hubd.auth.registry import Der
from hubd.config import MarketConfig, QueryConfig
from hubd.market import groups as der_groups
from hubd.market import settle
from hubd.market.data import MarketData
from hubd.model import ErrorCode, HubError
from hubd.query.conditions import parse_query
from hubd.query.execute import run as run_query
from hubd.services import Request, refusal
from hubd.store import ReadingQuery


class QueryService:
    name = "query"

    def __init__(
        self,
        auth: Authenticator,
        config: QueryConfig,
        reader: ReadingQuery,
        thread: Executor,
        audit: AuditLog,
        market: tuple[MarketData, MarketConfig] | None = None,  # groups and the settlement view; used in ``thread``
    ) -> None:
        self._market = market
        self._auth = auth
        self._config = config
        self._reader = reader
        self._thread = thread
        self._audit = audit

    async def handle(self, request: Request) -> dict[str, Any]:
        audit, body = self._audit, request.body
        if body is None:
            assert request.error is not None
            error = request.error
            audit.append("query.received", error.code.value, requester=request.requester, reason=error.message)
            return refusal(error)
        client_id = body.get("client_id")
        client = client_id if isinstance(client_id, str) else None
        conditions = {k: v for k, v in body.items() if k not in ("password", "reply_to", "request_id")}
        try:
            audit.append("query.received", requester=request.requester, client_id=client, conditions=conditions)
        except (TypeError, ValueError):  # a password-like or unwritable condition: record the names only
            names = sorted(conditions)
            audit.append("query.received", requester=request.requester, client_id=client, condition_names=names)
        try:
            password = body.get("password")
            if client is None or not isinstance(password, str):
                raise HubError(ErrorCode.BAD_REQUEST, "client_id and password are required")
            self._auth.refresh()
            denied = await self._auth.check_system(client, password, "consumer")
            if denied:
                audit.append("query.auth", denied.code.value, client_id=client, reason=denied.message)
                raise denied
            audit.append("query.auth", client_id=client)
            ders = self._auth.ders
            answer = await asyncio.get_running_loop().run_in_executor(self._thread, self._extract, body, ders)
        except HubError as exc:
            audit.append("query.failed", exc.code.value, client_id=client, reason=exc.message)
            return refusal(exc)
        assert isinstance(answer, dict)
        rows = answer["rows"]
        warned = {"unknown_der_ids": answer["unknown_der_ids"]} if "unknown_der_ids" in answer else {}
        audit.append(
            "query.extracted",
            client_id=client,
            rows=answer["count"],
            der_count=len({r["der_id"] for r in rows if "der_id" in r}),
            **warned,
        )
        return answer

    def _extract(self, body: dict[str, Any], ders: dict[str, Der]) -> dict[str, Any]:
        """Run in the query thread: groups stand for their DERs; ``"view": "settlement"`` is hubd.market.settle."""
        market, config = self._market if self._market else (None, MarketConfig())
        groups = market.groups() if market else {}
        view = body.get("view")
        if view is not None:
            if view != "settlement" or market is None:
                raise HubError(ErrorCode.BAD_REQUEST, 'view must be "settlement" (or left out)')
            request = settle.parse(body, self._config, config, ders, groups)
            return settle.settle(request, self._reader, market, ders, config)
        return run_query(parse_query(der_groups.expand(body, groups), self._config, ders), self._reader)
