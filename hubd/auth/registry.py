"""The registry of principals: DERs (with their state of registration) and systems (gateways, consumers).

It lives in the hub's local SQLite state file whatever the readings backend is, so the operator CLI and the
daemon share it; the daemon notices the CLI's changes through SQLite's ``data_version``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from hubd.model import CONTROL_CHARACTERS, DER_TYPES, ErrorCode, HubError
from hubd.state import open_state

DerStatus = Literal["allowed", "registered", "revoked"]
SystemRole = Literal["gateway", "consumer", "viewer", "planner"]  # viewer: the status page only; planner: plans
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")  # \Z: "$" would let a trailing newline in

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ders (
    der_id TEXT PRIMARY KEY,
    type TEXT NOT NULL DEFAULT 'other',
    name TEXT, maker TEXT, model TEXT, capacity_kw REAL,
    lat REAL, lon REAL, area TEXT,
    status TEXT NOT NULL,
    password_hash TEXT,
    added_at INTEGER NOT NULL,
    registered_at INTEGER
);
CREATE TABLE IF NOT EXISTS systems (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    status TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    added_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS broker_credentials (
    principal TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS gateway_ders (
    gateway TEXT NOT NULL,
    der_id TEXT NOT NULL,
    PRIMARY KEY (gateway, der_id)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Der:
    der_id: str
    type: str
    name: str | None
    maker: str | None
    model: str | None
    capacity_kw: float | None
    lat: float | None
    lon: float | None
    area: str | None
    status: DerStatus
    password_hash: str | None
    added_at: int
    registered_at: int | None
    serial: str | None = None  # what the device itself reports (SunSpec's common model, a register map's info)
    version: str | None = None

    def public(self) -> dict[str, Any]:
        """Everything but the password hash, for listings and answers."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "password_hash"}


@dataclass(frozen=True, slots=True)
class System:
    name: str
    role: SystemRole
    status: Literal["active", "revoked"]
    password_hash: str
    added_at: int

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "status": self.status, "added_at": self.added_at}


DER_METADATA = ("type", "name", "maker", "model", "capacity_kw", "lat", "lon", "area")


