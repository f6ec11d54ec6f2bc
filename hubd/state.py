"""The hub's local state file (``hub.sqlite3``): the registry and the quarantine live there whatever the
readings backend is, and the operator CLI opens it beside the daemon, so every opener uses the same settings."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_state(path: Path, schema: str) -> sqlite3.Connection:
    """Open (creating if needed) the state file in WAL mode, waiting up to 10 s for another writer."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds hashes and quarantined payloads
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA busy_timeout=10000")
    db.executescript(schema)
    return db
