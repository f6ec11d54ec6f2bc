"""The vendor-cloud source: the hub collects a maker's cloud Web API, window by window, with no gap and no
duplicate across restarts (docs/operations.md, Cloud sources).

One ``CloudSource`` per configured account. Each poll, for each site, it asks for the windows from the site's
persisted cursor (less ``lookback_s``, to take late data again) up to now less the profile's ``delay_s``, one
window at a time; a window's readings are handed to the pipeline and the cursor moves past the window only after
the store committed them. A kill at any moment therefore repeats at most one window (the idempotent store takes
it again without a duplicate) and never skips one.

The answer's bytes are decoded here, by the format the profile names, so that the readings carry this source as
their source (its clock flag, its provenance) and the DER its site maps to; the pipeline then authorises them
by sender (the configured DERs only) and stores them.

What the operator hears of, audited once each: ``cloud.offline`` / ``cloud.online`` (a site's outage and its
end), ``cloud.rate_limited`` (a 429 for a site; the wait its Retry-After asked), ``cloud.quota`` (the account's
day's budget spent), ``data.quarantined`` (an answer that could not be decoded, kept with the request that
produced it, once per outage of its site). Each site is judged and timed on its own (``SiteState``). The cloud's
clock, from each answer's ``Date`` header, goes to ``hubd.clock`` (``time.flagged`` beyond the tolerance).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from hubd.audit import AuditLog
from hubd.clock.state import Clocks
from hubd.config import CloudSourceConfig, Config
from hubd.decode.registry import Limits, decoder_for
from hubd.model import ErrorCode, HubError, RawMessage, Reading, Sender, format_time, now_ms, parse_time
from hubd.sources import Health, Pipeline, write_status
from hubd.sources.cloud.client import (
    CloudClient,
    Malformed,
    Page,
    QuotaExhausted,
    RateLimited,
    Unreachable,
    read_secrets,
)
from hubd.sources.cloud.cursor import CloudState
from hubd.sources.cloud.profile import Profile, check_zones, load_profile

Progress = Callable[[str, int, int, int], None]  # site, window start, window end, readings stored


_HELD_BACK = {"unknown_der", "not_allowed", "bad_credentials"}  # refusals that keep a window from counting


@dataclass(slots=True)
class SiteState:
    """One site's own health: its outage, its wait (backoff or Retry-After), the answers it kept meanwhile. Sites
    of one account fail alone (one site's 500 while another's 429), so each is judged, audited and timed apart."""

    delay: float  # the next backoff (retry_min_s, doubled at each failure up to retry_max_s)
    online: bool | None = None  # None: not asked yet
    reason: str = ""
    waiting: str | None = None  # "backoff" or "rate_limited" while the site waits
    due: float = 0.0  # when the site is asked next (time.time())
    kept: set[str] = field(default_factory=set)  # what this outage has kept in quarantine (request + body hashes)


class NotCommitted(Exception):
    """The store did not take a window's readings: the cursor stays, the window is asked for again."""


def ders_of(config: CloudSourceConfig) -> frozenset[str]:
    found: set[str] = set()
    for ders in config.sites.values():
        found.update(ders.values() if isinstance(ders, dict) else [ders])
    return frozenset(found)


def der_for(config: CloudSourceConfig, site: str, role: str | None) -> str | None:
    """The DER a site's readings of this role go to; None: the site has no DER for that role (not asked)."""
    ders = config.sites.get(site)
    if ders is None or isinstance(ders, str):
        return ders
    return ders.get(role or "")


def sender_of(config: CloudSourceConfig) -> Sender:
    return Sender("cloud", config.name, ders_of(config))


def build_sources(config: Config, audit: AuditLog, clocks: Clocks | None = None) -> list[CloudSource]:
    """The configured cloud sources; a missing profile or secret stops the hub, named (never shown)."""
    clouds = [s for s in config.sources if isinstance(s, CloudSourceConfig)]
    profiles = [load_profile(config, source.profile) for source in clouds]
    for source, profile in zip(clouds, profiles, strict=True):
        check_zones(config, source, profile)
    return [
        CloudSource(source, profile, audit, CloudState(config.registry_path), config, clocks)
        for source, profile in zip(clouds, profiles, strict=True)
    ]


