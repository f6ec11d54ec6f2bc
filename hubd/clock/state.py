"""What is known of each clock: the hub's own (against NTP) and every source's (checked, or seen passively).

``Clocks`` is the one place the other parts read: the data path asks it which flag a source's readings get
(a dictionary look-up for a source without a clock problem), ``hub/v1/time`` and the status page read the hub's
clock, ``hubd time status`` and ``hubd time sources`` read the copy it keeps in ``<data_dir>/clock.json``.
Everything here runs on the hub's event loop; ``snapshot()`` is the read-only view for everyone else.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from hubd.audit import AuditLog
from hubd.clock.skew import PassiveSkew
from hubd.config import TimeConfig
from hubd.model import format_time, now_ms

STATE_FILE = "clock.json"
Flag = Literal["check", "passive"]
SourceState = Literal["unchecked", "ok", "off", "unanswered", "refused", "not_checked"]


@dataclass(slots=True)
class HubClock:
    """The hub's clock against NTP: the last good measurement, and whether it can be trusted now."""

    servers: tuple[str, ...]
    offset_s: float | None = None  # NTP's time minus the hub's
    delay_s: float | None = None
    stratum: int | None = None
    server: str | None = None
    checked_at: int | None = None  # the last good measurement (ms)
    tried_at: int | None = None  # the last attempt, good or not (ms)
    error: str | None = None  # why the last attempt failed
    synced: bool = False
    reason: str | None = None  # why not synchronised

    def public(self) -> dict[str, Any]:
        """As ``hub/v1/time`` answers it (docs/protocol.md, Time)."""
        return {
            "synced": self.synced,
            "offset_s": self.offset_s,
            "delay_s": self.delay_s,
            "stratum": self.stratum,
            "server": self.server,
            "checked_at": _time(self.checked_at),
            "reason": self.reason,
        }


@dataclass(slots=True)
class SourceClock:
    """One source's clock: its last check, its passive estimate, and the flag its readings get."""

    source_id: str
    skew: PassiveSkew
    first_seen: int
    last_seen: int
    state: SourceState = "unchecked"
    offset_s: float | None = None  # the source's clock minus the hub's, from the last check answered
    rtt_s: float | None = None
    checked_at: int | None = None
    corrected_at: int | None = None
    corrections: int = 0
    check_flag: bool = False  # the last check found it off, and no check since found it right
    passive_flag: bool = False
    passive_offset_s: float | None = None
    due: float = 0.0  # time.monotonic() of its next check
    checkable: bool = True  # it sends over MQTT, where it can be asked (a polled device cannot)

    @property
    def flag(self) -> Flag | None:
        return "check" if self.check_flag else "passive" if self.passive_flag else None

    def public(self) -> dict[str, Any]:
        return {
            "source_id": self.source_id,
            "state": self.state,
            "flag": self.flag,
            "offset_s": self.offset_s,
            "rtt_s": self.rtt_s,
            "checked_at": _time(self.checked_at),
            "passive_offset_s": self.passive_offset_s,
            "corrected_at": _time(self.corrected_at),
            "corrections": self.corrections,
            "first_seen": _time(self.first_seen),
            "last_seen": _time(self.last_seen),
        }


