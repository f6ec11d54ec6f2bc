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
from hubd.config import QueryConfig
from hubd.model import ErrorCode, HubError
from hubd.query.conditions import parse_query
from hubd.query.execute import run as run_query
from hubd.services import Request, refusal
from hubd.store import ReadingQuery


class QueryService:
    name = "query"

    def __init__(
        self, auth: Authenticator, config: QueryConfig, reader: ReadingQuery, thread: Executor, audit: AuditLog
    ) -> None:
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
            query = parse_query(body, self._config, self._auth.ders)
            answer = await asyncio.get_running_loop().run_in_executor(self._thread, run_query, query, self._reader)
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
            der_count=len({r["der_id"] for r in rows}),
            **warned,
        )
        return answer