def check_id(value: object, what: str = "der_id") -> str:
    """A principal id: 1-64 characters of letters, digits and ``._:-``; the same rule for wire and CLI."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise HubError(ErrorCode.BAD_REQUEST, f"{what} must be 1-64 characters of letters, digits and ._:-")
    return value


def check_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Validate DER metadata (type, name, location...) and drop absent values."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if value is None or value == "":
            continue
        if key == "type":
            if value not in DER_TYPES:
                raise HubError(ErrorCode.BAD_REQUEST, f"type must be one of {', '.join(DER_TYPES)}")
        elif key in ("capacity_kw", "lat", "lon"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise HubError(ErrorCode.BAD_REQUEST, f"{key} must be a number")
            value = float(value)
            limit = {"lat": 90.0, "lon": 180.0}.get(key)
            if (limit is not None and not -limit <= value <= limit) or not math.isfinite(value):
                raise HubError(ErrorCode.BAD_REQUEST, f"{key} is out of range")
            if key == "capacity_kw" and value < 0:
                raise HubError(ErrorCode.BAD_REQUEST, "capacity_kw must not be negative")
        elif key in ("name", "maker", "model", "area"):
            # No control characters: a newline in an area added a forged row to ``hubd der list``.
            if not isinstance(value, str) or len(value) > 200 or CONTROL_CHARACTERS.search(value):
                reason = f"{key} must be a string of at most 200 characters without control characters"
                raise HubError(ErrorCode.BAD_REQUEST, reason)
        else:
            raise HubError(ErrorCode.BAD_REQUEST, f"unknown DER attribute {key!r}")
        out[key] = value
    return out


class Registry:
    """DERs and systems in SQLite. Each method is one short transaction."""

    def __init__(self, path: Path) -> None:
        self._db = open_state(path, _SCHEMA)
        self._db.row_factory = sqlite3.Row
        _add_columns(self._db, "ders", {"serial": "TEXT", "version": "TEXT"})

    def close(self) -> None:
        self._db.close()

    def data_version(self) -> int:
        """Changes whenever another connection (the operator CLI) commits to this file."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    # -- DERs -------------------------------------------------------------------------------------------

    def ders(self) -> dict[str, Der]:
        return {row["der_id"]: Der(**dict(row)) for row in self._db.execute("SELECT * FROM ders")}

    def der(self, der_id: str) -> Der | None:
        row = self._db.execute("SELECT * FROM ders WHERE der_id = ?", (der_id,)).fetchone()
        return Der(**dict(row)) if row else None

    def add_der(self, der_id: str, now: int, meta: dict[str, Any]) -> Der:
        """Pre-register (allowlist) a DER; adding an existing one updates its metadata only."""
        check_id(der_id)
        meta = check_metadata(meta)
        self._db.execute(
            "INSERT INTO ders (der_id, status, added_at) VALUES (?, 'allowed', ?) ON CONFLICT DO NOTHING",
            (der_id, now),
        )
        if meta:
            sets = ", ".join(f"{key} = ?" for key in meta)
            self._db.execute(f"UPDATE ders SET {sets} WHERE der_id = ?", (*meta.values(), der_id))
        der = self.der(der_id)
        assert der is not None
        return der

    def describe(self, der_id: str, reported: dict[str, str]) -> dict[str, str]:
        """Record what a device reports of itself (maker, model, serial, version) on its DER; what changed.

        The serial number and version are the device's to say; maker and model fill only what the operator
        left empty, as a registering DER's metadata does (``claim``)."""
        der = self.der(der_id)
        if der is None:
            return {}
        wanted = {key: value[:200] for key, value in reported.items() if key in ("maker", "model", "serial", "version")}
        wanted = {key: CONTROL_CHARACTERS.sub("", value) for key, value in wanted.items()}
        changed = {
            key: value
            for key, value in wanted.items()
            if value and getattr(der, key) != value and (key in ("serial", "version") or getattr(der, key) is None)
        }
        if changed:
            sets = ", ".join(f"{key} = ?" for key in changed)
            self._db.execute(f"UPDATE ders SET {sets} WHERE der_id = ?", (*changed.values(), der_id))
        return changed

    def import_ders(self, rows: Iterable[dict[str, Any]], now: int) -> int:
        """Add many DERs in one transaction; a bad row aborts all, naming its line."""
        count = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for line, row in enumerate(rows, start=2):
                try:
                    der_id = row.pop("der_id", None)
                    self.add_der(check_id(der_id), now, row)
                except HubError as exc:
                    raise HubError(exc.code, f"line {line}: {exc.message}") from None
                count += 1
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return count

    def claim(self, der_id: str, password_hash: str, now: int, meta: dict[str, Any], create: bool) -> bool:
        """Issue a unique password to an ``allowed`` DER (or a new one when ``create``), atomically.

        Returns False when the DER is not in the ``allowed`` state any more, so two racing registrations
        cannot both get a password.
        """
        if create:
            self._db.execute(
                "INSERT INTO ders (der_id, status, added_at) VALUES (?, 'allowed', ?) ON CONFLICT DO NOTHING",
                (der_id, now),
            )
        # Metadata from the DER fills what the operator left empty; the operator's values win.
        # (type is never empty: 'other' until someone says better.)
        fills = ", ".join(
            f"{key} = CASE WHEN {key} = 'other' THEN ? ELSE {key} END"
            if key == "type"
            else f"{key} = coalesce({key}, ?)"
            for key in meta
        )
        sql = (
            "UPDATE ders SET status = 'registered', password_hash = ?, registered_at = ?"
            + (f", {fills}" if fills else "")
            + " WHERE der_id = ? AND status = 'allowed'"
        )
        cursor = self._db.execute(sql, (password_hash, now, *meta.values(), der_id))
        return cursor.rowcount == 1

    def unclaim(self, der_id: str, password_hash: str, delete: bool) -> bool:
        """Undo ``claim`` of this very password (its answer never reached the DER): the DER is ``allowed`` again,
        or gone when the claim created it. False when the DER has moved on since (rotated, revoked)."""
        if delete:
            sql = "DELETE FROM ders WHERE der_id = ? AND password_hash = ? AND status = 'registered'"
        else:
            sql = (
                "UPDATE ders SET status = 'allowed', password_hash = NULL, registered_at = NULL "
                "WHERE der_id = ? AND password_hash = ? AND status = 'registered'"
            )
        return self._db.execute(sql, (der_id, password_hash)).rowcount == 1

    def set_der_password(self, der_id: str, password_hash: str | None, status: DerStatus) -> bool:
        cursor = self._db.execute(
            "UPDATE ders SET password_hash = ?, status = ?, "
            "registered_at = CASE WHEN ? = 'allowed' THEN NULL ELSE registered_at END WHERE der_id = ?",
            (password_hash, status, status, der_id),
        )
        return cursor.rowcount == 1

    # -- systems ----------------------------------------------------------------------------------------

    def systems(self) -> dict[str, System]:
        return {row["name"]: System(**dict(row)) for row in self._db.execute("SELECT * FROM systems")}

    def add_system(self, name: str, role: SystemRole, password_hash: str, now: int) -> None:
        check_id(name, "system name")
        try:
            self._db.execute(
                "INSERT INTO systems (name, role, status, password_hash, added_at) VALUES (?, ?, 'active', ?, ?)",
                (name, role, password_hash, now),
            )
        except sqlite3.IntegrityError:
            raise HubError(ErrorCode.ALREADY_REGISTERED, f"system {name!r} exists already") from None

    def revoke_system(self, name: str) -> bool:
        cursor = self._db.execute("UPDATE systems SET status = 'revoked' WHERE name = ?", (name,))
        return cursor.rowcount == 1

    # -- the broker's copy of passwords (hubd.auth.dynsec) -------------------------------------------------

    def broker_records(self) -> dict[str, dict[str, Any]]:
        """Each principal's broker password as the broker's plugin stores it (a salted PBKDF2 hash), by
        ``der:<id>`` or ``system:<name>``: what rebuilds the plugin's file without any password in plain text."""
        rows = self._db.execute("SELECT principal, record FROM broker_credentials")
        return {principal: json.loads(record) for principal, record in rows}

    def set_broker_record(self, principal: str, record: dict[str, Any] | None) -> None:
        if record is None:
            self._db.execute("DELETE FROM broker_credentials WHERE principal = ?", (principal,))
        else:
            self._db.execute(
                "INSERT INTO broker_credentials (principal, record) VALUES (?, ?) "
                "ON CONFLICT (principal) DO UPDATE SET record = excluded.record",
                (principal, json.dumps(record)),
            )

    # -- gateways' DERs ---------------------------------------------------------------------------------

    def bindings(self) -> dict[str, frozenset[str]]:
        """The DERs each gateway may write readings for (docs/protocol.md, Authentication)."""
        bound: dict[str, set[str]] = {}
        for gateway, der_id in self._db.execute("SELECT gateway, der_id FROM gateway_ders"):
            bound.setdefault(gateway, set()).add(der_id)
        return {gateway: frozenset(ders) for gateway, ders in bound.items()}

    def bind(self, gateway: str, der_ids: Iterable[str], bound: bool = True) -> int:
        """Let ``gateway`` write these DERs' readings (``bound``), or no longer; how many changed.

        Only a gateway system may be bound, and only to DERs the registry knows; one unknown name changes
        nothing."""
        system = self._db.execute("SELECT role FROM systems WHERE name = ?", (gateway,)).fetchone()
        if system is None or system["role"] != "gateway":
            reason = f"{gateway!r} is not a gateway system (hubd system add NAME --role gateway)"
            raise HubError(ErrorCode.BAD_REQUEST, reason)
        der_ids = list(der_ids)
        known = {row[0] for row in self._db.execute("SELECT der_id FROM ders")}
        unknown = [der_id for der_id in der_ids if der_id not in known]
        if unknown:
            raise HubError(ErrorCode.UNKNOWN_DER, f"unknown DER {', '.join(unknown[:5])}: add it first (hubd der add)")
        sql = (
            "INSERT INTO gateway_ders (gateway, der_id) VALUES (?, ?) ON CONFLICT DO NOTHING"
            if bound
            else "DELETE FROM gateway_ders WHERE gateway = ? AND der_id = ?"
        )
        self._db.execute("BEGIN IMMEDIATE")
        try:
            changed = sum(self._db.execute(sql, (gateway, der_id)).rowcount for der_id in der_ids)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return changed


