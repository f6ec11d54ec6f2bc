"""The write side of ``store.backend: influxdb``: batches to ``/write``, or to the spool while it cannot.

While InfluxDB takes writes, a batch is acknowledged once InfluxDB answered 204. When a write fails or times
out, that batch and every later one go to the spool (hubd.store.influx.spool) and are acknowledged from
there; a replay task writes them to InfluxDB in order, and once the spool is empty batches go straight to
InfluxDB again. Past ``spool_max_readings`` a batch waits for the replay before it is taken, so the batch
writer's queue fills and the broker keeps the messages: intake slows, nothing is dropped. Readings InfluxDB
refuses for their data (a field-type conflict, a value it cannot hold) are found by halving the request
and quarantined one by one with InfluxDB's message; the rest of the batch is stored. After a batch, the
summaries of the 30-minute slots it closed or changed are written (hubd.store.influx.slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from loguru import logger

from hubd.audit import AuditLog
from hubd.config import Config, ConfigError
from hubd.model import MIN_TIME_MS
from hubd.quarantine import Quarantine
from hubd.store import Rows
from hubd.store.influx import slots, versions
from hubd.store.influx.client import AsyncInflux, InfluxRefused, InfluxUnavailable
from hubd.store.influx.lines import Point, line, lines
from hubd.store.influx.pushdown import der_condition, ns, quote_name
from hubd.store.influx.spool import Spool

QUARANTINE_TOPIC = "store/influxdb"  # the "topic" of a quarantined reading InfluxDB refused
T = TypeVar("T")
_NEVER = -(2**63)  # the latest stored time of a DER with none
# /write requests of one batch in flight at once: its points have unique keys, so their order does not matter,
# and InfluxDB takes the next request while the hub reads the answer to the last (bench/README.md).
_REQUESTS = 2
Lines = list[tuple[str, Point]]  # one request's lines, each with its point (to quarantine it if refused)
Prepared = tuple[dict[tuple[str, int], Point], list[Lines] | None]  # a batch's points and, if all were fine, lines


def _raise_first(done: set[asyncio.Future[None]]) -> None:
    """Raise what the first of these finished requests raised (each one's error is taken, none left unread)."""
    errors = [task.exception() for task in done]
    for error in errors:
        if error is not None:
            raise error


def spool_path(config: Config) -> Path:
    path = config.store.influxdb.spool_path
    return Path(path) if path else config.data_path / "influx-spool.sqlite3"


class InfluxSink:
    """``ReadingSink`` for InfluxDB, with the durable spool."""

    def __init__(self, config: Config, audit: AuditLog | None = None) -> None:
        self._config = config.store.influxdb
        self._client = AsyncInflux(self._config)
        self._from = quote_name(self._config.measurement)
        self._spool_path = spool_path(config)
        self._registry_path = config.registry_path
        self._quarantine_bytes = config.limits.quarantine_max_bytes
        self._audit = audit
        self._spool: Spool | None = None
        self._quarantine: Quarantine | None = None
        self._lock = asyncio.Lock()  # batches are decided and written one at a time, in call order
        self._spooled = 0  # readings in the spool
        self._replay: asyncio.Task[None] | None = None
        self._draining = False  # a replay runs: batches go to the spool, behind what it holds
        # The spool's one thread: appends, replays and state changes are each one SQLite call, in order.
        self._spool_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubd-influx-spool")
        self._progress = asyncio.Event()  # set each time the replay empties a batch from the spool
        self.refused = 0  # readings quarantined because InfluxDB refused them
        self._no_delete = False  # InfluxDB refused a DELETE once (warned once)
        self._newest: dict[str, int] | None = None  # each DER's latest stored time (_latest)
        self._stored_slots = slots.Stored(self._config)
        self._slots_ready = False  # complete_from recorded, pending summaries made (_prepare_slots)
        self._refused_keys: set[tuple[str, int]] = set()  # readings of the batch in hand InfluxDB did not take
        self.oldest_at: int | None = None  # when the spool's oldest batch was spooled (ms), for /metrics
        self.replayed = 0  # readings replayed from the spool since start, for /metrics

    @classmethod
    def from_config(cls, config: Config, audit: AuditLog | None = None) -> InfluxSink:
        return cls(config, audit)

    async def start(self) -> None:
        """Open the spool; check the database exists if InfluxDB answers (if not, batches spool until it
        does); replay what a previous run left in the spool."""
        self._spool = spool = await self._in_spool(Spool, self._spool_path)
        self._quarantine = Quarantine(self._registry_path, self._quarantine_bytes)
        await self._in_spool(spool.requeue_held)  # a batch replacing stored readings cut short: replayed
        _, self._spooled, self.oldest_at = await self._in_spool(spool.depth)
        try:  # a statement a user with only READ on the database may run (SHOW DATABASES needs admin)
            policies = await self._client.query(f"SHOW RETENTION POLICIES ON {quote_name(self._config.database)}")
            self._check_policy(policies)
            await self._prepare_slots(await self._latest())
        except InfluxUnavailable as exc:
            if exc.status in (401, 403):  # at start a refusal is the configuration, not a passing state
                await self._release()
                raise ConfigError(
                    f"{exc}: give store.influxdb.username (or token_file) read and write on the database "
                    "(docs/operations.md, InfluxDB)"
                ) from None
            logger.warning("InfluxDB does not answer ({}); readings are spooled until it does", exc)
        except ConfigError:
            await self._release()
            raise
        except RuntimeError as exc:
            await self._release()
            if "database not found" in str(exc):
                raise ConfigError(
                    f"InfluxDB has no database {self._config.database!r} (store.influxdb.database): create it "
                    "(docs/operations.md, InfluxDB)"
                ) from None
            raise
        if self._spooled:
            self._audit_event("store.spooling", "error", reason="readings left in the spool at start")
            self._ensure_replay()

    def _check_policy(self, policies: list[dict[str, Any]]) -> None:
        wanted = self._config.retention_policy
        names = {row[0] for series in policies for row in series.get("values", [])}
        if wanted and wanted not in names:
            raise ConfigError(
                f"InfluxDB database {self._config.database!r} has no retention policy {wanted!r} "
                f"(store.influxdb.retention_policy); it has: {', '.join(sorted(names)) or 'none'}"
            )

    async def write_rows(self, rows: Rows, stored_at: int) -> None:
        count = sum(len(run) for _, run in rows)
        # The batch's points and lines are made while the batch before is written (the lock is still taken in
        # call order, so batches are decided and written in order); nothing here looks at InfluxDB.
        prepared = None if self._spooled or self._draining else asyncio.ensure_future(self._prepare(rows))
        try:
            await self._write_batch(rows, count, prepared)
        finally:
            if prepared is not None and not prepared.done():
                prepared.cancel()

    async def _write_batch(self, rows: Rows, count: int, prepared: asyncio.Future[Prepared] | None) -> None:
        async with self._lock:
            if not self._spooled and not self._draining:
                try:
                    await self.deliver(rows, None if prepared is None else await prepared, hold=count)
                    return
                except (InfluxUnavailable, RuntimeError) as exc:  # whatever it was, the spool keeps the batch
                    logger.warning("InfluxDB write failed, spooling: {}", exc)
                    await self._set_mode("spooling", str(exc))
                    self._audit_event("store.spooling", "error", readings=count, reason=str(exc))
            while self._spooled >= self._config.spool_max_readings:  # back-pressure, never a drop
                self._progress.clear()
                self._ensure_replay()
                await self._progress.wait()
            assert self._spool is not None
            spooled_at = await self._in_spool(self._spool.append, rows, count)
            if self.oldest_at is None:
                self.oldest_at = spooled_at
            self._spooled += count
            self._ensure_replay()

    @property
    def spooled(self) -> int:
        """Readings in the spool, waiting for InfluxDB."""
        return self._spooled

    async def _in_spool(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._spool_thread, call, *args)

    def _ensure_replay(self) -> None:
        if not self._draining:
            self._draining = True
            self._replay = asyncio.create_task(self._replay_spool(), name="hubd-influx-replay")

    async def _replay_spool(self) -> None:
        """Write the spooled batches in order, pausing (doubling to 30 s) while InfluxDB cannot take them."""
        assert self._spool is not None
        spool = self._spool
        pause = self._config.retry_s
        replayed, started = 0, time.monotonic()
        while True:
            head = await self._in_spool(spool.head)
            if head is None:
                if self._spooled:  # appended while the spool was read: go on
                    continue
                self._draining = False  # from here on batches go straight to InfluxDB
                break
            batch_id, rows, count = head
            began = time.monotonic()
            try:
                await self.deliver(rows)
            except (InfluxUnavailable, RuntimeError) as exc:  # never dropped: tried again, ever more slowly
                log = logger.debug if isinstance(exc, InfluxUnavailable) else logger.error
                log("replay waits {} s: {}", pause, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)
                continue
            pause = self._config.retry_s
            await self._in_spool(spool.remove, batch_id, count, time.monotonic() - began)
            self.oldest_at = await self._in_spool(spool.oldest)
            self._spooled -= count
            replayed += count
            self.replayed += count
            self._progress.set()
        await self._set_mode("direct", None)
        seconds = round(time.monotonic() - started, 3)
        self._audit_event("store.replayed", readings=replayed, seconds=seconds)
        logger.info("InfluxDB took the spool back: {} readings replayed in {} s", replayed, seconds)

    async def _set_mode(self, mode: str, reason: str | None) -> None:
        assert self._spool is not None
        since = int(time.time() * 1000)
        await self._in_spool(lambda: self._spool.set_state(mode=mode, since=since, reason=reason))  # type: ignore[union-attr]

    async def _prepare(self, rows: Rows) -> Prepared:
        """The newest version of each of the batch's readings, and its requests' lines (None if a point needs
        ``_lines``' care); pauses between requests' lines so the batch before keeps its requests going."""
        points = versions.newest(rows)
        every, size = list(points.values()), self._config.batch_size
        requests: list[Lines] = []
        for at in range(0, len(every), size):
            await asyncio.sleep(0)
            texts = lines(self._config.measurement, every[at : at + size])
            if texts is None:
                return points, None
            requests.append(list(zip(texts, every[at : at + size], strict=True)))
        return points, requests

    async def deliver(self, rows: Rows, prepared: Prepared | None = None, hold: int = 0) -> None:
        """Write one batch by the replace rule (hubd.store.influx.versions), ``prepared`` by ``_prepare`` or not.
        Raises InfluxUnavailable when InfluxDB could not take it (then nothing is lost by writing it all again:
        each point is idempotent). ``hold``: the batch's readings, when nothing else keeps it (not the replay
        from the spool, not a copy from SQLite): a batch that deletes stored points is held in the spool's
        file until it is written, so a crash between a delete and the write loses no reading."""
        points, prepared_lines = prepared if prepared is not None else (versions.newest(rows), None)
        if not points:
            return
        latest = await self._latest()
        if not self._slots_ready:
            await self._prepare_slots(latest)
        self._refused_keys.clear()
        # Only a reading at or before its DER's latest stored time can meet a stored one: a fleet's live
        # readings (each later than the DER's last) need no look at InfluxDB before they are written.
        maybe = {k: p for k, p in points.items() if k[1] <= latest.get(k[0], _NEVER)}
        stored = await self._stored(maybe) if maybe else []
        keep, deletes = versions.reconcile(points, stored)
        closing, fresh = slots.to_summarize(keep, latest)
        if closing:
            await self._in_spool(self._spool_open().note_slots, closing)
        held = await self._in_spool(self._spool_open().hold, rows, hold) if deletes and hold else None
        try:
            await self._replace(deletes, keep, points, prepared_lines)
        except Exception:  # the caller spools the batch (or has it): not held any more
            if held is not None:
                await self._in_spool(self._spool_open().release, held)
            raise
        if held is not None:  # (cancelled or killed, it stays held: written again at the next start)
            await self._in_spool(self._spool_open().release, held)
        if closing:
            await self._summarize(keep, closing, fresh)
        for der_id, measured_at in points:
            if measured_at > latest.get(der_id, _NEVER):
                latest[der_id] = measured_at

    async def _replace(
        self,
        deletes: list[tuple[str, int]],
        keep: list[Point],
        points: dict[tuple[str, int], Point],
        prepared_lines: list[Lines] | None,
    ) -> None:
        """Delete the stored points the batch replaces whole, then write the batch's points."""
        if deletes:
            statements = "; ".join(
                f"DELETE FROM {self._from} WHERE {der_condition((d,))} AND time >= {ns(t)} AND time < {ns(t + 1)}"
                for d, t in deletes
            )
            try:
                await self._client.query(statements)
            except RuntimeError as exc:  # InfluxDB 2.x's v1 API has no DELETE: the relaxation docs/operations.md names
                if not self._no_delete:
                    logger.warning("InfluxDB does not delete points ({}): fields of replaced readings may stay", exc)
                    self._no_delete = True
        size = self._config.batch_size
        requests: Iterable[Lines] | None = prepared_lines
        if requests is None or len(keep) < len(points):  # a reading left out: the lines of those kept
            requests = (self._lines(keep[at : at + size]) for at in range(0, len(keep), size))
        await self._write_all(requests)

    def _spool_open(self) -> Spool:
        assert self._spool is not None, "start() opens the spool"
        return self._spool

    async def _prepare_slots(self, latest: dict[str, int]) -> None:
        """Before the first write: record, the first time this InfluxDB target is written, from when every
        closed slot has its summary (from the start for an empty database, else from the slot after the
        newest stored reading); make the summaries a crash left undone."""
        if slots.complete_from(self._registry_path, self._config) is None:
            at = slots.slot_of(max(latest.values())) + slots.SLOT_MS if latest else MIN_TIME_MS
            slots.record_complete_from(self._registry_path, self._config, at)
        pending = await self._in_spool(self._spool_open().pending_slots)
        if pending:
            closed = {(d, s) for d, s in pending if d not in latest or s != slots.slot_of(latest[d])}
            await self._summarize([], closed, set())
            await self._in_spool(self._spool_open().clear_slots, pending)
            logger.info("made {} slot summaries a stop left undone", len(closed))
        self._slots_ready = True

    async def _summarize(self, written: list[Point], closing: set[slots.SlotKey], fresh: set[slots.SlotKey]) -> None:
        """Write the summaries of the slots a batch closed or changed (hubd.store.influx.slots): of slots
        holding only its readings from them, of the others from InfluxDB's aggregates of what it holds."""
        fresh = fresh - {(d, slots.slot_of(t)) for d, t in self._refused_keys}
        summaries = slots.summarize_points(written, fresh)
        by_slot: dict[int, list[str]] = {}
        for der_id, slot in sorted(closing - fresh):
            by_slot.setdefault(slot, []).append(der_id)
        for slot, der_ids in by_slot.items():
            for at in range(0, len(der_ids), 500):
                statements = self._stored_slots.statements(slot, der_ids[at : at + 500])
                summaries.update(self._stored_slots.read(slot, await self._client.query_many(statements)))
        texts = slots.lines(self._config, summaries)
        size = self._config.batch_size
        for at in range(0, len(texts), size):
            try:
                await self._client.write("\n".join(texts[at : at + size]))
            except InfluxRefused as exc:  # only if something else wrote other types into the measurement
                logger.error("InfluxDB refused slot summaries ({}): bucket queries of those slots may be wrong", exc)
        await self._in_spool(self._spool_open().clear_slots, closing)

    async def _write_all(self, requests: Iterable[Lines]) -> None:
        """Write the requests, ``_REQUESTS`` at a time. If one fails, those still out are awaited before the
        error is raised: no request of a batch lands after the batch went to the spool (and behind a later one)."""
        writing: set[asyncio.Future[None]] = set()
        try:
            for request in requests:
                if not request:
                    continue
                while len(writing) >= _REQUESTS:
                    done, writing = await asyncio.wait(writing, return_when=asyncio.FIRST_COMPLETED)
                    _raise_first(done)
                writing.add(asyncio.ensure_future(self._write(request)))
                await asyncio.sleep(0)  # let the request go out before the next lines are made
            while writing:
                done, writing = await asyncio.wait(writing, return_when=asyncio.FIRST_COMPLETED)
                _raise_first(done)
        except asyncio.CancelledError:
            for task in writing:
                task.cancel()
            raise
        except BaseException:
            await asyncio.gather(*writing, return_exceptions=True)
            raise

    def _lines(self, points: list[Point]) -> Lines:
        """The points as lines; a point InfluxDB could not hold (NaN) is quarantined here."""
        texts = lines(self._config.measurement, points)
        if texts is not None:
            return list(zip(texts, points, strict=True))
        out: Lines = []
        for p in points:
            try:
                out.append((line(self._config.measurement, p), p))
            except ValueError as exc:
                self._refuse([p], str(exc))
        return out

    async def _latest(self) -> dict[str, int]:
        """Each DER's latest stored time: read once (one query), then kept by this sink's own writes. So it
        holds while this hub is the only writer of its DERs (docs/operations.md, InfluxDB)."""
        if self._newest is None:
            found = await self._client.query(f'SELECT last("received_at") FROM {self._from} GROUP BY "der_id"')
            self._newest = {s["tags"]["der_id"]: int(s["values"][0][0]) for s in found if s.get("tags")}
        return self._newest

    async def _stored(self, points: dict[tuple[str, int], Point]) -> list[dict[str, object]]:
        """The stored points at the batch's keys (and others in its span): their version and clock fields,
        plus every quantity, so ``reconcile`` sees which fields a newer reading would leave behind."""
        der_ids = tuple(sorted({d for d, _ in points}))
        times = [t for _, t in points]
        found: list[dict[str, object]] = []
        for at in range(0, len(der_ids), 500):  # keep each statement a reasonable size
            condition = der_condition(der_ids[at : at + 500])
            statement = (
                f"SELECT * FROM {self._from} WHERE {condition} AND time >= {ns(min(times))} "
                f"AND time < {ns(max(times) + 1)}"
            )
            for series in await self._client.query(statement):
                names = series["columns"]
                found.extend(dict(zip(names, v, strict=True)) for v in series["values"])
        return found

    async def _write(self, lines: Lines) -> None:
        """Write ``lines``; when InfluxDB refuses some, halve until each refused point is alone and
        quarantine it (points it took are written again: the same point, the same result)."""
        try:
            await self._client.write("\n".join(text for text, _ in lines))
        except InfluxRefused as exc:
            if len(lines) == 1:
                self._refuse([lines[0][1]], str(exc))
                return
            half = len(lines) // 2
            await self._write(lines[:half])
            await self._write(lines[half:])

    def _refuse(self, points: list[Point], reason: str) -> None:
        assert self._quarantine is not None
        for der_id, measured_at, values in points:
            self.refused += 1
            self._refused_keys.add((der_id, measured_at))
            payload = json.dumps({"der_id": der_id, "measured_at": measured_at, **values}, sort_keys=True)
            entry = self._quarantine.add(
                received_at=int(values.get("received_at", 0)),
                topic=QUARANTINE_TOPIC,
                format_code=str(values.get("format", "")),
                source_id=str(values.get("source", "")) or None,
                code="unavailable",
                reason=f"InfluxDB refused the reading: {reason}"[:1000],
                payload=payload.encode(),
            )
            logger.warning("InfluxDB refused a reading of {} at {}: {}", der_id, measured_at, reason)
            self._audit_event(
                "store.refused",
                "error",
                der_id=der_id,
                measured_at=measured_at,
                quarantine_id=entry.id,
                reason=reason[:500],
            )

    def _audit_event(self, event: str, outcome: str = "ok", **fields: object) -> None:
        if self._audit is None:
            return
        try:
            self._audit.append(event, outcome, **fields)
            self._audit.flush()
        except Exception as exc:  # the store's state is in the spool file all the same
            logger.error("auditing {} failed: {}", event, exc)

    async def close(self) -> None:
        """Finish the batch in hand; what is still spooled stays there for the next start."""
        async with self._lock:
            if self._replay is not None:
                self._replay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._replay
            await self._release()

    async def _release(self) -> None:
        await self._client.close()
        if self._spool is not None:
            await self._in_spool(self._spool.close)
            self._spool = None
        self._spool_thread.shutdown()
        if self._quarantine is not None:
            self._quarantine.close()
            self._quarantine = None