class Clocks:
    """The hub's clock and its sources' clocks, and the flags the data path puts on readings."""

    def __init__(self, config: TimeConfig, audit: AuditLog, data_path: Path | None = None) -> None:
        self.config = config
        self._audit = audit
        self.hub = HubClock(tuple(config.ntp.servers))
        if not config.ntp.servers:
            self.hub.reason = "no NTP server configured (time.ntp.servers)"
        self.sources: dict[str, SourceClock] = {}
        # Source → (flag, offset in s): the only thing the data path reads per message.
        self.flags: dict[str, tuple[Flag, float]] = {}
        self._tolerance_ms = int(config.edges.tolerance_s * 1000)
        self._window_ms = int(config.edges.passive_window_s * 1000)
        self._file = data_path / STATE_FILE if data_path is not None else None
        self._written = 0.0
        self.dirty = True
        self._saved_synced: bool | None = None
        self._started = now_ms()
        self._alarmed = False

    # -- the data path ------------------------------------------------------------------------------------

    def observe(
        self, source_id: str, received_at: int, newest_measured_at: int, checkable: bool = True
    ) -> tuple[Flag, float] | None:
        """One message's evidence (when it arrived, its latest measurement time); the flag for its readings.
        ``checkable``: the source sent it over MQTT, where its clock can be checked.

        The usual case costs a look-up and two comparisons; only a message from the future beyond the
        tolerance, or a source already flagged passively, is looked at more closely.
        """
        source = self.sources.get(source_id)
        if source is None:
            source = self.sources[source_id] = SourceClock(
                source_id, PassiveSkew(self._window_ms), received_at, received_at, checkable=checkable
            )
            if not checkable:
                source.state = "not_checked"
            self.dirty = True
        source.last_seen = received_at
        source.skew.add(received_at, newest_measured_at)
        if newest_measured_at - received_at > self._tolerance_ms or source.passive_flag:
            self._judge_passive(source, received_at)
            return self.flags.get(source_id)
        return self.flags.get(source_id) if self.flags else None

    def _judge_passive(self, source: SourceClock, now: int) -> None:
        ahead = source.skew.offset_ms(now)
        source.passive_offset_s = None if ahead is None else ahead / 1000
        flagged = ahead is not None and ahead > self._tolerance_ms
        if flagged != source.passive_flag:
            source.passive_flag = flagged
            self._audit.append(
                "time.flagged" if flagged else "time.unflagged",
                "passive",
                source_id=source.source_id,
                offset_s=source.passive_offset_s,
            )
            self._audit.flush()
        self._update_flag(source)

    def _update_flag(self, source: SourceClock) -> None:
        flag = source.flag
        if flag is None:
            self.flags.pop(source.source_id, None)
        else:
            offset = source.offset_s if flag == "check" else source.passive_offset_s
            self.flags[source.source_id] = (flag, round(offset or 0.0, 3))
        self.dirty = True

    # -- checks (hubd.clock.edges) ------------------------------------------------------------------------

    def checked(self, source: SourceClock, offset_s: float | None, rtt_s: float | None, state: SourceState) -> None:
        """A check's outcome: the offset it found (None: no answer), and the state it leaves the source in."""
        source.state = state
        if offset_s is not None:
            source.offset_s, source.rtt_s, source.checked_at = offset_s, rtt_s, now_ms()
            off = abs(offset_s) > self.config.edges.tolerance_s
            if off != source.check_flag:
                source.check_flag = off
                self._audit.append(
                    "time.flagged" if off else "time.unflagged", "check", source_id=source.source_id, offset_s=offset_s
                )
            if not off:  # a clock found right: what the data said before (a fast clock since corrected) is old
                source.skew.forget()
                if source.passive_flag:
                    source.passive_flag, source.passive_offset_s = False, None
                    self._audit.append("time.unflagged", "passive", source_id=source.source_id, offset_s=None)
        self._update_flag(source)

    def measured(self, source_id: str, offset_s: float, rtt_s: float) -> None:
        """A polled source measured its peer's clock itself (a vendor cloud's ``Date`` header): judged like a
        check, so its readings are flagged when it is beyond the tolerance, and shown by ``hubd time sources``."""
        source = self.sources.get(source_id)
        if source is None:
            now = now_ms()
            source = self.sources[source_id] = SourceClock(
                source_id, PassiveSkew(self._window_ms), now, now, checkable=False
            )
        off = abs(offset_s) > self.config.edges.tolerance_s
        self.checked(source, offset_s, rtt_s, "off" if off else "ok")
        self.save()

    def corrected(self, source: SourceClock) -> None:
        source.corrections += 1
        source.corrected_at = now_ms()
        self.dirty = True

    # -- the hub's clock (hubd.clock.ntp) -----------------------------------------------------------------

    def hub_measured(self, server: str, offset_s: float, delay_s: float, stratum: int) -> None:
        hub = self.hub
        hub.tried_at = hub.checked_at = now_ms()
        hub.offset_s, hub.delay_s, hub.stratum, hub.server, hub.error = offset_s, delay_s, stratum, server, None
        self.judge_hub()

    def hub_failed(self, error: str) -> None:
        self.hub.tried_at = now_ms()
        self.hub.error = error
        self.judge_hub()

    def judge_hub(self) -> None:
        """Synchronised or not, from the last good measurement. Losing it is an alarm (audited once, when the
        hub has had its chance: a first answer, or ``max_age_s`` since it started); regaining it is audited."""
        hub, ntp = self.hub, self.config.ntp
        if not hub.servers:
            return
        now = now_ms()
        reason = None
        if hub.checked_at is None or now - hub.checked_at > ntp.max_age_s * 1000:
            last = f"since {format_time(hub.checked_at)}" if hub.checked_at else "since the hub started"
            reason = f"no answer from an NTP server {last}" + (f" ({hub.error})" if hub.error else "")
        elif hub.offset_s is not None and abs(hub.offset_s) > ntp.tolerance_s:
            reason = f"the hub's clock is {-hub.offset_s:+.3f} s off NTP time (tolerance {ntp.tolerance_s} s)"
        if reason is None:
            if not hub.synced:
                self._audit.append("time.synced", server=hub.server, offset_s=hub.offset_s, stratum=hub.stratum)
                self._audit.flush()
            self._alarmed = False
        elif not self._alarmed and (hub.checked_at is not None or now - self._started > ntp.max_age_s * 1000):
            self._audit.append("time.alarm", "error", reason=reason, offset_s=hub.offset_s, server=hub.server)
            self._audit.flush()
            self._alarmed = True
        hub.synced, hub.reason = reason is None, reason
        self.dirty = True

    # -- for everyone else --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """A read-only copy of everything known: the hub's clock and each source's, JSON-ready."""
        now = now_ms()
        return {
            "at": format_time(now),
            "hub": self.hub.public() | {"servers": list(self.hub.servers), "error": self.hub.error},
            "tolerance_s": self.config.edges.tolerance_s,
            "sources": [self.sources[s].public() for s in sorted(self.sources)],
        }

    def save(self, force: bool = False) -> None:
        """Write the snapshot to ``<data_dir>/clock.json`` (at most once a second) for ``hubd time``."""
        if self._file is None or not (self.dirty or force):
            return
        moment = time.monotonic()
        if not force and moment - self._written < 1.0 and self.hub.synced == self._saved_synced:
            return  # a change of synchronisation is written at once: hubd time status is what monitoring reads
        self._written, self.dirty, self._saved_synced = moment, False, self.hub.synced
        temporary = self._file.with_suffix(".tmp")
        with contextlib.suppress(OSError):  # a full disk must not stop the clocks; the next save tries again
            temporary.write_bytes(orjson.dumps(self.snapshot(), option=orjson.OPT_INDENT_2))
            os.replace(temporary, self._file)


def load_snapshot(data_path: Path) -> dict[str, Any] | None:
    """What the running (or last) hub wrote of its clocks, or None when it never did."""
    try:
        return dict(orjson.loads((data_path / STATE_FILE).read_bytes()))
    except (OSError, orjson.JSONDecodeError):
        return None


def _time(epoch_ms: int | None) -> str | None:
    return None if epoch_ms is None else format_time(epoch_ms)
