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

What the operator hears of, audited once each: ``cloud.offline`` / ``cloud.online`` (an outage and its end),
``cloud.rate_limited`` (a 429; the wait its Retry-After asked), ``cloud.quota`` (the day's budget spent),
``data.quarantined`` (an answer that could not be decoded, kept with the request that produced it). The cloud's
clock, from each answer's ``Date`` header, goes to ``hubd.clock`` (``time.flagged`` beyond the tolerance).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any

import orjson
from loguru import logger

from hubd.audit import AuditLog
from hubd.clock.state import Clocks
from hubd.config import CloudSourceConfig, Config
from hubd.decode.registry import Limits, decoder_for
from hubd.model import ErrorCode, HubError, RawMessage, Reading, Sender, format_time, now_ms, parse_time
from hubd.sources import Health, Pipeline
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
from hubd.sources.cloud.profile import Profile, load_profile

Progress = Callable[[str, int, int, int], None]  # site, window start, window end, readings stored


_HELD_BACK = {"unknown_der", "not_allowed", "bad_credentials"}  # refusals that keep a window from counting


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
        self._online: bool | None = None
        self._reason = ""
        self._waiting: str | None = None  # rate_limited or quota, while the source waits for it
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
        """Collect, then wait ``poll_s``; an outage is retried after a growing, jittered wait."""
        delay = self.config.retry_min_s
        while not self._stopped.is_set():
            wait = self.config.poll_s
            try:
                await self.collect()
                self._came_online()
                self._waiting = None
                delay = self.config.retry_min_s
            except RateLimited as exc:
                self._wait_for("rate_limited", str(exc), wait_s=exc.wait_s)
                wait = exc.wait_s
            except QuotaExhausted as exc:
                self._wait_for("quota", str(exc), until=format_time(exc.until_ms))
                wait = max(1.0, (exc.until_ms - now_ms()) / 1000)
            except (Unreachable, Malformed, NotCommitted) as exc:
                if isinstance(exc, Malformed):
                    self._keep(exc)
                self._went_offline(str(exc))
                wait = delay * random.uniform(0.75, 1.25)
                delay = min(delay * 2, self.config.retry_max_s)
            finally:
                self._write_status()
            await self._sleep(wait)

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

    async def collect(self) -> int:
        """Every site up to now (less the profile's delay), from its cursor less the look-back."""
        self.polls += 1
        if self.profile.clock is not None:
            await self._check_clock()
        step = self.profile.interval_s * 1000
        until = (now_ms() - self.profile.delay_s * 1000) // step * step

        async def one(site: str) -> int:
            cursor = self.state.cursor(self.name, site)
            begin = self.first_start() if cursor is None else cursor - int(self.config.lookback_s * 1000)
            if self.config.start is not None:
                begin = max(begin, parse_time(self.config.start))
            return await self.collect_site(site, begin, until)

        # The sites side by side, as many requests at once as the profile allows (client.py); each site's
        # windows in order. A site that fails does not stop the others' windows in hand; the first failure
        # is then said.
        results = await asyncio.gather(*(one(site) for site in self.config.sites), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self.last_poll = now_ms()
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

    def _keep(self, exc: Malformed) -> None:
        """An answer that could not be decoded: kept in quarantine with the request (secrets masked)."""
        if self._pipeline is None:
            return
        raw = RawMessage(self.name, exc.format_code or self.profile.formats[0], exc.body, now_ms(), topic=exc.request)
        self._pipeline.keep(raw, HubError(ErrorCode.DECODE_ERROR, exc.reason))

    # -- what the operator hears of, once each ------------------------------------------------------------

    def _came_online(self) -> None:
        self._health = "up"
        if self._online is not True:
            if self._online is False:
                logger.info("cloud {}: answers again", self.name)
                self._audit.append("cloud.online", source=self.name)
                self._audit.flush()
            self._online = True

    def _went_offline(self, reason: str) -> None:
        self._health = "down"
        self._reason = reason
        if self._online is not False:
            self._online = False
            logger.warning("cloud {}: {}", self.name, reason)
            self._audit.append("cloud.offline", "error", source=self.name, reason=reason)
            self._audit.flush()

    def _wait_for(self, what: str, reason: str, **fields: Any) -> None:
        if self._waiting != what:
            logger.warning("cloud {}: {}", self.name, reason)
            self._audit.append(f"cloud.{what}", "error", source=self.name, reason=reason, **fields)
            self._audit.flush()
        self._waiting = what

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
            "polls": self.polls,
            "requests": self.client.requests,
            "readings_stored": self.stored,
            "last_poll": None if self.last_poll is None else format_time(self.last_poll),
            "cursors": {site: None if at is None else format_time(at) for site, at in cursors.items()},
            "written_at": format_time(now_ms()),
        }

    def _write_status(self) -> None:
        try:
            self._status_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._status_file.with_suffix(".tmp")
            temporary.write_bytes(orjson.dumps(self.status(), option=orjson.OPT_INDENT_2))
            temporary.replace(self._status_file)
        except OSError as exc:
            logger.warning("cloud {}: cannot write its status: {}", self.name, exc)
