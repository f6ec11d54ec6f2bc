"""SQLite writes in a process of their own, so that committing never competes with the event loop for the GIL.

Python's sqlite3 gives up the GIL around every row it steps and must take it back for the next one. In the
hub's process that meant waiting, for every row, until the busy event loop paused: with the writer a thread
of the hub, a batch crawled at a few thousand rows a second (bench/README.md). Here the rows travel as one
batch over a pipe to a child (``python -m hubd.store.process``) that owns the write connection and
answers after the commit, so "acknowledged after commit" still holds. Queries read through the hub's own
connection: WAL lets them see every committed batch.

The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C and systemd reach the whole process group): it ends
when the hub closes the pipe, after the batch in hand, so a hub that drains on shutdown can still commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import marshal
import signal
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Any

from hubd.config import Config
from hubd.store import Rows
from hubd.store.sqlite import SqliteStore
from hubd.store.writer import settle

# Batches travel in ``marshal``'s format: rows are tuples of str, int, float and None, which it writes and
# reads two to three times faster than pickle (bench/README.md); both ends are the same interpreter, the one
# format version marshal guarantees to read back.
_HEADER = struct.Struct("<Q")
_PIPE_BYTES = 1 << 20  # Linux's largest pipe for an unprivileged process by default (fs.pipe-max-size)


class StoreProcessError(RuntimeError):
    """The writer process refused the batch (not committed), or ended before it answered (committed or not:
    a replay of the quarantined message is idempotent either way)."""


class WriterProcess:
    """``write_rows`` and ``close`` of a SqliteStore, run in a child process and awaited on the event loop.

    No thread in between: one handing each batch over cost the loop a GIL switch per batch and per answer
    (bench/README.md). Batches queue in call order; one is written to the child only while the child waits
    for one (just started, or just answered), so it drains the pipe at once, and a batch that comes during a
    commit is written the moment that commit is answered. The pipe is enlarged so that most batches fit whole.

    A child that dies fails the batch it was committing (and, if it is found dead by its closed pipe, the
    batches queued behind it); the next ``write_rows`` starts a new child, one start at a time, and batches
    queued meanwhile go to it in order. Each child's answers carry its generation, so a dead child's last
    words never settle a batch sent to its successor.
    """

    def __init__(self, path: Path, synchronous: str = "full") -> None:
        self._args = [sys.executable, "-m", "hubd.store.process", str(path), synchronous]
        self._child: subprocess.Popen[bytes] | None = None
        self._generation = 0  # of the current child
        self._requests: asyncio.WriteTransport | None = None
        self._answers: _Answers | None = None  # None once the child's pipe has closed
        self._sent: asyncio.Future[str | None] | None = None  # the answer the child owes (first: its start)
        self._unsent: deque[tuple[bytes, asyncio.Future[str | None]]] = deque()
        self._starting: asyncio.Future[None] | None = None

    @classmethod
    def from_config(cls, config: Config) -> WriterProcess:
        """The sink of ``store.backend: sqlite``: the file and durability its ``store.sqlite`` section names."""
        return cls(config.readings_path, config.store.sqlite.synchronous)

    async def start(self) -> None:
        """Start the child and wait until it has opened the store (and created the schema), so a store that
        cannot be opened fails the hub's start, not its first batch."""
        await self._running()

    async def write_rows(self, rows: Rows, stored_at: int) -> None:
        """Commit ``rows``; durable when this returns. Raises StoreProcessError otherwise."""
        data = marshal.dumps((rows, stored_at))
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._unsent.append((_HEADER.pack(len(data)) + data, answer))  # in call order, before any wait
        if not self._alive():
            with contextlib.suppress(StoreProcessError):  # the failed start has failed ``answer`` too
                await self._running()
        elif self._sent is None:
            self._send_next()
        error = await answer
        if error is not None:
            raise StoreProcessError(error)

    def _alive(self) -> bool:
        return self._child is not None and self._child.poll() is None and self._answers is not None

    async def _running(self) -> None:
        """Until a child has opened the store: a new one, started once however many writers wait for it."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._spawn())
        await asyncio.shield(self._starting)

    async def _spawn(self) -> None:
        try:
            self._reap()
            self._generation += 1
            generation = self._generation
            child = subprocess.Popen(self._args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
            self._child = child
            assert child.stdin is not None
            if hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux; the default 64 KiB holds a few hundred rows
                with contextlib.suppress(OSError):
                    fcntl.fcntl(child.stdin.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
            loop = asyncio.get_running_loop()
            ready: asyncio.Future[str | None] = loop.create_future()
            self._sent = ready  # the child answers once when it has opened the store
            self._requests, _ = await loop.connect_write_pipe(asyncio.Protocol, child.stdin)
            _, self._answers = await loop.connect_read_pipe(
                lambda: _Answers(partial(self._answered, generation), partial(self._ended, generation)),
                child.stdout,
            )
            await ready
        finally:
            self._starting = None

    def _send_next(self) -> None:
        """Hand the oldest unsent batch to the pipe (what does not fit goes as the child reads)."""
        data, self._sent = self._unsent.popleft()
        assert self._requests is not None
        self._requests.write(data)

    def _answered(self, generation: int, error: str | None) -> None:
        if generation != self._generation:
            return
        sent, self._sent = self._sent, None
        if sent is not None:
            settle(sent, error)
        if self._unsent and self._answers is not None:
            self._send_next()

    def _ended(self, generation: int, exc: Exception | None) -> None:
        """The child's pipe closed: what it held and what waited for it fail (the next write starts another)."""
        if generation != self._generation:
            return
        self._answers = None
        ended = StoreProcessError(f"the store's writer process ended ({exc or 'its pipe closed'})")
        sent, self._sent = self._sent, None
        if sent is not None:
            settle(sent, ended)
        while self._unsent:
            settle(self._unsent.popleft()[1], ended)

    def _reap(self) -> None:
        """End the current child, if any: the batch it held fails; queued batches wait for the next child."""
        child, self._child = self._child, None
        sent, self._sent = self._sent, None
        if sent is not None:
            settle(sent, StoreProcessError("the store's writer process ended"))
        self._close_pipes()
        if child is not None:
            child.kill()
            child.wait()

    def _close_pipes(self) -> None:
        if self._requests is not None:
            self._requests.close()  # after what it holds is written, if the child still reads
            self._requests = None
        if self._answers is not None:
            self._answers.close()
            self._answers = None

    async def close(self) -> None:
        """Close the pipe; the child commits what it holds, then exits (waited for, 30 s at most)."""
        child, self._child = self._child, None
        if child is None:
            return
        if self._requests is not None:
            self._requests.close()  # the child reads to the end of the pipe, then exits
            self._requests = None
        try:
            await asyncio.wait_for(asyncio.to_thread(child.wait), 30)
        except TimeoutError:
            child.kill()
            await asyncio.to_thread(child.wait)
        self._close_pipes()


