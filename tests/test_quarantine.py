"""The quarantine keeps a bounded prefix of a payload with its size and hash, and opens a file made before."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from helpers import last_seq, quarantined, quarantined_bytes, records, rr_bytes

from hubd.cli import main as hubd_main
from hubd.quarantine import Quarantine

# The table as hubd made it before it kept the payload's hash: every payload whole.
_OLD_SCHEMA = """
CREATE TABLE quarantine (
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


def test_a_cut_payload_shows_its_prefix_size_and_hash(hub_factory: Any, tmp_path: Path) -> None:
    hub = hub_factory(limits={"quarantine_max_bytes": 1024})
    since = last_seq(hub)
    payload = b"not json " + bytes(range(256)) * 400  # 102,409 bytes
    answer = rr_bytes(hub, f"{hub.prefix}/data", payload, tmp_path)
    assert answer["error"]["code"] == "decode_error"
    digest = hashlib.sha256(payload).hexdigest()

    (record,) = records(hub, "data.quarantined", since)
    assert (record["size"], record["kept"], record["sha256"]) == (len(payload), 1024, digest)
    entry = quarantined(hub)[str(record["quarantine_id"])]
    assert entry["size"] == f"{len(payload)} B, cut to 1024"

    shown = hub.cli("quarantine", "show", entry["id"])
    assert shown.exit_code == 0, shown.output
    meta = json.loads(shown.output[: shown.output.index("\n}\n") + 2])
    assert (meta["size"], meta["kept"], meta["sha256"]) == (len(payload), 1024, digest)
    assert f"The payload was cut: its first 1024 of {len(payload)} bytes are kept" in shown.output
    assert quarantined_bytes(hub, entry["id"]) == payload[:1024]  # --raw: the bytes kept

    # A payload within the limit is kept whole, and says nothing of cutting.
    whole = b"not json either"
    assert hub.rr(f"{hub.prefix}/data", whole)["error"]["code"] == "decode_error"
    (_, record) = records(hub, "data.quarantined", since)
    assert quarantined(hub)[str(record["quarantine_id"])]["size"] == f"{len(whole)} B"
    shown = hub.cli("quarantine", "show", str(record["quarantine_id"]))
    assert "was cut" not in shown.output and hashlib.sha256(whole).hexdigest() in shown.output


def test_a_quarantine_table_made_before_is_upgraded_when_opened(tmp_path: Path) -> None:
    config = tmp_path / "hubd.yaml"
    config.write_text("data_dir: data\n", encoding="utf-8")
    state = tmp_path / "data" / "hub.sqlite3"
    state.parent.mkdir(mode=0o700)
    old_payload = b'{"readings": "x' + b"y" * 100_000  # kept whole, as hubd did then
    with sqlite3.connect(state) as db:
        db.executescript(_OLD_SCHEMA)
        db.execute(
            "INSERT INTO quarantine (received_at, topic, format_code, source_id, code, reason, size, payload) "
            "VALUES (1748736000000, 'hub/v1/data', 'hub.v1', NULL, 'decode_error', 'not JSON', ?, ?)",
            (len(old_payload), old_payload),
        )
    db.close()

    def cli(*args: str) -> Any:
        return CliRunner().invoke(hubd_main, ["--config", str(config), "quarantine", *args])

    listed = cli("list")
    assert listed.exit_code == 0, listed.output
    assert f"\t{len(old_payload)} B\tnot JSON" in listed.output  # whole, not cut
    shown = cli("show", "1")
    assert shown.exit_code == 0, shown.output
    assert hashlib.sha256(old_payload).hexdigest() in shown.output  # the hash of a whole payload, computed
    assert cli("show", "1", "--raw").stdout_bytes == old_payload

    with sqlite3.connect(state) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(quarantine)")]
    db.close()
    assert columns[-1] == "sha256"
    # The upgraded table takes new entries, cut as configured, and opening it again changes nothing.
    store = Quarantine(state, max_bytes=1024)
    entry = store.add(
        received_at=1748736060000,
        topic="hub/v1/data",
        format_code="hub.v1",
        source_id=None,
        code="decode_error",
        reason="not JSON",
        payload=old_payload,
    )
    store.close()
    store = Quarantine(state)
    found = store.get(entry.id)
    store.close()
    assert found is not None
    meta, kept = found
    assert (meta["size"], meta["kept"], meta["sha256"]) == (len(old_payload), 1024, entry.sha256)
    assert kept == old_payload[:1024]
