"""Group commit: readings from many messages written in one transaction, each sender told only after it.

Messages queue up while the store commits the previous batch, so batches grow with the load and the
cost of a commit is shared; a bounded queue pushes back on the broker instead of dropping anything.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from loguru import logger

from hubd.audit import AuditLog
from hubd.model import ErrorCode, HubError, now_ms
from hubd.store import ReadingSink, Rows

T = TypeVar("T")
_LISTED_DERS = 200  # an audit record lists the DER ids up to this many, else gives their count
# Batches sent to the store before the first is answered: the next one waits at the store while a commit
# runs, instead of being put together only after it (bench/README.md).
_IN_FLIGHT = 2
# Under load, a commit waits for more rows: readings of many DERs dirty a page per DER, so a batch of a few
# readings per DER costs far less per row than one of a reading each (bench/README.md: 27 µs per row in
# batches of 300, 14 in 3,000, 9 in 10,000, with 1,000 DERs). "Under load": the last batch had at least
# _BUSY_ROWS rows; then, when no commit runs, the next waits until _TARGET_ROWS are queued, or _WINDOW_S after
# the last commit ended. Under sustained load the batch taken while a commit runs (_IN_FLIGHT) sets the size
# instead: 1,500-2,800 rows in bench/ingest's case A, and waiting for full batches there was slower.
_BUSY_ROWS = 200
_TARGET_ROWS = 8000
_WINDOW_S = 1.0


@dataclass(slots=True)
class Write:
    """One message's readings for the store, and what the audit says of them."""

    source_id: str
    rows: Rows
    readings: int  # in rows
    der_ids: set[str]
    offered: int  # readings the message had, refused ones included


@dataclass(slots=True)
class _Pending:
    """Messages committed together and told together: a group is never split between two commits."""

    writes: list[Write]
    count: int  # readings in all their rows
    done: asyncio.Future[None]


def settle(done: asyncio.Future[T], outcome: T | BaseException) -> None:
    """Give a waiter its outcome (a result, or an exception to raise), unless it has one or stopped waiting."""
    if done.done():
        return
    if isinstance(outcome, BaseException):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)


@dataclass(slots=True)
class _SourceTally:
    messages: int = 0
    offered: int = 0
    readings: int = 0
    der_ids: set[str] = field(default_factory=set)


