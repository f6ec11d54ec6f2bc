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
from pathlib import Path
from typing import IO, Any

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
    (bench/README.md). A batch is written to the child only while the child waits for one (just started, or
    just answered), so it drains the pipe at once; a batch that comes during a commit is serialized meanwhile
    and written the moment the commit is answered. The pipe is enlarged so that most batches fit whole.
    """

    def __init__(self, path: Path, synchronous: str = "full") -> None:
        self._args = [sys.executable, "-m", "hubd.store.process", str(path), synchronous]
        self._child: subprocess.Popen[bytes] | None = None
        self._requests: asyncio.WriteTransport | None = None
        self._answers: _Answers | None = None
        self._sent: asyncio.Future[str | None] | None = None  # the answer the child owes
        self._unsent: deque[tuple[bytes, asyncio.Future[str | None]]] = deque()

    async def start(self) -> None:
        """Start the child and wait until it has opened the store (and created the schema), so a store that
        cannot be opened fails the hub's start, not its first batch."""
        child = subprocess.Popen(self._args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self._child = child
        assert child.stdin is not None
        if hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux; the default 64 KiB holds a few hundred rows
            with contextlib.suppress(OSError):
                fcntl.fcntl(child.stdin.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        loop = asyncio.get_running_loop()
        self._requests, _ = await loop.connect_write_pipe(asyncio.Protocol, child.stdin)
        _, self._answers = await loop.connect_read_pipe(lambda: _Answers(self._answered, self._ended), child.stdout)
        await self._call(None)

    async def write_rows(self, rows: Rows, stored_at: int) -> None:
        """Commit ``rows``; durable when this returns. Raises StoreProcessError otherwise."""
        if self._child is None or self._child.poll() is not None or self._answers is None:
            self._reap()
            await self.start()  # the previous child died: a fresh one for this batch
        await self._call((rows, stored_at))

    async def _call(self, request: Any) -> None:
        data = marshal.dumps(request)
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._unsent.append((_HEADER.pack(len(data)) + data, answer))
        if self._sent is None:
            self._send_next()
        error = await answer
        if error is not None:
            raise StoreProcessError(error)

    def _send_next(self) -> None:
        """Hand the oldest unsent batch to the pipe (what does not fit goes as the child reads)."""
        data, self._sent = self._unsent.popleft()
        assert self._requests is not None
        self._requests.write(data)

    def _answered(self, error: str | None) -> None:
        sent, self._sent = self._sent, None
        if sent is not None:
            settle(sent, error)
        if self._unsent:
            self._send_next()

    def _ended(self, exc: Exception | None) -> None:
        """The child is gone: every batch not answered fails (the next ``write_rows`` starts a new child)."""
        self._answers = None
        ended = StoreProcessError(f"the store's writer process ended ({exc or 'its pipe closed'})")
        sent, self._sent = self._sent, None
        if sent is not None:
            settle(sent, ended)
        while self._unsent:
            settle(self._unsent.popleft()[1], ended)

    def _reap(self) -> None:
        child, self._child = self._child, None
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
    """The child: open the store, then commit each batch from stdin and answer None or the error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    store = SqliteStore(path, synchronous)
    try:
        while True:
            try:
                batch = _receive(requests)
            except EOFError:
                return
            error = None
            if batch is not None:
                try:
                    store.write_rows(*batch)
                except Exception as exc:  # answered, not raised: the hub decides what a failed batch means
                    error = f"{type(exc).__name__}: {exc}"
            _send(answers, error)
    finally:
        store.close()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2])
