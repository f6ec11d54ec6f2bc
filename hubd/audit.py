"""The audit trail: an append-only, hash-chained JSON Lines log of who did what to which DER, and how.

It is separate from the operational log because it answers a different question ("can we prove what
happened?") and must survive scrutiny: each record carries the SHA-256 of the record before it, so an edit,
a removed record or a reordering breaks the chain at a line ``verify`` can name. Cutting records off the end
leaves a valid chain, so a small sidecar head file (``<log>.head``) remembers the last written record.

The hash of a record is ``sha256(orjson.dumps(record_without_hash, option=OPT_SORT_KEYS))`` in hex; anyone
can check the log with a few lines of code and no knowledge of hubd.

Passwords never reach this log: ``append`` refuses any field whose name contains "password".
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson

from hubd.model import format_time, now_ms

__all__ = ["AuditError", "AuditLog", "VerifyReport", "tail", "verify"]

GENESIS_PREV = "0" * 64
START_EVENT = "audit.start"
# Fields the log itself sets; a caller's field of the same name would break the chain or mislead a reader.
_RESERVED = frozenset({"seq", "at", "prev", "hash"})
# Buffered records are written once this many wait, bounding memory and what a crash can lose.
_AUTO_FLUSH_RECORDS = 1000
# How long a writer waits for another (another process's flush) before calling the log stuck.
_LOCK_TIMEOUT_S = 5.0
# Block size for reading a log from its end in tail.
_CHUNK = 64 * 1024
# Smaller blocks for finding the last record, which every flush does; a longer record just takes more reads.
_LAST_CHUNK = 4 * 1024
_SORT = orjson.OPT_SORT_KEYS
_SCALARS = frozenset({str, int, float, bool, type(None)})


class AuditError(Exception):
    """The audit log cannot be used safely as it is (corrupt end, truncated, or locked by a stuck writer)."""


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of checking a whole log, phrased so the CLI can print ``reason`` as it is."""

    ok: bool
    records: int
    bad_line: int | None
    reason: str


MAX_DEPTH = 64  # levels of lists and objects in one field; no record of the hub's own needs more than a few
_HEAD_SIZE = 128  # bytes of a head file: {"seq": ..., "hash": <64 hex digits>} padded with spaces


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _digest(record: Mapping[str, object]) -> str:
    """The record's hash: SHA-256 over the canonical (sorted-key) serialisation, without "hash"."""
    return hashlib.sha256(orjson.dumps(record, option=_SORT)).hexdigest()


