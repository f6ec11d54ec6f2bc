"""Weather fetched on a schedule (``market.weather``): one GET of an Open-Meteo-shaped URL per place, stored
as that place's weather series, replacing the hours it holds.

A failure is logged and audited once (``series.fetch_failed``), the recovery once (``series.fetched`` after
it); the URL is never written anywhere, since it may carry an API key.
"""

from __future__ import annotations

import asyncio

import aiohttp
from loguru import logger

from hubd.audit import AuditLog
from hubd.config import WeatherFetchConfig
from hubd.market import weather
from hubd.market.data import MarketData
from hubd.model import HubError, now_ms


class WeatherFetch:
    def __init__(self, config: WeatherFetchConfig, market: MarketData, audit: AuditLog) -> None:
        self._config = config
        self._market = market
        self._audit = audit
        self._failing = False

    async def once(self) -> int:
        """Fetch and store one answer; the number of values stored."""
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self._config.url) as response:
            response.raise_for_status()
            data = await response.read()
        points = weather.parse(data, self._config.place)
        return self._market.replace_series("weather", points, f"fetch:{self._config.place}", now_ms())

    async def run(self) -> None:
        place = self._config.place
        while True:
            try:
                stored = await self.once()
            except Exception as exc:  # a refused answer, the network, or the state file: said once, tried again
                reason = exc.message if isinstance(exc, HubError) else type(exc).__name__
                if not self._failing:
                    logger.warning("fetching the weather for {} failed: {}", place, reason)
                    self._audit.append("series.fetch_failed", "error", kind="weather", place=place, reason=reason)
                self._failing = True
            else:
                if self._failing:
                    logger.info("fetching the weather for {} works again", place)
                self._audit.append("series.fetched", kind="weather", place=place, values=stored)
                self._failing = False
            self._audit.flush()
            await asyncio.sleep(self._config.every_s)
