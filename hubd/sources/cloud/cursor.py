"""What a cloud source remembers across restarts, in the state file (``hub.sqlite3``), in tables of its own.

``cloud_cursor``: per (source, site), the end of the last window whose readings the store committed; collection
resumes there (less the look-back). It moves only after the commit, so a crash repeats at most one window,
which the idempotent store takes again without a duplicate, and never skips one.
``cloud_budget``: requests made per source and UTC day, so a restart does not hand out the day's budget again.
"""

from __future__ import annotations

from pathlib import Path

from hubd.model import now_ms
from hubd.state import open_state

SCHEMA = """
CREATE TABLE IF NOT EXISTS cloud_cursor (
    source TEXT NOT NULL,
    site TEXT NOT NULL,
    committed_until INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (source, site)
);
CREATE TABLE IF NOT EXISTS cloud_budget (
    source TEXT NOT NULL,
    day TEXT NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (source, day)
);
"""


class CloudState:
    """Cursors and request budgets of the cloud sources."""

    def __init__(self, path: Path) -> None:
        self._db = open_state(path, SCHEMA)

    def close(self) -> None:
        self._db.close()

    def cursor(self, source: str, site: str) -> int | None:
        row = self._db.execute(
            "SELECT committed_until FROM cloud_cursor WHERE source = ? AND site = ?", (source, site)
        ).fetchone()
        return None if row is None else int(row[0])

    def advance(self, source: str, site: str, until_ms: int) -> None:
        """Move the cursor forward (never back: a look-back re-read ends before it)."""
        self._db.execute(
            "INSERT INTO cloud_cursor VALUES (?, ?, ?, ?) ON CONFLICT (source, site) DO UPDATE SET "
            "committed_until = max(committed_until, excluded.committed_until), updated_at = excluded.updated_at",
            (source, site, until_ms, now_ms()),
        )

    def used(self, source: str, day: str) -> int:
        row = self._db.execute("SELECT used FROM cloud_budget WHERE source = ? AND day = ?", (source, day)).fetchone()
        return 0 if row is None else int(row[0])

    def spend(self, source: str, day: str) -> int:
        """Count one request against the day's budget; the count after it."""
        self._db.execute(
            "INSERT INTO cloud_budget VALUES (?, ?, 1) ON CONFLICT (source, day) DO UPDATE SET used = used + 1",
            (source, day),
        )
        self._db.execute("DELETE FROM cloud_budget WHERE source = ? AND day < date(?, '-7 days')", (source, day))
        return self.used(source, day)