class _Answers(asyncio.Protocol):
    """The child's answers (None, or the error of a batch it refused), in the order of the requests."""

    def __init__(self, on_answer: Callable[[str | None], None], on_end: Callable[[Exception | None], None]) -> None:
        self._on_answer = on_answer
        self._on_end = on_end
        self._buffer = bytearray()
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            end = _HEADER.size + size
            if len(buffer) < end:
                return
            answer = marshal.loads(buffer[_HEADER.size : end])
            del buffer[:end]
            self._on_answer(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_end(exc)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _send(stream: IO[bytes], obj: Any) -> None:
    data = marshal.dumps(obj)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the pipe closed")
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the pipe closed mid-message")
    return marshal.loads(data)


def serve(path: Path, synchronous: str) -> None:
    """The child: open the store and say so (None), then commit each batch from stdin and answer None or the
    error. A store that cannot be opened ends the child before its first answer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    store = SqliteStore(path, synchronous)
    _send(answers, None)
    try:
        while True:
            try:
                batch = _receive(requests)
            except EOFError:
                return
            error = None
            try:
                store.write_rows(*batch)
            except Exception as exc:  # answered, not raised: the hub decides what a failed batch means
                error = f"{type(exc).__name__}: {exc}"
            _send(answers, error)
    finally:
        store.close()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2])
