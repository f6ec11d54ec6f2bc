"""Extraction: the market system's conditions → rows from the time-indexed store, paged.

This is the raw cut (time range, DER ids, fields, paging). The cursor is the last (measured_at, der_id)
of a page, so the next page resumes exactly there even when new readings arrive between pages.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson

from hubd.config import QueryConfig
from hubd.model import FIELDS, ErrorCode, HubError, format_time, parse_time
from hubd.store import RawQuery

_KEYS = {
    "client_id",
    "password",
    "start",
    "end",
    "der_ids",
    "fields",
    "limit",
    "cursor",
    "reply_to",
    "request_id",
}


def encode_cursor(measured_at: int, der_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([measured_at, der_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise HubError(ErrorCode.BAD_REQUEST, "cursor is not one this hub issued") from None
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], int) or not isinstance(value[1], str):
        raise HubError(ErrorCode.BAD_REQUEST, "cursor is not one this hub issued")
    return value[0], value[1]


def parse_query(request: dict[str, Any], config: QueryConfig) -> RawQuery:
    """Validate extraction conditions; every problem is a ``bad_request`` naming the condition."""
    unknown = set(request) - _KEYS
    if unknown:
        raise HubError(ErrorCode.BAD_REQUEST, f"unknown condition {sorted(unknown)[0]!r}")
    for key in ("start", "end"):
        if key not in request:
            raise HubError(ErrorCode.BAD_REQUEST, f"{key} is required")
    start = parse_time(request["start"], "start")
    end = parse_time(request["end"], "end")
    if end <= start:
        raise HubError(ErrorCode.BAD_REQUEST, "end must be after start")
    der_ids = request.get("der_ids") or []
    if not isinstance(der_ids, list) or not all(isinstance(d, str) for d in der_ids):
        raise HubError(ErrorCode.BAD_REQUEST, "der_ids must be a list of DER ids")
    if len(der_ids) > config.max_der_ids:
        raise HubError(ErrorCode.BAD_REQUEST, f"at most {config.max_der_ids} der_ids per query")
    fields = request.get("fields") or list(FIELDS)
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise HubError(ErrorCode.BAD_REQUEST, "fields must be a list of field names")
    for name in fields:
        if name not in FIELDS:
            raise HubError(ErrorCode.BAD_REQUEST, f"unknown field {name!r}")
    limit = request.get("limit", config.default_limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise HubError(ErrorCode.BAD_REQUEST, "limit must be a positive integer")
    cursor = request.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise HubError(ErrorCode.BAD_REQUEST, "cursor must be a string from next_cursor")
    return RawQuery(
        start=start,
        end=end,
        limit=min(limit, config.max_limit),
        der_ids=tuple(dict.fromkeys(der_ids)),
        fields=tuple(dict.fromkeys(fields)),
        after=decode_cursor(cursor) if cursor else None,
    )


def run_raw(query: RawQuery, fetch: Callable[[RawQuery], list[dict[str, Any]]]) -> dict[str, Any]:
    """Fetch one page and shape the answer: UTC times, absent values left out, the next cursor."""
    rows = fetch(replace(query, limit=query.limit + 1))  # one more row tells whether a next page exists
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    shaped = []
    for row in rows:
        out: dict[str, Any] = {"der_id": row["der_id"], "measured_at": format_time(row["measured_at"])}
        for name in query.fields:
            if row[name] is not None:
                out[name] = row[name]
        shaped.append(out)
    next_cursor = None
    if more:
        last = rows[-1]
        next_cursor = encode_cursor(last["measured_at"], last["der_id"])
    return {"ok": True, "rows": shaped, "count": len(shaped), "next_cursor": next_cursor}
