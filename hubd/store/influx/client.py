"""InfluxDB's v1 HTTP API: ``/write`` (line protocol) and ``/query`` (InfluxQL), with the credentials read
from files.

Two clients on purpose: the sink's is aiohttp on the event loop (its writes must not block the loop), the
query side's is the standard library's ``http.client`` in the query thread, where every ``ReadingQuery``
call is synchronous (hubd.store): an event loop in that thread would buy nothing. Neither ever puts a secret
in a message: errors carry the HTTP status and InfluxDB's own words.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import orjson

from hubd.config import InfluxConfig, read_secret


class InfluxUnavailable(Exception):
    """InfluxDB could not take the request now (down, slow, overloaded, or refusing the credentials): the
    same request may succeed later. ``status``: InfluxDB's HTTP status, when it answered one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InfluxRefused(Exception):
    """InfluxDB refused the data itself (HTTP 400 to a write: a field-type conflict, a bad value); with a
    partial write it stored the other points of the request."""


def headers(config: InfluxConfig) -> dict[str, str]:
    """The Authorization header: a token (2.x, 3.x) or the user's password (1.x), never in the URL."""
    token = read_secret(config.token_file)
    if token:
        return {"Authorization": f"Token {token}"}
    if config.username:
        password = read_secret(config.password_file) or ""
        basic = base64.b64encode(f"{config.username}:{password}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}
    return {}


def failure(exc: BaseException, timeout_s: float) -> str:
    """What went wrong, in words: a timeout says so (its own text is empty)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    return f"{type(exc).__name__}: {exc}"


def write_params(config: InfluxConfig) -> dict[str, str]:
    params = {"db": config.database, "precision": "ms"}
    if config.retention_policy:
        params["rp"] = config.retention_policy
    return params


def query_params(config: InfluxConfig, statement: str) -> dict[str, str]:
    params = {"db": config.database, "q": statement, "epoch": "ms"}
    if config.retention_policy:
        params["rp"] = config.retention_policy
    return params


def results(status: int, body: bytes, statement: str) -> list[dict[str, Any]]:
    """The series of a one-statement /query answer; raise what went wrong."""
    return results_many(status, body, [statement])[0]


def results_many(status: int, body: bytes, statements: list[str]) -> list[list[dict[str, Any]]]:
    """The series of each statement of a /query answer, in order; raise what went wrong."""
    if status >= 500 or status in (401, 403):
        raise InfluxUnavailable(f"InfluxDB answered {status} to a query: {body[:300].decode(errors='replace')}", status)
    try:
        answer = orjson.loads(body)  # the query side's answers run to megabytes: about twice json's pace
    except ValueError:
        raise InfluxUnavailable(f"InfluxDB answered {status} with no JSON to a query") from None
    if "error" in answer:
        raise RuntimeError(f"InfluxDB: {answer['error']}")
    out: list[list[dict[str, Any]]] = []
    for result, statement in zip(answer["results"], statements, strict=False):
        if "error" in result:
            raise RuntimeError(f"InfluxDB: {result['error']} (in {statement[:200]})")
        if result.get("partial"):  # the server's max-row-limit cut the answer; the hub never reads a part as all
            raise RuntimeError("InfluxDB cut the answer short (its [http] max-row-limit); raise the limit")
        out.append(list(result.get("series", [])))
    if len(out) != len(statements):
        raise RuntimeError(f"InfluxDB answered {len(out)} of {len(statements)} statements")
    return out


class AsyncInflux:
    """The sink's client: one aiohttp session, timeouts from the config."""

    def __init__(self, config: InfluxConfig) -> None:
        self.config = config
        self._base = config.url.rstrip("/")
        self._headers = headers(config)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def write(self, body: str) -> None:
        """POST line protocol. InfluxUnavailable: try again later; InfluxRefused: the data was refused."""
        timeout = aiohttp.ClientTimeout(total=self.config.write_timeout_s)
        try:
            async with self._open().post(
                f"{self._base}/write", params=write_params(self.config), data=body.encode(), timeout=timeout
            ) as answer:
                if answer.status == 204:
                    return
                text = (await answer.text())[:1000]
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise InfluxUnavailable(f"InfluxDB write failed: {failure(exc, self.config.write_timeout_s)}") from None
        with contextlib.suppress(ValueError):
            text = str(json.loads(text).get("error", text))
        if answer.status == 400:
            raise InfluxRefused(text)
        raise InfluxUnavailable(f"InfluxDB answered {answer.status} to a write: {text}")

    async def query(self, statement: str) -> list[dict[str, Any]]:
        return (await self.query_many([statement]))[0]

    async def query_many(self, statements: list[str]) -> list[list[dict[str, Any]]]:
        """Several statements in one request: the series of each, in order."""
        timeout = aiohttp.ClientTimeout(total=self.config.write_timeout_s)
        params = query_params(self.config, ";\n".join(statements))
        try:
            async with self._open().post(f"{self._base}/query", data=params, timeout=timeout) as answer:
                status, body = answer.status, await answer.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise InfluxUnavailable(f"InfluxDB query failed: {failure(exc, self.config.write_timeout_s)}") from None
        return results_many(status, body, statements)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class SyncInflux:
    """The query thread's client: one kept-alive connection, opened again after an error."""

    def __init__(self, config: InfluxConfig) -> None:
        self.config = config
        parts = urlsplit(config.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 8086)
        self._path = parts.path.rstrip("/")
        self._headers = {**headers(config), "Content-Type": "application/x-www-form-urlencoded"}
        self._conn: http.client.HTTPConnection | None = None

    def query(self, statement: str) -> list[dict[str, Any]]:
        return self.query_many([statement])[0]

    def query_many(self, statements: list[str]) -> list[list[dict[str, Any]]]:
        """Several statements in one request (``;`` between them): the series of each, in order."""
        body = urlencode(query_params(self.config, ";\n".join(statements)))
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile: once more on a new one
            conn = self._conn or self._connect()
            try:
                conn.request("POST", f"{self._path}/query", body=body, headers=self._headers)
                answer = conn.getresponse()
                status, data = answer.status, answer.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 2 or isinstance(exc, socket.timeout):
                    raise InfluxUnavailable(
                        f"InfluxDB query failed: {failure(exc, self.config.query_timeout_s)}"
                    ) from None
                continue
            return results_many(status, data, statements)
        raise AssertionError("unreachable")

    def _connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        self._conn = kind(self._host, self._port, timeout=self.config.query_timeout_s)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
