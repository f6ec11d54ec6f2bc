"""The operator's HTTP listener (``http.bind``, loopback by default) and ``Ops``, which runs it with the hub.

- ``GET /metrics``: Prometheus text format (``hubd.ops.metrics``);
- ``GET /healthz``: 200 while the event loop answers; ``GET /readyz``: 200 when ready, else 503, JSON detail;
- ``GET /``: the status page (``hubd.ops.page``) after ``/login`` (``hubd.ops.login``).

The page's SQL runs in a thread of its own, so a page over 100,000 DERs never holds up the event loop; the
fleet's aggregates are kept for ``_STATES_TTL_S``, and the energy of a slot as ``Fleet.energy`` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hubd.auth.emqx import EmqxHooks
from hubd.config import ConfigError
from hubd.model import HubError, format_time, now_ms
from hubd.ops import health
from hubd.ops.clocks import clocks
from hubd.ops.fleet import Fleet
from hubd.ops.login import COOKIE, Logins
from hubd.ops.metrics import hub_registry
from hubd.ops.notify import Notifier
from hubd.ops.page import View, login_page, status_page
from hubd.port_holder import describe_holder

if TYPE_CHECKING:
    from hubd.app import Hub

T = TypeVar("T")
PAGE_SIZE = 50
_STATES_TTL_S = 10.0
_ENERGY_BUDGET_S = 1.0  # a view reads slots for this long at most; the thread reads the rest after it, as long
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
}


class Ops:
    """systemd's notifications and the HTTP listener of one hub: started once the hub's parts are, stopped
    first when it drains."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._config = hub.config.http
        self.notifier = Notifier()
        self.url: str | None = None  # http://host:port/ once listening
        self._stopping = False
        self._watchdog: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubd-ops")
        self._fleet = Fleet(hub.config)
        self._quarantined = 0
        self._registry = hub_registry(hub, lambda: self._quarantined)
        self._logins = Logins(hub, self._config.session_hours)
        self._cache: dict[str, tuple[float, Any]] = {}
        self._filling: asyncio.Task[None] | None = None
        self._emqx = EmqxHooks(hub.config, hub.auth) if hub.config.broker.access_control == "emqx" else None

    async def start(self) -> None:
        """Listen on ``http.bind`` (a port taken is a configuration error naming its holder)."""
        address = self._config.address
        if address is not None:
            host, port = address
            sock = _bind(host, port)
            app = web.Application()
            app.add_routes(
                [
                    web.get("/metrics", self._metrics),
                    web.get("/healthz", self._healthz),
                    web.get("/readyz", self._readyz),
                    web.get("/login", self._login_form),
                    web.post("/login", self._login),
                    web.post("/logout", self._logout),
                    web.get("/", self._page),
                ]
            )
            if self._emqx is not None:  # broker.access_control emqx: EMQX's HTTP authn and authz hooks
                app.add_routes([web.post("/emqx/authn", self._emqx_authn), web.post("/emqx/authz", self._emqx_authz)])
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            bound = sock.getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            self.url = f"http://{shown}:{bound}/"
            logger.info("status page, metrics and health on {}", self.url)

    def ready(self) -> None:
        """READY=1, then the watchdog's pings from the event loop."""
        self.notifier.send("READY=1", f"STATUS={health.status_line(self._hub)}")
        self._watchdog = asyncio.create_task(
            self.notifier.watchdog(lambda: health.status_line(self._hub)), name="hubd-watchdog"
        )

    async def stop(self) -> None:
        """Say STOPPING=1, stop the watchdog's pings and the listener; safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        self.notifier.send("STOPPING=1", "STATUS=stopping: committing and answering the messages in hand")
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._runner is not None:
            await self._runner.cleanup()
        self._fleet.stop()  # a day's energy being read stops at the next slot
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filling
        await asyncio.get_running_loop().run_in_executor(self._thread, self._fleet.close)
        self._thread.shutdown()
        self.notifier.close()

    # -- EMQX's HTTP authenticator and authorizer (hubd.auth.emqx) ------------------------------------------

    async def _emqx_body(self, request: web.Request) -> dict[str, Any] | None:
        """The request's JSON object, or None when it lacks the shared secret or is not one."""
        assert self._emqx is not None
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not self._emqx.secret or not hmac.compare_digest(given.encode(), self._emqx.secret.encode()):
            return None
        try:
            body = await request.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    async def _emqx_authn(self, request: web.Request) -> web.Response:
        body = await self._emqx_body(request)
        if body is None:
            return web.json_response({"result": "deny"}, status=401)
        assert self._emqx is not None
        return web.json_response(await self._emqx.authn(body))

    async def _emqx_authz(self, request: web.Request) -> web.Response:
        body = await self._emqx_body(request)
        if body is None:
            return web.json_response({"result": "deny"}, status=401)
        assert self._emqx is not None
        return web.json_response(self._emqx.authz(body))

    # -- probes and metrics ---------------------------------------------------------------------------------

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"alive": True}, headers=_HEADERS)

    async def _readyz(self, _request: web.Request) -> web.Response:
        body = health.readiness(self._hub, self._stopping)
        body["url"] = self.url
        return web.json_response(body, status=200 if body["ready"] else 503, headers=_HEADERS)

    async def _metrics(self, _request: web.Request) -> web.Response:
        self._quarantined = (await self._in_thread(self._fleet.quarantine, 0))[0]
        return web.Response(
            body=generate_latest(self._registry), headers={**_HEADERS, "Content-Type": CONTENT_TYPE_LATEST}
        )

    # -- the page -------------------------------------------------------------------------------------------

    async def _login_form(self, _request: web.Request) -> web.Response:
        return _html(login_page())

    async def _login(self, request: web.Request) -> web.Response:
        form = await request.post()
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        try:
            token = await self._logins.login(name, password)
        except HubError as exc:
            return _html(login_page(f"not logged in: {exc.code.value}"), status=401)
        response = web.HTTPSeeOther("/", headers=_HEADERS)
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            path="/",
            max_age=int(self._config.session_hours * 3600),
        )
        raise response

    async def _logout(self, request: web.Request) -> web.Response:
        self._logins.logout(request.cookies.get(COOKIE))
        response = web.HTTPSeeOther("/login", headers=_HEADERS)
        response.del_cookie(COOKIE, path="/")
        raise response

    async def _page(self, request: web.Request) -> web.Response:
        user = self._logins.who(request.cookies.get(COOKIE))
        if user is None:
            raise web.HTTPSeeOther("/login", headers=_HEADERS)
        after = request.query.get("after", "")[:64]
        now = now_ms()
        day_start = datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
        day_end = (day_start + timedelta(days=1, hours=2)).replace(hour=0)  # a day of 23 or 25 hours too
        start_ms, end_ms = int(day_start.timestamp() * 1000), int(day_end.timestamp() * 1000)
        fleet = self._fleet
        states = await self._cached("states", _STATES_TTL_S, fleet.states, now)
        ders = await self._in_thread(fleet.ders, now, after, PAGE_SIZE)
        refusals = await self._cached("refusals", _STATES_TTL_S, fleet.refusals, now - 3600_000)
        total, quarantine = await self._in_thread(fleet.quarantine, 20)
        energy, pending = await self._in_thread(fleet.energy, start_ms, end_ms, now, _ENERGY_BUDGET_S)
        if pending and (self._filling is None or self._filling.done()):  # the rest of the day, after this answer
            self._filling = asyncio.create_task(self._fill(start_ms, end_ms), name="hubd-page-energy")
        ready = health.readiness(self._hub, self._stopping)["ready"]
        view = View(
            user=user,
            status=health.status_line(self._hub),
            ready=ready,
            states=states,
            ders=ders,
            after=after,
            page_size=PAGE_SIZE,
            now=now,
            sources=[_source(source) for source in self._hub.sources.sources],
            clocks=clocks(self._hub),
            refusals=refusals,
            quarantine_total=total,
            quarantine=quarantine,
            day_start=day_start,
            energy=energy,
            energy_pending=pending,
        )
        return _html(status_page(view))

    async def _fill(self, start_ms: int, end_ms: int) -> None:
        """Read the chart's slots left over, a budget at a time, so a scrape or a view waits for one at most."""
        pending = 1
        while pending and not self._stopping:
            _, pending = await self._in_thread(self._fleet.energy, start_ms, end_ms, now_ms(), _ENERGY_BUDGET_S)

    async def _in_thread(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)

    async def _cached(self, key: str, ttl_s: float, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in the page's thread, or its result from less than ``ttl_s`` ago."""
        kept = self._cache.get(key)
        if kept is not None and time.monotonic() - kept[0] < ttl_s:
            return kept[1]  # type: ignore[no-any-return]
        value = await self._in_thread(call, *args)
        self._cache[key] = (time.monotonic(), value)
        return value


def _source(source: Any) -> dict[str, Any]:
    """A source as the page lists it: its kind, name and state (``Source.health``), and when a source tells
    them, the time of its last success (``last_success``, ms) and its last error (``last_error``)."""
    last = getattr(source, "last_success", None)
    error = getattr(source, "last_error", None)
    return {
        "kind": source.kind,
        "name": source.name,
        "state": source.health,
        "last_success": format_time(last) if isinstance(last, int) else None,
        "error": str(error) if error else None,
    }


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            holder = describe_holder(port, host)
            raise ConfigError(f"http.bind: {host}:{port} is in use by {holder}; set http.bind to a free port") from None
        raise ConfigError(f"http.bind: cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.setblocking(False)
    return sock
