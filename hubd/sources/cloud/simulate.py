"""A simulated vendor cloud speaking the SolarEdge-style site-power shape, for the demo and the tests.

``GET /site/<id>/power?startTime=&endTime=&api_key=`` answers the quarter hours between the two local times
(both included, as the vendor's API does) with ``{"power": {"timeUnit": "QUARTER_OF_AN_HOUR", "unit": "W",
"values": [{"date": "YYYY-MM-DD hh:mm:ss", "value": W}, ...]}}``, nothing later than its own now. The power is a
fixed function of the site and the time (``power_w``), so a test can say which value each interval must hold.

What a test needs of a real cloud's misbehaviour is a script of answers to give first (``script``, or
``site_script`` for one site's requests): an HTTP status (``500``, ``429`` with ``Retry-After``), ``"slow"`` (an
answer later than the client waits), ``"garbage"`` (a body that is no JSON), ``"wrong shape"`` (JSON its format
cannot read); and ``clock_offset_s`` sets its clock (the ``Date`` header, ``/time``) off the true time, until a
correction request (``/site/<id>/time/sync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

LOCAL = "%Y-%m-%d %H:%M:%S"
QUARTER_S = 900


def power_w(site: str, epoch_s: int) -> float:
    """The simulated mean power of a quarter hour: a day curve by UTC hour, scaled by the site id's digits."""
    scale = 1 + sum(map(ord, site)) % 7
    hour = (epoch_s % 86400) / 3600
    return round(100 * scale * (1.5 + math.sin(2 * math.pi * hour / 24)), 1)


class SimulatedCloud:
    """A SolarEdge-style monitoring API on a loopback port (``start`` in a running event loop)."""

    def __init__(
        self,
        sites: list[str],
        zone: str = "Asia/Tokyo",
        api_key: str = "demo-api-key",
        clock_offset_s: float = 0.0,
        slow_s: float = 2.0,
    ) -> None:
        self.sites = set(sites)
        self.zone = ZoneInfo(zone)
        self.api_key = api_key
        self.clock_offset_s = clock_offset_s
        self.slow_s = slow_s
        self.script: list[Any] = []  # answers to give first: 500, (429, retry_after_s), "slow", "garbage", ...
        self.site_script: dict[str, list[Any]] = {}  # the same, for one site's requests (before ``script``)
        self.requests: list[tuple[float, str]] = []  # (time.monotonic(), path and query without the key)
        self.delay_s = 0.0  # every answer waits this long (a test's "mid-collection")
        self.at_once = 0  # requests in hand now, and the most there ever were
        self.most_at_once = 0
        self.corrections: list[str] = []  # the sites a correction request named
        self.late: dict[tuple[str, int], float] = {}  # (site, epoch s) → a value corrected after the fact
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/site/{site}/power", self._power)
        app.router.add_get("/time", self._time)  # not SolarEdge's: for profiles with a time endpoint
        app.router.add_post("/site/{site}/time/sync", self._sync)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server: Any = getattr(site, "_server", None)
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def values(self, site: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """The quarter hours from ``start`` to ``end`` (aware datetimes, both included), up to now."""
        first = math.ceil(start.timestamp() / QUARTER_S) * QUARTER_S
        last = min(int(end.timestamp()), int(time.time()))
        return [
            {
                "date": datetime.fromtimestamp(at, UTC).astimezone(self.zone).strftime(LOCAL),
                "value": self.late.get((site, at), power_w(site, at)),
            }
            for at in range(first, last + 1, QUARTER_S)
        ]

    async def _time(self, request: web.Request) -> web.Response:
        """``{"serverTime": <epoch ms>}`` on the cloud's clock."""
        if request.query.get("api_key") != self.api_key:
            return web.json_response({"String": "Invalid token"}, status=403)
        return web.json_response({"serverTime": int((time.time() + self.clock_offset_s) * 1000)})

    async def _sync(self, request: web.Request) -> web.Response:
        """A correction request: the cloud's clock is set right."""
        if request.query.get("api_key") != self.api_key:
            return web.json_response({"String": "Invalid token"}, status=403)
        self.corrections.append(request.match_info["site"])
        self.clock_offset_s = 0.0
        return web.json_response({"ok": True})

    async def _power(self, request: web.Request) -> web.Response:
        query = {k: v for k, v in request.query.items() if k != "api_key"}
        self.requests.append((time.monotonic(), f"{request.path}?" + "&".join(f"{k}={v}" for k, v in query.items())))
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            return await self._answer(request)
        finally:
            self.at_once -= 1

    async def _answer(self, request: web.Request) -> web.Response:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        headers = {"Date": formatdate(time.time() + self.clock_offset_s, usegmt=True)}
        own = self.site_script.get(request.match_info["site"])
        if own or self.script:
            step = own.pop(0) if own else self.script.pop(0)
            if step == "slow":
                await asyncio.sleep(self.slow_s)
            elif step == "garbage":
                return web.Response(body=b"<html>Service maintenance</html>", headers=headers)
            elif step == "wrong shape":  # JSON, but not what the format reads
                return web.json_response({"siteEnergy": {"values": []}}, headers=headers)
            elif isinstance(step, tuple):
                headers["Retry-After"] = str(step[1])
                return web.json_response({"String": "Too many requests"}, status=step[0], headers=headers)
            else:
                return web.json_response({"String": "Internal error"}, status=int(step), headers=headers)
        if request.query.get("api_key") != self.api_key:
            return web.json_response({"String": "Invalid token"}, status=403, headers=headers)
        site = request.match_info["site"]
        if site not in self.sites:
            return web.json_response({"String": "Invalid site ID"}, status=403, headers=headers)
        try:
            start = datetime.strptime(request.query["startTime"], LOCAL).replace(tzinfo=self.zone)
            end = datetime.strptime(request.query["endTime"], LOCAL).replace(tzinfo=self.zone)
        except (KeyError, ValueError):
            return web.json_response({"String": "startTime and endTime are required"}, status=400, headers=headers)
        if end - start > timedelta(days=31):
            return web.json_response({"String": "the period may not exceed one month"}, status=403, headers=headers)
        body = {"power": {"timeUnit": "QUARTER_OF_AN_HOUR", "unit": "W", "values": self.values(site, start, end)}}
        return web.json_response(body, headers=headers)


class CloudThread:
    """A ``SimulatedCloud`` served from a thread of its own, for a hub running elsewhere (tests, the demo)."""

    def __init__(self, cloud: SimulatedCloud, port: int = 0) -> None:
        self.cloud = cloud
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hubd-simulated-cloud", daemon=True)

    def __enter__(self) -> SimulatedCloud:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.cloud.start(self._port), self._loop).result(10)
        return self.cloud

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.cloud.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def main(argv: list[str]) -> None:
    """``python -m hubd.sources.cloud.simulate PORT [API_KEY]``: sites 1001 and 1002 in Asia/Tokyo until Ctrl-C."""
    port = int(argv[1]) if len(argv) > 1 else 8480
    key = argv[2] if len(argv) > 2 else "demo-api-key"
    cloud = SimulatedCloud(["1001", "1002"], api_key=key)

    async def serve() -> None:
        await cloud.start(port)
        print(f"a SolarEdge-style cloud on {cloud.url}: sites 1001 and 1002, api_key {key}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main(sys.argv)
