"""Quarantine: messages the hub could not take, kept with why, so nothing received is lost.

A payload is kept up to ``limits.quarantine_max_bytes`` (its first bytes), with its full size and the SHA-256 of
the whole: a payload of 200 MiB, kept whole, made a 200 MiB row, and 14 such messages grew ``hub.sqlite3`` by
495 MiB. The prefix shows what was sent; the size and the hash say whether a copy found elsewhere is the same.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubd.state import open_state

_SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at INTEGER NOT NULL,
    topic TEXT NOT NULL,
    format_code TEXT NOT NULL,
    source_id TEXT,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL,
    sha256 TEXT
);
"""
# A column added since the table was first made, and its type: an older hub.sqlite3 gets it when opened. Rows
# from before have no sha256 (NULL); they were kept whole, so their hash is that of their payload.
_ADDED_COLUMNS = {"sha256": "TEXT"}

DEFAULT_MAX_BYTES = 64 * 1024


# The value of any JSON key that names a password ("password", "password:PV-1", "initial_password", ...), in a
# payload that may not even parse: the string after the key, escapes included. The key's length is bounded, so a
# crafted payload cannot make the search quadratic.
_PASSWORD_VALUE = re.compile(r'("[^"\\]{0,100}password[^"\\]{0,100}"\s*:\s*)"(?:[^"\\]|\\.)*"', re.IGNORECASE)


def masked(text: str) -> str:
    """A quarantined payload as text with every password value replaced by ``***``: the payload is kept whole
    (so it can be replayed), but showing it must not show a DER's credentials."""
    return _PASSWORD_VALUE.sub(r'\1"***"', text)


@dataclass(frozen=True, slots=True)
class Entry:
    """What the quarantine kept of one payload: its entry id, the bytes kept (its first ones) and its hash."""

    id: int
    kept: int
    sha256: str


class Quarantine:
    """Raw payloads (up to ``max_bytes`` of each) with topic, time and reason, in the hub's local state file."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._db = open_state(path, _SCHEMA)
        self._max_bytes = max_bytes
        _add_missing_columns(self._db)

    def add(
        self,
        *,
        received_at: int,
        topic: str,
        format_code: str,
        source_id: str | None,
        code: str,
        reason: str,
        payload: bytes,
    ) -> Entry:
        """Keep the payload's first ``max_bytes``, its full size and the SHA-256 of the whole."""
        kept = payload[: self._max_bytes]
        digest = hashlib.sha256(payload).hexdigest()
        cursor = self._db.execute(
            "INSERT INTO quarantine (received_at, topic, format_code, source_id, code, reason, size, payload, sha256) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (received_at, topic, format_code, source_id, code, reason, len(payload), kept, digest),
        )
        return Entry(int(cursor.lastrowid or 0), len(kept), digest)

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest entries' details; ``kept`` is the bytes kept, fewer than ``size`` when the payload was cut."""
        rows = self._db.execute(
            "SELECT id, received_at, topic, format_code, source_id, code, reason, size, length(payload) "
            "FROM quarantine ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        names = ("id", "received_at", "topic", "format_code", "source_id", "code", "reason", "size", "kept")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def get(self, entry_id: int) -> tuple[dict[str, Any], bytes] | None:
        """One entry's details (as ``list``'s, with ``sha256``) and the bytes kept."""
        row = self._db.execute(
            "SELECT id, received_at, topic, format_code, source_id, code, reason, size, sha256, payload "
            "FROM quarantine WHERE id = ?",
            (entry_id,),
        ).fetchone()
        if row is None:
            return None
        names = ("id", "received_at", "topic", "format_code", "source_id", "code", "reason", "size", "sha256")
        meta = dict(zip(names, row[:-1], strict=True))
        payload = bytes(row[-1])
        meta["kept"] = len(payload)
        if meta["sha256"] is None and len(payload) == meta["size"]:  # kept whole before the column was added
            meta["sha256"] = hashlib.sha256(payload).hexdigest()
        return meta, payload

    def close(self) -> None:
        self._db.close()


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a quarantine table made by an older hubd up to date, so its hub.sqlite3 still opens. Looked at again
    inside a write transaction: the daemon and an operator's command may open the file at the same moment."""

    def missing() -> list[str]:
        present = {row[1] for row in db.execute("PRAGMA table_info(quarantine)")}
        return [name for name in _ADDED_COLUMNS if name not in present]

    if not missing():
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        for name in missing():
            db.execute(f"ALTER TABLE quarantine ADD COLUMN {name} {_ADDED_COLUMNS[name]}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