class BatchWriter:
    """Accepts readings from many coroutines and commits them in batches, in order."""

    def __init__(self, store: ReadingSink, audit: AuditLog, max_readings: int, queue_max_messages: int) -> None:
        self._store = store
        self._audit = audit
        self._max = max_readings
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._queue_max = queue_max_messages
        self._queued = 0  # messages in the queue (a group counts each of its messages)
        self._room: deque[asyncio.Future[None]] = deque()  # writers waiting for the queue to shrink
        self._closing = False
        self._counts: dict[tuple[str, str], int] = {}
        self._task: asyncio.Task[None] | None = None
        self._queued_rows = 0  # readings in the queue
        self._last_rows = 0  # readings in the last batch taken
        self._last_end = 0.0  # when the last commit ended (loop time)
        self._timer: asyncio.TimerHandle | None = None
        # For the metrics (hubd.ops.metrics): readings committed, and a call per commit with its readings
        # and seconds (the commit histograms).
        self.committed = 0
        self.on_commit: Callable[[int, float], None] | None = None

    @property
    def sink(self) -> ReadingSink:
        """The store it writes to (the metrics read the InfluxDB spool's figures from it)."""
        return self._store

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hubd-store-writer")

    async def write(self, writes: list[Write]) -> None:
        """Return once the readings of ``writes`` are committed (in one transaction); raise
        HubError(unavailable) if the store failed."""
        if self._closing:
            raise HubError(ErrorCode.UNAVAILABLE, "the hub is shutting down")
        loop = asyncio.get_running_loop()
        while self._queued >= self._queue_max:  # not a Semaphore: its bookkeeping cost ~4 % of case A
            room: asyncio.Future[None] = loop.create_future()
            self._room.append(room)
            await room
        done: asyncio.Future[None] = loop.create_future()
        count = sum(w.readings for w in writes)
        self._queue.append(_Pending(writes, count, done))
        self._queued += len(writes)
        self._queued_rows += count
        self._wake.set()
        await done

    async def _run(self) -> None:
        try:
            await self._serve()
        finally:  # also if it failed: no writer may wait for a commit that will never come
            self._closing = True
            unavailable = HubError(ErrorCode.UNAVAILABLE, "the store is unavailable")
            while self._queue:
                settle(self._queue.popleft().done, unavailable)
            while self._room:
                settle(self._room.popleft(), unavailable)

    async def _serve(self) -> None:
        in_flight: set[asyncio.Task[None]] = set()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            except TimeoutError:  # quiet for a second: the counted answers go to the audit (and the queue is seen)
                if self._counts:
                    self.flush_counts()
            self._wake.clear()
            while self._queue and len(in_flight) < _IN_FLIGHT:
                if not in_flight and self._gathering():
                    break
                commit = asyncio.create_task(self._commit(self._take()))
                in_flight.add(commit)
                commit.add_done_callback(in_flight.discard)
                commit.add_done_callback(lambda _: self._wake.set())
                while self._room:
                    settle(self._room.popleft(), None)
            if self._closing and not self._queue and not in_flight:
                self.flush_counts()
                return

    def _gathering(self) -> bool:
        """Whether the next batch should wait for more rows (under load, below the target, within the window);
        if so, the writer is woken when the window ends (and by every write meanwhile)."""
        loop = asyncio.get_running_loop()
        until = self._last_end + _WINDOW_S
        if (
            self._closing
            or self._last_rows < _BUSY_ROWS
            or self._queued_rows >= min(_TARGET_ROWS, self._max)
            or loop.time() >= until
        ):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return False
        if self._timer is None:
            self._timer = loop.call_at(until, self._window_over)
        return True

    def _window_over(self) -> None:
        self._timer = None  # the next _gathering() sets one for its own window
        self._wake.set()

    async def _commit(self, batch: list[_Pending]) -> None:
        """Commit one batch, audit it, then tell its writers."""
        rows: Rows = [run for p in batch for w in p.writes for run in w.rows]
        started = time.perf_counter()
        try:
            await self._store.write_rows(rows, now_ms())
        except Exception as exc:
            count = sum(p.count for p in batch)
            logger.error("store write of {} readings failed: {}", count, exc)
            outcome: BaseException | None = HubError(ErrorCode.UNAVAILABLE, "the store is unavailable")
            try:
                self._audit.append("store.failed", "error", readings=count, reason=str(exc))
                self._audit.flush()
            except Exception as audit_failed:  # the senders are told all the same
                logger.error("auditing the failed write failed too: {}", audit_failed)
        else:
            outcome = None
            count = sum(p.count for p in batch)
            self.committed += count
            if self.on_commit is not None:
                self.on_commit(count, time.perf_counter() - started)
            try:
                self._audit_batch(batch)
            except Exception as audit_failed:  # committed but not audited: nobody is told "ok"
                logger.exception("auditing a committed batch failed")
                outcome = audit_failed
        self._last_end = asyncio.get_running_loop().time()
        for p in batch:
            settle(p.done, outcome)

    def _take(self) -> list[_Pending]:
        """Up to ``max_readings`` readings' worth of messages (always at least one group)."""
        batch = [self._queue.popleft()]
        count = batch[0].count
        while self._queue and count + self._queue[0].count <= self._max:
            item = self._queue.popleft()
            batch.append(item)
            count += item.count
        self._queued -= sum(len(p.writes) for p in batch)
        self._queued_rows -= count
        self._last_rows = count
        return batch

    def _audit_batch(self, batch: list[_Pending]) -> None:
        tallies: dict[str, _SourceTally] = defaultdict(_SourceTally)
        for w in (w for p in batch for w in p.writes):
            tally = tallies[w.source_id]
            tally.messages += 1
            tally.offered += w.offered
            tally.readings += w.readings
            tally.der_ids |= w.der_ids
        for source_id, tally in tallies.items():
            listed = sorted(tally.der_ids) if len(tally.der_ids) <= _LISTED_DERS else None
            count = len(tally.der_ids)
            audit = self._audit
            audit.append("data.received", source_id=source_id, messages=tally.messages, readings=tally.offered)
            audit.append("auth.ok", source_id=source_id, readings=tally.readings, der_count=count, der_ids=listed)
            audit.append("data.stored", source_id=source_id, readings=tally.readings, der_count=count, der_ids=listed)
        self.flush_counts()

    @property
    def serving(self) -> bool:
        """Whether commits are taken: started, not closing, and its task has not ended (a failed store)."""
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def queued(self) -> tuple[int, int]:
        """Messages and readings waiting for a commit."""
        return self._queued, self._queued_rows

    def count(self, event: str, source_id: str) -> None:
        """Count a frequent event (an answer sent) for the next coalesced audit record."""
        key = (event, source_id)
        self._counts[key] = self._counts.get(key, 0) + 1

    def flush_counts(self) -> None:
        counts, self._counts = self._counts, {}
        for (event, source_id), n in counts.items():
            self._audit.append(event, source_id=source_id, messages=n)
        self._audit.flush()

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
