"""A cloud source's push endpoint: the vendor's cloud POSTs data to the hub instead of (or as well as) being
polled (docs/operations.md, Cloud sources, Push).

``POST /v1/push/<site id>`` on the source's own ``push.bind``, with ``Authorization: Bearer <token>`` (the
token in ``push.token_file``) and a body in the source's push format. The answer comes only after the store
committed the readings: ``200`` with ``{"ok": true, "accepted": n, "rejected": [...]}``; otherwise the protocol's
error answer ``{"ok": false, "error": {"code", "message"}}`` with the HTTP status that matches its code.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from loguru import logger

from hubd.audit import AuditLog
from hubd.config import CloudPushConfig, ConfigError
from hubd.model import ErrorCode, HubError, now_ms
from hubd.sources.cloud.client import Malformed, Page

if TYPE_CHECKING:
    from hubd.sources.cloud import CloudSource

STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.BAD_CREDENTIALS: 401,
    ErrorCode.NOT_ALLOWED: 403,
    ErrorCode.UNKNOWN_DER: 404,
    ErrorCode.ALREADY_REGISTERED: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNKNOWN_FORMAT: 415,
    ErrorCode.DECODE_ERROR: 422,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}
"""The HTTP status of each protocol error code."""


class PushListener:
    """The HTTP listener of one cloud source's pushes."""

    def __init__(self, source: CloudSource, config: CloudPushConfig, audit: AuditLog) -> None:
        self.source = source
        self.config = config
        self._audit = audit
        self.format = config.format or source.profile.formats[0]
        try:
            self._token = Path(config.token_file).read_text(encoding="utf-8").strip().encode()
        except OSError as exc:
            raise ConfigError(f"source {source.name}: push.token_file: cannot read it: {exc.strerror}") from None
        if not self._token:
            raise ConfigError(f"source {source.name}: push.token_file is empty")
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        # aiohttp refuses a larger body itself (413); one byte more, so that our own check answers first.
        app = web.Application(client_max_size=self.config.max_body_bytes + 1)
        app.router.add_post("/v1/push/{site}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, _, port = self.config.bind.rpartition(":")
        site = web.TCPSite(self._runner, host.strip("[]"), int(port))
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(f"source {self.source.name}: push.bind {self.config.bind}: {exc.strerror}") from None
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        logger.info("cloud {}: taking pushes on {}:{}", self.source.name, host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        site = request.match_info["site"]
        shown = f"POST {request.path}"
        try:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), b"Bearer " + self._token):
                self._audit.append("cloud.push_refused", "bad_credentials", source=self.source.name, site=site)
                self._audit.flush()
                raise HubError(ErrorCode.BAD_CREDENTIALS, "a push needs Authorization: Bearer <the source's token>")
            from hubd.sources.cloud import der_for

            der_id = der_for(self.source.config, site, request.query.get("role"))
            if der_id is None:
                raise HubError(ErrorCode.UNKNOWN_DER, f"site {site!r} is not configured for source {self.source.name}")
            if (request.content_length or 0) > self.config.max_body_bytes:
                raise self._too_large()
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise self._too_large() from None
            if len(body) > self.config.max_body_bytes:
                raise self._too_large()
            page = Page(body, shown, now_ms())
            try:
                readings = self.source.decode(page, self.format, der_id)
            except Malformed as exc:
                self.source._keep(exc)
                raise HubError(ErrorCode.DECODE_ERROR, exc.reason) from None
            if not readings:
                return _answer({"ok": True, "accepted": 0, "rejected": []})
            answer = await self.source.hand_on(readings, self.format, shown, page.received_at)
        except HubError as exc:
            return _answer({"ok": False, "error": exc.as_dict()}, STATUS.get(exc.code, 400))
        except Exception as exc:  # the store or pipeline failed: nothing committed, the cloud sends it again
            logger.warning("cloud {}: a push was not committed: {!r}", self.source.name, exc)
            error = HubError(ErrorCode.UNAVAILABLE, "the hub could not commit the readings; send them again")
            return _answer({"ok": False, "error": error.as_dict()}, 503)
        if not answer.get("ok"):
            code = ErrorCode(answer.get("error", {}).get("code", "unavailable"))
            return _answer(answer, STATUS.get(code, 503))
        return _answer(answer)

    def _too_large(self) -> HubError:
        return HubError(ErrorCode.TOO_LARGE, f"the body is larger than {self.config.max_body_bytes} bytes")


def _answer(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(body, status=status)