def _check_value(name: str, value: object, depth: int = 1) -> None:
    """Refuse password-like keys anywhere, and values that would not read back as the same JSON.

    Only JSON-native values are allowed so that re-serialising a parsed record gives the very bytes that were
    hashed; otherwise a faithful log could fail verification. Exact-type checks first: this runs per append.
    Values nested deeper than MAX_DEPTH are refused (TypeError, like any unwritable value): a request's
    conditions come from outside, and a few thousand levels would exhaust the recursion here and in orjson.
    """
    if type(value) in _SCALARS:
        return
    if depth > MAX_DEPTH:
        raise TypeError(f"audit field {name.partition('.')[0]} is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"audit field {name} has a non-string key {key!r}")
            if "password" in key.lower():
                raise ValueError(f"audit field {name}.{key} looks like a password; secrets never go to the audit log")
            _check_value(f"{name}.{key}", item, depth + 1)
        return
    if isinstance(value, list | tuple):
        for item in value:
            if type(item) not in _SCALARS:
                _check_value(f"{name}[]", item, depth + 1)
        return
    if isinstance(value, str | int | float):  # subclasses such as StrEnum serialise as their value
        return
    raise TypeError(f"audit field {name} has type {type(value).__name__}; use str, number, bool, None, list or dict")


def _check_fields(fields: Mapping[str, object]) -> bool:
    """Check the caller's fields; True when some are containers (which the caller could still change)."""
    nested = False
    for key, value in fields.items():
        if "password" in key.lower():
            raise ValueError(f"audit field {key!r} looks like a password; secrets never go to the audit log")
        if key in _RESERVED:
            raise ValueError(f"audit field {key!r} is set by the audit log itself")
        if type(value) not in _SCALARS:
            _check_value(key, value)
            nested = True
    return nested


def _lines_backward(file: BinaryIO, chunk: int = 0) -> Iterator[bytes]:
    """Yield the file's lines last to first (without line ends), reading blocks from the end.

    A file ending in a line end yields an empty line first; a file without one yields its partial last line.
    """
    file.seek(0, os.SEEK_END)
    pos = file.tell()
    rest = b""
    while pos > 0:
        size = min(chunk or _CHUNK, pos)
        pos -= size
        file.seek(pos)
        parts = (file.read(size) + rest).split(b"\n")
        rest = parts[0]
        yield from reversed(parts[1:])
    yield rest


def _count_lines(path: Path) -> int:
    """Count line ends; only used to name a bad line in an error, so its cost on a large log is acceptable."""
    count = 0
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            count += block.count(b"\n")
    return count


def _parse_record(line: bytes) -> dict[str, object] | None:
    """A line as an audit record, or None when it is not JSON or lacks the chain fields."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    seq, prev, digest = record.get("seq"), record.get("prev"), record.get("hash")
    if isinstance(seq, bool) or not isinstance(seq, int):
        return None
    if not isinstance(prev, str) or not isinstance(digest, str):
        return None
    return record


def _read_head(head_path: Path) -> tuple[int, str] | None:
    """The (seq, hash) the writer last flushed, or None when there is no head file (or an empty one: a crash
    between creating it and its first write)."""
    try:
        data = head_path.read_bytes()
    except FileNotFoundError:
        return None
    if not data.strip(b" \0"):
        return None
    try:
        head = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise AuditError(f"head file {head_path} is not valid JSON") from None
    seq = head.get("seq") if isinstance(head, dict) else None
    digest = head.get("hash") if isinstance(head, dict) else None
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1 or not isinstance(digest, str):
        raise AuditError(f"head file {head_path} lacks a positive integer seq and a hash")
    return seq, digest


def _read_last(path: Path) -> tuple[int, str]:
    """Seq and hash of the last record, to continue the chain, without reading the whole log."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return 0, GENESIS_PREV
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            return 0, GENESIS_PREV
        lines = _lines_backward(file, _LAST_CHUNK)
        if next(lines) != b"":
            raise AuditError(
                f"{path}: line {_count_lines(path) + 1} is incomplete (partial write?); "
                "check it with `hubd audit verify` before writing more"
            )
        last = next(lines, b"")
    record = _parse_record(last)
    if record is None:
        raise AuditError(
            f"{path}: line {_count_lines(path)} is not a valid audit record (partial write or edit?); "
            "check it with `hubd audit verify` before writing more"
        )
    seq, digest = record["seq"], record["hash"]
    assert isinstance(seq, int) and isinstance(digest, str)  # _parse_record checked
    return seq, digest


class AuditLog:
    """One process's writer of an audit log; several (the daemon and an operator's CLI) may share a log.

    ``append`` only checks and buffers, because it runs per batch on the hot path. ``flush`` takes an
    exclusive ``flock``, reads the log's last record, chains the buffered records onto it and writes them in
    one go, so writers in different processes never fork the chain. When the log is as this writer left it
    (same size and modification time), the end it wrote is used instead of reading it back. A crash loses at
    most the unflushed records, never the chain's integrity. Not thread-safe: use it from the event loop's thread.
    """

    def __init__(self, path: Path, fsync: bool = False) -> None:
        self._path = Path(path)
        self._head_path = _head_path(self._path)
        self._fsync = fsync
        self._pending: list[dict[str, object]] = []
        self._second = -1  # epoch second whose formatted prefix is cached in _second_text
        self._second_text = ""
        self._left: tuple[int, int, int, str] | None = None  # (size, mtime ns, seq, hash) after our last write
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._file: BinaryIO | None = self._path.open("ab")
        try:
            with self._locked():
                seq, _ = self._read_end()
                if seq == 0:
                    self.append(START_EVENT)
                    self._write_pending()
        except BaseException:
            self._file.close()
            self._file = None
            raise

    @property
    def path(self) -> Path:
        return self._path

    @contextmanager
    def _locked(self) -> Iterator[BinaryIO]:
        """Hold the writers' lock: holders keep it for one write, so a long wait means a stuck writer."""
        if self._file is None:
            raise AuditError(f"{self._path} is closed")
        file = self._file
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AuditError(f"{self._path} stayed locked by another writer for {_LOCK_TIMEOUT_S} s") from None
                time.sleep(0.005)
        try:
            yield file
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)

    def _read_end(self) -> tuple[int, str]:
        """The log's last (seq, hash), refusing a log whose end was cut or rewritten: writing on would erase
        the evidence. Called under the lock, so no other writer moves the end meanwhile."""
        assert self._file is not None
        stat = os.fstat(self._file.fileno())
        try:
            named = os.stat(self._path)
        except FileNotFoundError:
            named = None
        if named is None or (named.st_dev, named.st_ino) != (stat.st_dev, stat.st_ino):
            # Moved, removed or replaced while open: appending on would write where nobody looks, and other
            # writers would lock another file.
            raise AuditError(f"{self._path} was moved or replaced while this writer had it open; restart it")
        left = self._left
        if left is not None and left[:2] == (stat.st_size, stat.st_mtime_ns):
            return left[2], left[3]  # nobody wrote since we did (about 300 µs a flush saved)
        seq, digest = _read_last(self._path)
        head = _read_head(self._head_path)
        if head is not None:
            head_seq, head_hash = head
            if head_seq > seq:
                raise AuditError(
                    f"{self._path} ends at seq {seq} but the head says {head_seq} (truncated?); "
                    "run `hubd audit verify` and keep this log as evidence"
                )
            if head_seq == seq and head_hash != digest:
                raise AuditError(
                    f"{self._path}: record {seq} differs from the head's hash (rewritten?); "
                    "run `hubd audit verify` and keep this log as evidence"
                )
        return seq, digest

    def _now_text(self) -> str:
        """``format_time(now_ms())``, reusing the formatted second: formatting dominated append's cost."""
        ms = now_ms()
        second, milli = divmod(ms, 1000)
        if second != self._second:
            self._second, self._second_text = second, format_time(ms)[:-4]  # drop "mmmZ"
        return f"{self._second_text}{milli:03d}Z"

    def append(self, event: str, outcome: str = "ok", **fields: object) -> None:
        """Add one record (buffered; chained at flush). Raises ValueError for password-like fields."""
        if self._file is None:
            raise AuditError(f"{self._path} is closed")
        if not event:
            raise ValueError("an audit record needs an event")
        if fields and _check_fields(fields):
            # Records are chained at flush; snapshot containers now so later changes by the caller
            # (a reused list of DER IDs) cannot alter what is logged.
            fields = orjson.loads(orjson.dumps(fields))
        # seq and prev are placeholders here so they keep their place in the line; flush fills them in.
        record: dict[str, object] = {"seq": 0, "at": self._now_text(), "event": event, "outcome": outcome}
        record.update(fields)
        record["prev"] = ""
        self._pending.append(record)
        if len(self._pending) >= _AUTO_FLUSH_RECORDS:
            self.flush()

    def flush(self) -> None:
        """Chain and write the buffered records, then note the new end in the head file.

        The head is written after the records, so it never runs ahead of the log. On an error (such as a
        truncated log) the records stay buffered and the error is raised.
        """
        if self._file is None or not self._pending:
            return
        with self._locked():
            self._write_pending()

    def _write_pending(self) -> None:
        """Chain the buffered records onto the log's end and write them; the caller holds the lock."""
        assert self._file is not None
        seq, digest = self._read_end()
        lines: list[bytes] = []
        for record in self._pending:
            seq += 1
            record["seq"] = seq
            record["prev"] = digest
            record.pop("hash", None)  # a retry after a failed write chains afresh
            digest = _digest(record)
            record["hash"] = digest
            lines.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        self._file.write(b"".join(lines))
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self._pending.clear()
        self._write_head(seq, digest)
        stat = os.fstat(self._file.fileno())
        self._left = (stat.st_size, stat.st_mtime_ns, seq, digest)

    def _write_head(self, seq: int, digest: str) -> None:
        """Overwrite the head in place with one write of a fixed size, within the file's first sector.

        Not write-to-temp-and-rename: on ext4 a rename over an existing file forces the new file's data out
        (``auto_da_alloc``), about 3 ms a flush in the event loop, a third of its time under load. One write
        of 128 bytes at offset 0 leaves the old head or the new one, as a rename does; the padding (spaces,
        which JSON allows) keeps a shorter head from leaving the tail of a longer one behind.
        """
        text = orjson.dumps({"seq": seq, "hash": digest}).ljust(_HEAD_SIZE)
        fd = os.open(self._head_path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, text, 0)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Flush and release the file. Closing twice is harmless."""
        if self._file is None:
            return
        try:
            self.flush()
        finally:
            self._file.close()
            self._file = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verify(path: Path, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check the whole chain and the head; stop at, and name, the first bad record.

    ``progress``, if given, is called every 10,000 records with the bytes checked so far: a million records
    take seconds, and the operator at a terminal should see that it moves.
    """
    path = Path(path)
    try:
        head = _read_head(_head_path(path))
    except AuditError as exc:
        return VerifyReport(False, 0, None, str(exc))
    if not path.exists():
        return VerifyReport(False, 0, None, f"{path} does not exist")

    def bad(line_no: int, reason: str) -> VerifyReport:
        return VerifyReport(False, good, line_no, reason)

    good = 0
    line_no = 0
    prev_seq, prev_hash = 0, GENESIS_PREV
    head_line: int | None = None
    hash_at_head: str | None = None
    with path.open("rb") as file:
        for raw in file:
            line_no += 1
            record = _parse_record(raw)
            if record is None:
                try:
                    orjson.loads(raw)
                except orjson.JSONDecodeError:
                    return bad(line_no, f"line {line_no} is not valid JSON (partial write or edit?)")
                return bad(line_no, f"line {line_no} is not an audit record (no seq, prev or hash; edited?)")
            if not raw.endswith(b"\n"):
                return bad(line_no, f"line {line_no} has no line end (partial write?)")
            seq, claimed, prev = record["seq"], record.pop("hash"), record["prev"]
            where = f"record {seq} (line {line_no})"
            if _digest(record) != claimed:
                return bad(line_no, f"{where}: hash does not match its content (edited?)")
            assert isinstance(seq, int) and isinstance(claimed, str)  # _parse_record checked
            if seq != prev_seq + 1:
                if line_no == 1:
                    return bad(line_no, f"{where}: the log starts at seq {seq}, not 1 (start removed?)")
                if seq > prev_seq:
                    return bad(line_no, f"{where}: seq jumps from {prev_seq} to {seq} (record removed or reordered?)")
                return bad(line_no, f"{where}: seq goes back from {prev_seq} to {seq} (reordered or duplicated?)")
            if prev != prev_hash:
                return bad(line_no, f"{where}: prev does not match the record before (removed or reordered?)")
            good += 1
            prev_seq, prev_hash = seq, claimed
            if head is not None and seq == head[0]:
                head_line, hash_at_head = line_no, claimed
            if progress is not None and good % 10_000 == 0:
                progress(file.tell())
        if progress is not None:
            progress(file.tell())
    if line_no == 0 and head is None:
        return bad(1, f"{path} is empty (no {START_EVENT} record; truncated?)")
    if head is not None:
        head_seq, head_hash = head
        if prev_seq < head_seq:
            return bad(line_no + 1, f"file ends at seq {prev_seq} but the head says {head_seq} (truncated?)")
        if hash_at_head != head_hash:
            return bad(
                head_line or line_no,
                f"record {head_seq} (line {head_line}): hash differs from the head file's (rewritten?)",
            )
    return VerifyReport(True, good, None, "")


