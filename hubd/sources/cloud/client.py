"""The HTTP side of a cloud source: credentials, pages, the vendor's limits, and the cloud's clock.

One ``CloudClient`` per source (one vendor account). It asks for one window of one site at a time and yields
the pages of the answer; what went wrong falls into a few kinds the source acts on:

- ``Unreachable``: a timeout, a refused connection, a 5xx, a refused credential — an outage, retried with a
  growing, jittered wait;
- ``RateLimited``: a 429, with the wait its ``Retry-After`` asks for;
- ``QuotaExhausted``: the day's request budget is spent; nothing more is asked until the next UTC day;
- ``Malformed``: an answer that is no JSON; kept in quarantine with the request that produced it.

Secrets come from files and go only into the request itself: every URL the hub shows (logs, audit,
quarantine) has them replaced by ``***``.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from weakref import WeakKeyDictionary

import aiohttp
import orjson
from yarl import URL

from hubd.config import CloudSourceConfig, ConfigError, read_secret
from hubd.sources.cloud.profile import AuthSpec, Profile, RequestSpec, dig, fill, window_values, zone_of

MASK = "***"
MIN_MASKED = 8  # the shortest secret masked by its text (shorter ones: by the parameter that carries them)


class Unreachable(Exception):
    """The cloud did not answer usably (timeout, connection, 5xx, credentials refused)."""


class RateLimited(Exception):
    def __init__(self, wait_s: float, request: str) -> None:
        super().__init__(f"{request}: 429 Too Many Requests; waiting {wait_s:.1f} s as Retry-After asks")
        self.wait_s = wait_s


class QuotaExhausted(Exception):
    def __init__(self, budget: int, until_ms: int) -> None:
        super().__init__(f"the daily budget of {budget} requests is spent; resuming at the next UTC day")
        self.until_ms = until_ms


class Malformed(Exception):
    def __init__(self, reason: str, request: str, body: bytes, format_code: str = "") -> None:
        super().__init__(f"{request}: {reason}")
        self.reason = reason
        self.request = request
        self.body = body
        self.format_code = format_code  # the format it failed ("": the body was no JSON)


@dataclass(slots=True)
class Page:
    """One answer: its body, the request that produced it (secrets masked), when it arrived (epoch ms)."""

    body: bytes
    request: str
    received_at: int


_LIMITS: WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Semaphore]] = WeakKeyDictionary()


def _limit(profile: str, concurrency: int) -> asyncio.Semaphore:
    """The requests at once a profile allows, shared by its sources in this event loop (a semaphore belongs
    to one loop; the tests run hubs in several)."""
    limits = _LIMITS.setdefault(asyncio.get_running_loop(), {})
    if profile not in limits:
        limits[profile] = asyncio.Semaphore(concurrency)
    return limits[profile]


def read_secrets(config: CloudSourceConfig, profile: Profile) -> dict[str, str]:
    """The secrets the profile names, each read from its file; a missing one is named, never shown."""
    needed = (
        {a.secret for a in profile.auth} | {a.client_id for a in profile.auth} | {a.client_secret for a in profile.auth}
    )
    secrets: dict[str, str] = {}
    for name in sorted(n for n in needed if n):
        if name not in config.secrets:
            raise ConfigError(f"source {config.name}: secrets.{name}: the profile {config.profile} needs it (a file)")
        try:
            secrets[name] = read_secret(config.secrets[name]) or ""
        except OSError as exc:
            raise ConfigError(
                f"source {config.name}: secrets.{name}: cannot read {config.secrets[name]}: {exc.strerror}"
            ) from None
    return secrets


class CloudClient:
    """Asks one vendor account for windows of its sites, within the vendor's limits."""

    def __init__(
        self, config: CloudSourceConfig, profile: Profile, secrets: dict[str, str], budget: Any = None
    ) -> None:
        self.config = config
        self.profile = profile
        self.base_url = (config.base_url or profile.base_url).rstrip("/")
        self.zone = zone_of(config.zone or profile.zone, f"sources {config.name}: zone")
        self._secrets = secrets
        self._secret_params = tuple(a.name for a in profile.auth if a.kind == "query" and a.name)
        self._budget = budget  # CloudState, or None: no budget kept (hubd source test)
        self.daily_requests = config.daily_requests or profile.daily_requests
        self._concurrency = config.concurrency or profile.concurrency
        self._session: aiohttp.ClientSession | None = None
        self._token: tuple[str, float] | None = None  # OAuth2 access token, and when it expires (monotonic)
        self.requests = 0
        self.clock: tuple[float, float] | None = None  # the last (offset_s, rtt_s) from a Date header
        self.on_clock: Callable[[float, float], None] | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout, headers={"Accept": "application/json"})
        return self._session

    # -- one window ---------------------------------------------------------------------------------------

    async def window(self, spec: RequestSpec, site: str, start_ms: int, end_ms: int) -> AsyncIterator[Page]:
        """The pages of one site's window, in order; raises one of the module's exceptions."""
        values = window_values(self.profile, self.zone, site, start_ms, end_ms)
        url = self.base_url + fill(spec.path, values)
        query = {name: fill(value, values) for name, value in spec.query.items()}
        headers = {name: fill(value, values) for name, value in spec.headers.items()}
        paging = spec.paging
        page_no = paging.first
        next_url: str | None = None
        for _ in range(paging.max_pages):
            params = dict(query)
            if paging.kind == "page":
                assert paging.param is not None
                params[paging.param] = str(page_no)
                if paging.size_param and paging.size:
                    params[paging.size_param] = str(paging.size)
            page = await self._get(next_url or url, {} if next_url else params, headers)
            yield page.page
            if paging.kind == "none":
                return
            if paging.kind == "link":
                next_url = page.next_link
                if not next_url:
                    return
                continue
            body = page.json
            if paging.kind == "page":
                assert paging.items is not None
                items = dig(body, paging.items)
                count = len(items) if isinstance(items, list) else 0
                if count == 0 or (paging.size is not None and count < paging.size):
                    return
                page_no += 1
            else:  # cursor
                assert paging.next is not None and paging.param is not None
                cursor = dig(body, paging.next)
                if cursor in (None, ""):
                    return
                query[paging.param] = str(cursor)

    async def _get(self, url: str, params: dict[str, str], headers: dict[str, str], measure: bool = False) -> _Answer:
        for attempt in (1, 2):  # a second time only after an OAuth2 token was refused and renewed
            request_params, request_headers = dict(params), dict(headers)
            await self._authorise(request_params, request_headers)
            shown = _no_secrets(_shown(url, params), self._secrets, self._secret_params)
            self._spend()
            async with _limit(self.config.profile, self._concurrency):
                sent = time.time()
                try:
                    async with self._http().get(url, params=request_params, headers=request_headers) as response:
                        arrived = time.time()
                        if self.profile.clock is None:  # a time endpoint is more precise than Date
                            self._note_date(response.headers.get("Date"), sent, arrived)
                        body = await response.read()
                        status = response.status
                        retry_after = response.headers.get("Retry-After")
                        links: Any = response.links
                        next_link = links["next"].get("url") if "next" in links else None
                except TimeoutError:
                    raise Unreachable(f"{shown}: no answer within {self.config.timeout_s} s") from None
                except aiohttp.ClientError as exc:
                    raise Unreachable(
                        f"{shown}: {type(exc).__name__}: {_no_secrets(str(exc), self._secrets, self._secret_params)}"
                    ) from None
            self.requests += 1
            if status == 401 and attempt == 1 and self._token is not None:
                self._token = None
                continue
            if status == 429:
                raise RateLimited(_retry_after(retry_after, self.config.retry_min_s), shown)
            if status >= 500 or status in (401, 403, 408):
                raise Unreachable(f"{shown}: HTTP {status}")
            if status >= 400:
                raise Unreachable(f"{shown}: HTTP {status} (the request is refused; is the profile right?)")
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise Malformed(f"the answer is not JSON ({exc})", shown, body) from None
            found = _Answer(Page(body, shown, int(arrived * 1000)), parsed, str(next_link) if next_link else None)
            if measure:
                found.sent, found.arrived = sent, arrived
            return found
        raise Unreachable(f"{_shown(url, params)}: HTTP 401 after a new token")

    # -- the vendor's time endpoint ----------------------------------------------------------------------

    async def check_clock(self) -> tuple[float, float] | None:
        """The profile's time endpoint against the round trip's midpoint: (offset_s, rtt_s), or None when its
        answer holds no time. Raises like any request."""
        spec = self.profile.clock
        assert spec is not None
        params: dict[str, str] = {}
        headers: dict[str, str] = {}
        answer = await self._get(self.base_url + spec.path, params, headers, measure=True)
        stated = dig(answer.json, spec.field)
        try:
            if spec.time_format == "iso":
                at = datetime.fromisoformat(str(stated)).timestamp()
            else:
                at = float(stated) / (1000 if spec.time_format == "epoch_ms" else 1)
        except (TypeError, ValueError):
            return None
        assert answer.sent is not None and answer.arrived is not None
        offset = round(at - (answer.sent + answer.arrived) / 2, 3)
        rtt = round(answer.arrived - answer.sent, 3)
        self.clock = (offset, rtt)
        if self.on_clock is not None:
            self.on_clock(offset, rtt)
        return offset, rtt

    async def correct_clock(self, site: str) -> int:
        """Send the profile's correction request for a site; the HTTP status it got."""
        spec = self.profile.clock
        assert spec is not None and spec.correction is not None
        correction = spec.correction
        params: dict[str, str] = {}
        headers: dict[str, str] = {}
        await self._authorise(params, headers)
        self._spend()
        url = self.base_url + fill(correction.path, {"site": site})
        try:
            async with self._http().request(
                correction.method, url, params=params, headers=headers, json=correction.body
            ) as response:
                await response.read()
                self.requests += 1
                return response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unreachable(f"{correction.method} {url}: {type(exc).__name__}") from None

    # -- credentials --------------------------------------------------------------------------------------

    async def _authorise(self, params: dict[str, str], headers: dict[str, str]) -> None:
        for auth in self.profile.auth:
            if auth.kind == "query":
                assert auth.name and auth.secret
                params[auth.name] = self._secrets[auth.secret]
            elif auth.kind == "header":
                assert auth.name and auth.secret
                headers[auth.name] = auth.prefix + self._secrets[auth.secret]
            elif auth.kind == "bearer":
                assert auth.secret
                headers["Authorization"] = "Bearer " + self._secrets[auth.secret]
            else:
                headers["Authorization"] = "Bearer " + await self._oauth2(auth)

    async def _oauth2(self, auth: AuthSpec) -> str:
        """An access token from the client-credentials grant, asked again shortly before it expires."""
        if self._token is not None and time.monotonic() < self._token[1]:
            return self._token[0]
        assert auth.token_url and auth.client_id and auth.client_secret
        url = auth.token_url if "://" in auth.token_url else str(URL(self.base_url).origin()) + auth.token_url
        form = {"grant_type": "client_credentials"}
        if auth.scope:
            form["scope"] = auth.scope
        pair = f"{self._secrets[auth.client_id]}:{self._secrets[auth.client_secret]}".encode()
        basic = {"Authorization": "Basic " + base64.b64encode(pair).decode()}  # RFC 6749 2.3.1
        self._spend()
        try:
            async with self._http().post(url, data=form, headers=basic) as response:
                body = await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unreachable(f"POST {url}: {type(exc).__name__}") from None
        self.requests += 1
        if status != 200:
            raise Unreachable(f"POST {url}: HTTP {status}: the client credentials were not taken")
        try:
            answer = orjson.loads(body)
            token = str(answer["access_token"])
            lifetime = float(answer.get("expires_in", 3600))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise Unreachable(f"POST {url}: the token answer has no access_token") from None
        self._token = token, time.monotonic() + max(lifetime - 60, lifetime / 2)
        return token

    # -- limits and the clock -----------------------------------------------------------------------------

    def _spend(self) -> None:
        if self._budget is None or self.daily_requests is None:
            return
        today = datetime.now(UTC).date()
        if self._budget.used(self.config.name, today.isoformat()) >= self.daily_requests:
            midnight = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC)
            raise QuotaExhausted(self.daily_requests, int(midnight.timestamp() * 1000))
        self._budget.spend(self.config.name, today.isoformat())

    def _note_date(self, date: str | None, sent: float, arrived: float) -> None:
        """The cloud's clock from its ``Date`` header, against the midpoint of the round trip. ``Date`` has whole
        seconds, so the cloud's time was within the second after it: its middle, ``+ 0.5``, is the estimate."""
        if not date:
            return
        try:
            stated = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        offset, rtt = round(stated + 0.5 - (sent + arrived) / 2, 3), round(arrived - sent, 3)
        self.clock = (offset, rtt)
        if self.on_clock is not None:  # judged before this answer's readings are handed on, so they are flagged
            self.on_clock(offset, rtt)


