"""Quarantine: payloads the hub could not take, kept whole with why, so nothing received is lost."""

from __future__ import annotations

import re
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
    payload BLOB NOT NULL
);
"""


# The value of any JSON key that names a password ("password", "password:PV-1", "initial_password", ...), in a
# payload that may not even parse: the string after the key, escapes included. The key's length is bounded, so a
# crafted payload cannot make the search quadratic.
_PASSWORD_VALUE = re.compile(r'("[^"\\]{0,100}password[^"\\]{0,100}"\s*:\s*)"(?:[^"\\]|\\.)*"', re.IGNORECASE)


def masked(text: str) -> str:
    """A quarantined payload as text with every password value replaced by ``***``: the payload is kept whole
    (so it can be replayed), but showing it must not show a DER's credentials."""
    return _PASSWORD_VALUE.sub(r'\1"***"', text)


class Quarantine:
    """Raw payloads with topic, time and reason, in the hub's local state file."""

    def __init__(self, path: Path) -> None:
        self._db = open_state(path, _SCHEMA)

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
    ) -> int:
        cursor = self._db.execute(
            "INSERT INTO quarantine (received_at, topic, format_code, source_id, code, reason, size, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (received_at, topic, format_code, source_id, code, reason, len(payload), payload),
        )
        return int(cursor.lastrowid or 0)

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT id, received_at, topic, format_code, source_id, code, reason, size FROM quarantine "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        names = ("id", "received_at", "topic", "format_code", "source_id", "code", "reason", "size")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def get(self, entry_id: int) -> tuple[dict[str, Any], bytes] | None:
        row = self._db.execute(
            "SELECT id, received_at, topic, format_code, source_id, code, reason, size, payload "
            "FROM quarantine WHERE id = ?",
            (entry_id,),
        ).fetchone()
        if row is None:
            return None
        names = ("id", "received_at", "topic", "format_code", "source_id", "code", "reason", "size")
        return dict(zip(names, row[:-1], strict=True)), bytes(row[-1])

    def close(self) -> None:
        self._db.close()