def _add_columns(db: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    """Bring a state file made by an earlier hubd up to date: add the columns it does not have yet."""
    present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    for name, kind in columns.items():
        if name not in present:
            try:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as exc:  # another opener added it a moment ago
                if "duplicate column" not in str(exc):
                    raise


def read_der_csv(path: Path) -> list[dict[str, Any]]:
    """Read an allowlist CSV with a header naming ``der_id`` and any of the DER attributes."""
    try:
        return _read_der_csv(path)
    except (UnicodeDecodeError, csv.Error) as exc:  # a spreadsheet's binary file given by mistake, say
        raise HubError(ErrorCode.BAD_REQUEST, f"{path}: not a CSV file of UTF-8 text ({exc})") from None


def _read_der_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "der_id" not in reader.fieldnames:
            raise HubError(ErrorCode.BAD_REQUEST, f"{path}: the header must name a der_id column")
        unknown = set(reader.fieldnames) - {"der_id", *DER_METADATA}
        if unknown:
            raise HubError(ErrorCode.BAD_REQUEST, f"{path}: unknown columns {', '.join(sorted(unknown))}")
        rows = []
        for row in reader:
            clean: dict[str, Any] = {k: (v.strip() if v else None) for k, v in row.items()}
            for key in ("capacity_kw", "lat", "lon"):
                if clean.get(key):
                    try:
                        clean[key] = float(clean[key])
                    except ValueError:
                        raise HubError(
                            ErrorCode.BAD_REQUEST, f"{path}: line {reader.line_num}: {key} is not a number"
                        ) from None
            rows.append(clean)
        return rows