def _matches(record: Mapping[str, object], der_id: str | None, event: str | None) -> bool:
    if event is not None:
        name = record.get("event")
        if not isinstance(name, str):
            return False
        # Prefixes match at a dot, so "auth" finds "auth.ok" and "auth.failed" but not "authority.x".
        prefix = event if event.endswith(".") else event + "."
        if name != event and not name.startswith(prefix):
            return False
    if der_id is not None and record.get("der_id") != der_id:
        ids = record.get("der_ids")
        if not isinstance(ids, list) or der_id not in ids:
            return False
    return True


def tail(path: Path, n: int = 20, der_id: str | None = None, event: str | None = None) -> list[dict[str, object]]:
    """The last ``n`` matching records, oldest first, read from the end so a large log costs little.

    Lines that do not parse (such as a partial last line) are skipped: this is for reading, ``verify`` judges.
    """
    found: list[dict[str, object]] = []
    if n <= 0:
        return found
    with Path(path).open("rb") as file:
        for line in _lines_backward(file):
            if not line:
                continue
            record = _parse_record(line)
            if record is not None and _matches(record, der_id, event):
                found.append(record)
                if len(found) >= n:
                    break
    found.reverse()
    return found


def since(path: Path, at_ms: int) -> Iterator[dict[str, object]]:
    """The records written at or after ``at_ms``, newest first, read from the end (the status page's last hour).

    Writers in other processes may interleave a little out of order; reading stops at the first older record.
    """
    limit = format_time(at_ms)
    with Path(path).open("rb") as file:
        for line in _lines_backward(file):
            record = _parse_record(line) if line else None
            if record is None:
                continue
            if str(record.get("at", "")) < limit:
                return
            yield record