@dataclass(slots=True)
class _Answer:
    page: Page
    json: Any
    next_link: str | None
    sent: float | None = None
    arrived: float | None = None


def _shown(url: str, params: dict[str, str]) -> str:
    """The request as the hub shows it: its URL and the (secret-free) parameters it was built with."""
    if not params:
        return f"GET {url}"
    return f"GET {url}?" + "&".join(f"{k}={v}" for k, v in params.items())


def _no_secrets(text: str, secrets: dict[str, str], params: tuple[str, ...] = ()) -> str:
    """``text`` with no secret in it: the query parameters that carry one masked by name (whatever the secret's
    length or encoding), and each secret of ``MIN_MASKED`` characters or more masked wherever it is. A shorter
    one is not looked for in the text: replacing every "k" would mangle the message and mask nothing."""
    for name in params:
        text = re.sub(rf"([?&]{re.escape(name)}=)[^&\s'\"<>]*", rf"\g<1>{MASK}", text)
    for secret in secrets.values():
        if len(secret) >= MIN_MASKED:
            text = text.replace(secret, MASK)
    return text


def _retry_after(value: str | None, default_s: float) -> float:
    """Retry-After as seconds or an HTTP date; the source's retry_min_s when absent or unreadable."""
    if not value:
        return default_s
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return default_s
