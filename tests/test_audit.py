"""Tests of the audit trail: the chain holds, and every kind of tampering is caught at the right line."""

from __future__ import annotations

import fcntl
import hashlib
from itertools import pairwise
from pathlib import Path

import orjson
import pytest

from hubd import audit
from hubd.audit import AuditError, AuditLog, tail, verify
from hubd.model import format_time

ZERO = "0" * 64


def write_log(path: Path, count: int = 8) -> None:
    """A closed log: the genesis record plus ``count`` records (seq 2..count+1) about der-1, der-2, ..."""
    log = AuditLog(path)
    for i in range(1, count + 1):
        log.append("store", der_id=f"der-{i}", rows=i)
    log.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def records(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in lines(path)]


def canonical_hash(record: dict[str, object]) -> str:
    """The hash as the spec defines it, computed independently of the module."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def test_good_log_verifies_and_follows_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"  # parent created on open
    write_log(path, 8)
    report = verify(path)
    assert report.ok, report.reason
    assert (report.records, report.bad_line, report.reason) == (9, None, "")

    recs = records(path)
    assert recs[0]["event"] == "audit.start"
    assert recs[0]["prev"] == ZERO
    assert [r["seq"] for r in recs] == list(range(1, 10))
    for before, record in pairwise(recs):
        assert record["prev"] == before["hash"]
    for record in recs:
        assert record["hash"] == canonical_hash(record)
    assert recs[3]["der_id"] == "der-3" and recs[3]["outcome"] == "ok"
    assert str(recs[3]["at"]).endswith("Z")

    head = orjson.loads(audit._head_path(path).read_bytes())
    assert head == {"seq": 9, "hash": recs[-1]["hash"]}
    assert not list(tmp_path.rglob("*.tmp"))


def test_edited_field_value_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    data = lines(path)
    assert b'"der-3"' in data[3]
    data[3] = data[3].replace(b'"der-3"', b'"der-X"')
    path.write_bytes(b"".join(data))

    report = verify(path)
    assert not report.ok
    assert report.bad_line == 4
    assert report.records == 3
    assert report.reason == "record 4 (line 4): hash does not match its content (edited?)"


def test_edit_with_recomputed_hash_breaks_the_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    recs = records(path)
    recs[3]["rows"] = 999  # forge and re-hash one record; the next one still points at the original
    recs[3]["hash"] = canonical_hash(recs[3])
    path.write_bytes(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in recs))

    report = verify(path)
    assert not report.ok
    assert report.bad_line == 5
    assert report.reason == "record 5 (line 5): prev does not match the record before (removed or reordered?)"


def test_deleted_middle_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    data = lines(path)
    del data[4]  # seq 5
    path.write_bytes(b"".join(data))

    report = verify(path)
    assert not report.ok
    assert report.bad_line == 5
    assert "seq jumps from 4 to 6" in report.reason


def test_swapped_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    data = lines(path)
    data[5], data[6] = data[6], data[5]
    path.write_bytes(b"".join(data))

    report = verify(path)
    assert not report.ok
    assert report.bad_line == 6
    assert "record 7 (line 6): seq jumps from 5 to 7" in report.reason


def test_cut_last_lines_is_caught_by_the_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    data = lines(path)
    path.write_bytes(b"".join(data[:-3]))  # the chain alone is still valid

    report = verify(path)
    assert not report.ok
    assert report.bad_line == 7
    assert report.records == 6
    assert report.reason == "file ends at seq 6 but the head says 9 (truncated?)"

    # Reopening must not paper over the cut by rewriting the head.
    with pytest.raises(AuditError, match="truncated"):
        AuditLog(path)
    assert not verify(path).ok


def test_consistent_rewrite_is_caught_by_the_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    recs = records(path)
    recs[4]["rows"] = 999  # forge a record and re-chain everything after it
    for i in range(4, len(recs)):
        recs[i]["prev"] = recs[i - 1]["hash"]
        recs[i]["hash"] = canonical_hash(recs[i])
    path.write_bytes(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in recs))

    report = verify(path)
    assert not report.ok
    assert report.bad_line == 9
    assert "differs from the head" in report.reason
    with pytest.raises(AuditError, match="rewritten"):
        AuditLog(path)


def test_missing_head_still_checks_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    audit._head_path(path).unlink()
    assert verify(path) == audit.VerifyReport(True, 9, None, "")

    data = lines(path)
    data[2] = data[2].replace(b'"rows":2', b'"rows":3')
    path.write_bytes(b"".join(data))
    report = verify(path)
    assert not report.ok and report.bad_line == 3


def test_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 4)
    with path.open("ab") as file:
        file.write(b'{"seq":6,"at":"2026-')

    report = verify(path)
    assert not report.ok
    assert report.bad_line == 6
    assert report.records == 5
    assert report.reason == "line 6 is not valid JSON (partial write or edit?)"
    with pytest.raises(AuditError, match="line 6"):
        AuditLog(path)


def test_corrupt_complete_last_line_refuses_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 4)
    with path.open("ab") as file:
        file.write(b"not json\n")
    with pytest.raises(AuditError, match="line 6"):
        AuditLog(path)


def test_passwords_are_refused_and_leave_no_trace(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    secrets: list[dict[str, object]] = [
        {"password": "hunter2"},
        {"initial_password": "hunter2"},
        {"new_Password": "hunter2"},
        {"detail": {"der": "der-1", "password": "hunter2"}},
        {"items": [{"der_id": "der-1", "der_password": "hunter2"}]},
    ]
    for fields in secrets:
        with pytest.raises(ValueError, match="password"):
            log.append("password.issue", "ok", **fields)
    log.append("password.issue", der_id="der-1")
    log.close()

    assert b"hunter2" not in path.read_bytes()
    assert [r["seq"] for r in records(path)] == [1, 2]  # refused appends used no seq
    assert verify(path).ok


def test_reserved_and_non_json_fields_are_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError, match="prev"):
        log.append("store", prev=ZERO)
    with pytest.raises(TypeError, match="set"):
        log.append("store", der_ids={"der-1"})
    deep: object = 1
    for _ in range(5000):  # a request's conditions can be nested this deep: refused, never a RecursionError
        deep = [{"a": deep}]
    with pytest.raises(TypeError, match="conditions is nested deeper than 64 levels"):
        log.append("query.received", conditions={"a": deep})
    log.append("query.received", conditions={"a": [{"a": 1}] * 3})  # a few levels are fine
    log.close()
    assert verify(log.path).records == 2


def test_reopen_continues_the_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_LAST_CHUNK", 16)  # the last record spans several reads from the end
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    last = records(path)[-1]

    log = AuditLog(path)
    log.append("query", requester="ops", count=2)
    log.close()

    recs = records(path)
    assert [r["event"] for r in recs].count("audit.start") == 1
    assert recs[-1]["seq"] == 5
    assert recs[-1]["prev"] == last["hash"]
    assert verify(path).ok


def test_two_writers_share_one_chain(tmp_path: Path) -> None:
    """The daemon and an operator's CLI may hold the log at once; their records interleave on one chain."""
    path = tmp_path / "audit.jsonl"
    daemon = AuditLog(path)
    cli = AuditLog(path)  # sees the daemon's genesis record, writes none of its own
    daemon.append("receive", source="mqtt:a")
    cli.append("password.reset", der_id="der-1", by="operator")
    cli.flush()
    daemon.flush()
    daemon.append("store", der_ids=["der-1"])
    cli.close()
    daemon.close()

    recs = records(path)
    assert [r["event"] for r in recs] == ["audit.start", "password.reset", "receive", "store"]
    assert verify(path) == audit.VerifyReport(True, 4, None, "")