class CloudSource:
    """Collects one vendor account's sites, window by window, and takes its pushes when configured."""

    kind = "cloud"

    def __init__(
        self,
        config: CloudSourceConfig,
        profile: Profile,
        audit: AuditLog,
        state: CloudState,
        hub: Config,
        clocks: Clocks | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.profile = profile
        self.sender = sender_of(config)
        self.state = state
        self._audit = audit
        self._clocks = clocks
        self._limits = hub.limits
        self._status_file = hub.data_path / "sources" / f"{config.name}.json"
        self.client = CloudClient(config, profile, read_secrets(config, profile), state)
        self.client.on_clock = self._judge_clock
        self._pipeline: Pipeline | None = None
        self._stopped = asyncio.Event()
        self._health: Health = "stopped"
        self._sites = {site: SiteState(config.retry_min_s) for site in config.sites}
        self._quota_until: int | None = None  # the day's budget is spent (for every site) until then, epoch ms
        self._push: Any = None
        self._corrected = False  # a correction was sent since the clock was last found off
        self.polls = 0
        self.stored = 0
        self.last_poll: int | None = None

    @property
    def health(self) -> Health:
        return self._health

    @property
    def last_success(self) -> int | None:
        return self.last_poll

    @property
    def _online(self) -> bool | None:
        """False while any site is in an outage; True once every site asked has answered; None before."""
        states = [state.online for state in self._sites.values()]
        if False in states:
            return False
        return True if True in states else None

    @property
    def _reason(self) -> str:
        return "; ".join(f"site {site}: {s.reason}" for site, s in self._sites.items() if s.online is False)

    @property
    def _waiting(self) -> str | None:
        """What the source waits for: the day's budget, or each waiting site's backoff or Retry-After."""
        if self._quota_until is not None:
            return f"quota until {format_time(self._quota_until)}"
        waits = [f"site {site}: {s.waiting} until {_at(s.due)}" for site, s in self._sites.items() if s.waiting]
        return "; ".join(waits) or None

    @property
    def last_error(self) -> str | None:
        return self._reason if self._online is False else self._waiting

    def attach(self, pipeline: Pipeline) -> None:
        """Hand readings to ``pipeline`` without starting the source (``hubd source backfill``)."""
        self._pipeline = pipeline

    async def start(self, pipeline: Pipeline) -> None:
        """Nothing asked of the cloud yet (an outage must not stop the hub); the push listener, when configured,
        is bound now, so a taken port stops the hub with one line."""
        self._pipeline = pipeline
        self._stopped.clear()
        self._health = "starting"
        if self.config.push is not None and self._push is None:
            from hubd.sources.cloud.push import PushListener

            self._push = PushListener(self, self.config.push, self._audit)
            await self._push.start()

    async def stop(self) -> None:
        self._stopped.set()
        if self._push is not None:
            await self._push.stop()
            self._push = None
        await self.client.close()
        self._health = "stopped"
        self._write_status()

    async def run(self) -> None:
        """Collect the sites that are due, then sleep until the next is: ``poll_s`` after a good collection,
        a growing, jittered backoff after an outage, Retry-After after a 429 (each site its own), the next UTC
        day when the day's budget is spent (the whole source)."""
        while not self._stopped.is_set():
            now = time.time()
            due = [site for site, state in self._sites.items() if state.due <= now]
            try:
                if due:
                    await self.collect(due)
                self._quota_until = None
            except QuotaExhausted as exc:
                if self._quota_until is None:
                    logger.warning("cloud {}: {}", self.name, exc)
                    until = format_time(exc.until_ms)
                    self._audit.append("cloud.quota", "error", source=self.name, reason=str(exc), until=until)
                    self._audit.flush()
                self._quota_until = exc.until_ms
            finally:
                self._health = "down" if self._online is False else "up"
                self._write_status()
            wake = min(state.due for state in self._sites.values())
            if self._quota_until is not None:
                wake = max(wake, self._quota_until / 1000)
            await self._sleep(max(0.01, wake - time.time()))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopped.wait()

    # -- collecting ---------------------------------------------------------------------------------------

    def first_start(self) -> int:
        """Where a site without a cursor begins: ``start``, else ``lookback_s`` before now."""
        if self.config.start is not None:
            return parse_time(self.config.start)
        return now_ms() - int(self.config.lookback_s * 1000)

    async def collect(self, sites: list[str] | None = None) -> int:
        """Each site (all, or ``sites``) up to now (less the profile's delay), from its cursor less the
        look-back; a site that fails is judged alone (its outage, its wait) and the others go on. Raises only
        QuotaExhausted (the budget is the account's) once every site in hand has been judged."""
        sites = list(self.config.sites) if sites is None else sites
        self.polls += 1
        if self.profile.clock is not None:
            try:
                await self._check_clock()
            except (Unreachable, Malformed, RateLimited) as exc:  # the account's answer: every site waits
                for site in sites:
                    self._failed(site, exc)
                return 0
        step = self.profile.interval_s * 1000
        until = (now_ms() - self.profile.delay_s * 1000) // step * step

        async def one(site: str) -> int:
            cursor = self.state.cursor(self.name, site)
            begin = self.first_start() if cursor is None else cursor - int(self.config.lookback_s * 1000)
            if self.config.start is not None:
                begin = max(begin, parse_time(self.config.start))
            return await self.collect_site(site, begin, until)

        # The sites side by side, as many requests at once as the profile allows (client.py); each site's
        # windows in order. A site that fails does not stop the others: each failure is the failing site's.
        results = await asyncio.gather(*(one(site) for site in sites), return_exceptions=True)
        quota: QuotaExhausted | None = None
        for site, result in zip(sites, results, strict=True):
            if isinstance(result, QuotaExhausted):
                quota = result  # the site is asked again when the budget allows; its health is unchanged
            elif isinstance(result, RateLimited | Unreachable | Malformed | NotCommitted):
                self._failed(site, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                self._answered(site)
        self.last_poll = now_ms()
        if quota is not None:
            raise quota
        return sum(r for r in results if isinstance(r, int))

    async def collect_site(
        self, site: str, begin: int, until: int, progress: Progress | None = None, advance: bool = True
    ) -> int:
        """The windows of one site from ``begin`` to ``until`` (aligned to the interval, never past what the
        vendor can have yet), the cursor moved past each once committed (``advance``; a backfill does not)."""
        step = self.profile.interval_s * 1000
        begin = begin // step * step
        until = min(until, (now_ms() - self.profile.delay_s * 1000) // step * step)
        stored = 0
        while begin < until and not self._stopped.is_set():
            end = min(begin + self.profile.window_s * 1000, until)
            taken = await self.collect_window(site, begin, end)
            if advance:
                self.state.advance(self.name, site, end)
            stored += taken
            if progress is not None:
                progress(site, begin, end, taken)
            begin = end
        self.stored += stored
        return stored

    async def collect_window(self, site: str, start_ms: int, end_ms: int) -> int:
        """One window of one site: every request of the profile, every page, each committed before the next."""
        stored = 0
        for spec in self.profile.requests:
            der_id = der_for(self.config, site, spec.role)
            if der_id is None:
                continue
            async for page in self.client.window(spec, site, start_ms, end_ms):
                stored += await self.take(page, spec.format, der_id)
        return stored

    async def take(self, page: Page, format_code: str, der_id: str) -> int:
        """Decode one answer for a DER and hand it on; returns the readings the store committed.
        An answer that cannot be decoded raises Malformed (the caller keeps it, with its request)."""
        readings = self.decode(page, format_code, der_id)
        if not readings:
            return 0
        answer = await self.hand_on(readings, format_code, page.request, page.received_at)
        if not answer.get("ok"):
            raise NotCommitted(f"the store did not take {page.request}: {answer.get('error')}")
        refused = [r for r in answer.get("rejected", ()) if r.get("error", {}).get("code") in _HELD_BACK]
        if refused:  # the operator can mend this (add the DER): the window waits, nothing is skipped
            error = refused[0]["error"]
            raise NotCommitted(f"{refused[0].get('der_id')}: refused {error['code']}: {error['message']}")
        return int(answer.get("accepted", 0))

    def decode(self, page: Page, format_code: str, der_id: str) -> list[Reading | HubError]:
        limits = Limits(
            page.received_at,
            int(self._limits.max_future_s * 1000),
            self._limits.max_readings_per_message,
            # The source writes its configured DERs without their passwords (auth by sender); a vendor format
            # that reads one from a user property gets a stand-in, dropped before anything is stored.
            {"der_id": der_id, "password": "-"},
            vouched=True,
        )
        try:
            return list(decoder_for(format_code)(page.body, limits).items)
        except HubError as exc:
            raise Malformed(exc.message, page.request, page.body, format_code) from None
        except Exception as exc:  # a decoder must never stop collection
            raise Malformed(f"the {format_code} decoder failed: {exc}", page.request, page.body, format_code) from None

    async def hand_on(
        self, readings: list[Reading | HubError], format_code: str, request: str, received_at: int
    ) -> dict[str, Any]:
        """Hand readings to the pipeline and wait for the store's commit; the answer (``ok``, ``accepted``)."""
        assert self._pipeline is not None
        raw = RawMessage(self.name, format_code, b"", received_at, topic=request, sender=self.sender)
        raw.readings = readings
        outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(result: Any) -> None:
            if not outcome.done():
                outcome.set_result(result)

        self._pipeline.submit(raw, settle)
        result = await outcome
        if isinstance(result, asyncio.CancelledError):
            raise result
        if isinstance(result, BaseException):
            raise NotCommitted(f"the pipeline failed on {request}: {result!r}")
        return dict(result[0])

    def _keep(self, exc: Malformed, site: str | None = None) -> None:
        """An answer that could not be decoded: kept in quarantine with the request (secrets masked), once per
        outage of its site: the same answer to the same request, at every retry, is kept the first time only
        (a push, without a site here, is kept each time)."""
        if self._pipeline is None:
            return
        if site is not None:
            seen = self._sites[site].kept
            digest = hashlib.sha256(exc.request.encode() + b"\0" + exc.body).hexdigest()
            if digest in seen:
                return
            seen.add(digest)
        raw = RawMessage(self.name, exc.format_code or self.profile.formats[0], exc.body, now_ms(), topic=exc.request)
        self._pipeline.keep(raw, HubError(ErrorCode.DECODE_ERROR, exc.reason))

    # -- what the operator hears of, once each ------------------------------------------------------------

    def _answered(self, site: str) -> None:
        """A good collection of the site: the end of its outage or wait (audited once), next after poll_s."""
        state = self._sites[site]
        if state.online is False:
            logger.info("cloud {} site {}: answers again", self.name, site)
            self._audit.append("cloud.online", source=self.name, site=site)
            self._audit.flush()
        state.online, state.reason, state.waiting = True, "", None
        state.delay, state.kept = self.config.retry_min_s, set()
        state.due = time.time() + self.config.poll_s

    def _failed(self, site: str, exc: Exception) -> None:
        """The site's failure: a 429 waits its Retry-After (``cloud.rate_limited`` once per episode); anything
        else is an outage (``cloud.offline`` once, the answer kept once) retried after a growing backoff."""
        state = self._sites[site]
        if isinstance(exc, RateLimited):
            if state.waiting != "rate_limited":
                logger.warning("cloud {} site {}: {}", self.name, site, exc)
                self._audit.append(
                    "cloud.rate_limited", "error", source=self.name, site=site, reason=str(exc), wait_s=exc.wait_s
                )
                self._audit.flush()
            state.waiting, state.due = "rate_limited", time.time() + exc.wait_s
            return
        if isinstance(exc, Malformed):
            self._keep(exc, site)
        if state.online is not False:
            logger.warning("cloud {} site {}: {}", self.name, site, exc)
            self._audit.append("cloud.offline", "error", source=self.name, site=site, reason=str(exc))
            self._audit.flush()
        state.online, state.reason, state.waiting = False, str(exc), "backoff"
        state.due = time.time() + state.delay * random.uniform(0.75, 1.25)
        state.delay = min(state.delay * 2, self.config.retry_max_s)

    async def _check_clock(self) -> None:
        """The vendor's time endpoint; beyond the tolerance, the profile's correction request (once per time
        the clock is found off), audited with the answer's status; the next poll's check says if it worked."""
        measured = await self.client.check_clock()
        spec = self.profile.clock
        if measured is None or spec is None or spec.correction is None or self._clocks is None:
            return
        off = abs(measured[0]) > self._clocks.config.edges.tolerance_s
        if off and not self._corrected:
            for site in self.config.sites:
                status = await self.client.correct_clock(site)
                self._audit.append(
                    "cloud.clock_corrected",
                    "ok" if status < 300 else "error",
                    source=self.name,
                    site=site,
                    offset_s=measured[0],
                    status=status,
                )
            self._audit.flush()
        self._corrected = off

    def _judge_clock(self, offset_s: float, rtt_s: float) -> None:
        """An answer's Date-header estimate, to the hub's clocks (flags, ``hubd time sources``)."""
        if self._clocks is not None:
            self._clocks.measured(self.name, offset_s, rtt_s)

    # -- status for `hubd source status` ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        cursors = {site: self.state.cursor(self.name, site) for site in self.config.sites}
        return {
            "name": self.name,
            "kind": self.kind,
            "profile": self.config.profile,
            "health": self._health,
            "online": self._online,
            "reason": self._reason if self._online is False else None,
            "waiting": self._waiting,
            "sites": {
                site: {
                    "online": state.online,
                    "reason": state.reason if state.online is False else None,
                    "waiting": f"{state.waiting} until {_at(state.due)}" if state.waiting else None,
                }
                for site, state in self._sites.items()
            },
            "polls": self.polls,
            "requests": self.client.requests,
            "readings_stored": self.stored,
            "last_poll": None if self.last_poll is None else format_time(self.last_poll),
            "cursors": {site: None if at is None else format_time(at) for site, at in cursors.items()},
            "written_at": format_time(now_ms()),
        }

    def _write_status(self) -> None:
        write_status(self._status_file, self.status(), self.kind, self.name)


def _at(epoch_s: float) -> str:
    return format_time(int(epoch_s * 1000))
