"""SQLite writes in a process of their own, so that committing never competes with the event loop for the GIL.

Python's sqlite3 gives up the GIL around every row it steps and must take it back for the next one. In the
hub's process that meant waiting, for every row, until the busy event loop paused: with the writer a thread
of the hub, a batch crawled at a few thousand rows a second (bench/README.md). Here the rows travel as one
pickled batch over a pipe to a child (``python -m hubd.store.process``) that owns the write connection and
answers after the commit, so "acknowledged after commit" still holds. Queries read through the hub's own
connection: WAL lets them see every committed batch.

The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C and systemd reach the whole process group): it ends
when the hub closes the pipe, after the batch in hand, so a hub that drains on shutdown can still commit.
"""

from __future__ import annotations

import contextlib
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from hubd.store import Rows
from hubd.store.sqlite import SqliteStore

_HEADER = struct.Struct("<Q")


class StoreProcessError(RuntimeError):
    """The writer process refused the batch (not committed), or ended before it answered (committed or not:
    a replay of the quarantined message is idempotent either way)."""


class WriterProcess:
    """``write_rows`` and ``close`` of a SqliteStore, run in a child process. Called from one thread at a time."""

    def __init__(self, path: Path, synchronous: str = "full") -> None:
        self._args = [sys.executable, "-m", "hubd.store.process", str(path), synchronous]
        self._child: subprocess.Popen[bytes] | None = None
        self._start()

    def _start(self) -> None:
        self._child = subprocess.Popen(self._args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        # The child opens the store (and creates the schema) before its first answer: wait for it, so a store
        # that cannot be opened fails the hub's start, not its first batch.
        self._call(None)

    def write_rows(self, rows: Rows, stored_at: int) -> None:
        """Commit ``rows``; durable when this returns. Raises StoreProcessError otherwise."""
        if self._child is None or self._child.poll() is not None:
            self._reap()
            self._start()  # the previous child died: a fresh one for this batch
        self._call((rows, stored_at))

    def _call(self, request: Any) -> None:
        child = self._child
        assert child is not None and child.stdin is not None and child.stdout is not None
        try:
            _send(child.stdin, request)
            error = _receive(child.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self._reap()
            raise StoreProcessError(f"the store's writer process ended ({exc or type(exc).__name__})") from None
        if error is not None:
            raise StoreProcessError(error)

    def _reap(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.kill()
            child.wait()
            for pipe in (child.stdin, child.stdout):
                if pipe is not None:
                    pipe.close()

    def close(self) -> None:
        """Close the pipe; the child finishes and exits."""
        child, self._child = self._child, None
        if child is None:
            return
        assert child.stdin is not None and child.stdout is not None
        with contextlib.suppress(OSError):
            child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stdout.close()


def _send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
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
    return pickle.loads(data)


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