def test_stuck_lock_keeps_records_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_LOCK_TIMEOUT_S", 0.02)
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("send", requester="ops")
    with path.open("ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(AuditError, match="locked"):
            log.flush()
    log.close()  # the lock is free again: the buffered record is written
    assert [r["event"] for r in records(path)] == ["audit.start", "send"]
    assert verify(path).ok


def test_records_are_buffered_until_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    ids = ["der-1", "der-2"]
    log.append("receive", source="mqtt:a", der_ids=ids)
    ids.append("der-3")  # the caller reuses its list before the flush: the record must not change
    assert len(lines(path)) == 1
    log.flush()
    assert len(lines(path)) == 2
    assert records(path)[1]["der_ids"] == ["der-1", "der-2"]
    assert verify(path).ok

    monkeypatch.setattr(audit, "_AUTO_FLUSH_RECORDS", 3)
    for _ in range(4):
        log.append("receive", source="mqtt:a", count=3)
    assert len(lines(path)) == 5  # a full buffer writes itself
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append("receive")
    assert verify(path).records == 6


def test_truncation_while_open_stops_writing(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        log.append("store", der_id=f"der-{i}")
    log.flush()
    path.write_bytes(b"".join(lines(path)[:2]))
    log.append("store", der_id="der-9")
    with pytest.raises(AuditError, match="truncated"):
        log.flush()  # writing on would move the head back and hide the cut
    with pytest.raises(AuditError, match="truncated"):
        log.close()  # still refuses, but lets go of the file
    assert verify(path).reason == "file ends at seq 2 but the head says 4 (truncated?)"


def test_record_time_is_the_hubs_utc_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    times = iter([1_795_000_000_000, 1_795_000_000_001, 1_795_000_000_999, 1_795_000_001_005, 1_795_086_400_042])
    monkeypatch.setattr(audit, "now_ms", lambda: next(times))
    log = AuditLog(tmp_path / "audit.jsonl")
    for _ in range(4):
        log.append("send", requester="ops")
    log.close()
    expected = [1_795_000_000_000, 1_795_000_000_001, 1_795_000_000_999, 1_795_000_001_005, 1_795_086_400_042]
    assert [r["at"] for r in records(log.path)] == [format_time(ms) for ms in expected]


def test_tail_filters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_CHUNK", 64)  # force reads across block boundaries
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("auth.ok", der_id="der-1")
    log.append("auth.failed", "failed", der_id="der-2")
    log.append("authority.change", der_id="der-1")
    log.append("store", der_ids=["der-1", "der-3"], rows=2)
    log.append("store", der_ids=["der-2"], rows=1)
    log.append("query", requester="ops", der_id="der-3")
    log.close()

    assert [r["seq"] for r in tail(path)] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["seq"] for r in tail(path, n=2)] == [6, 7]
    assert tail(path, n=0) == []
    assert [r["event"] for r in tail(path, event="auth")] == ["auth.ok", "auth.failed"]
    assert [r["event"] for r in tail(path, event="auth.failed")] == ["auth.failed"]
    assert [r["seq"] for r in tail(path, der_id="der-1")] == [2, 4, 5]
    assert [r["seq"] for r in tail(path, der_id="der-3")] == [5, 7]
    assert [r["seq"] for r in tail(path, n=1, der_id="der-2", event="store")] == [6]
    assert tail(path, der_id="der-9") == []

    with path.open("ab") as file:
        file.write(b'{"seq":8,"ev')  # a partial last line does not hide the records before it
    assert [r["seq"] for r in tail(path, n=1)] == [7]


def test_an_empty_head_counts_as_none_and_is_written_again(tmp_path: Path) -> None:
    """A crash between creating the head file and its first write must not keep the hub from starting."""
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    head = path.with_name(path.name + ".head")
    head.write_bytes(b"")
    with AuditLog(path) as log:
        log.append("x.y")
        log.flush()
    assert verify(path).ok
    assert orjson.loads(head.read_bytes())["seq"] == len(lines(path))


def test_a_log_replaced_under_a_writer_is_refused_not_written_past(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("x.y")
    log.flush()
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(path.read_bytes())
    copy.replace(path)  # the same records, another file (as a restore from backup or a rotation would do)
    log.append("x.z")
    with pytest.raises(AuditError, match="moved or replaced"):
        log.flush()
    assert b"x.z" not in path.read_bytes()
