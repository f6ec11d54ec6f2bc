"""A cloud that pushes: ``POST /v1/push/<site>`` on the cloud source's own listener, with the source's token,
answered only after the store committed, with the protocol's error codes and matching HTTP statuses."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers import records
from test_cloud_source import API_KEY, hubs_with, stored, write_key

from hubd.broker import EmbeddedBroker, free_port
from hubd.model import parse_time
from hubd.sources.cloud.simulate import CloudThread, SimulatedCloud

TOKEN = "push-token-5d1e"
BODY = {
    "power": {
        "timeUnit": "QUARTER_OF_AN_HOUR",
        "unit": "W",
        "values": [
            {"date": "2026-11-27 12:00:00", "value": 1500},
            {"date": "2026-11-27 12:15:00", "value": 1620.5},
        ],
    }
}


def post(port: int, site: str, body: bytes, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/push/{site}", data=body, method="POST")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


@pytest.fixture
def pushed(tmp_path: Path, broker: EmbeddedBroker) -> Any:
    """A hub with a cloud source that takes pushes (and polls a simulated cloud that has nothing new)."""
    (tmp_path / "push.token").write_text(TOKEN + "\n")
    port = free_port()
    make = hubs_with(tmp_path, broker)
    with CloudThread(SimulatedCloud(["1001"], api_key=API_KEY)) as cloud:
        source = {
            "kind": "cloud",
            "name": "se",
            "profile": "solaredge.site_power",
            "base_url": cloud.url,
            "sites": {"1001": "PV-C1"},
            "secrets": {"api_key": str(write_key(tmp_path))},
            "poll_s": 60,
            "lookback_s": 0,
            "push": {"bind": f"127.0.0.1:{port}", "token_file": str(tmp_path / "push.token"), "max_body_bytes": 4096},
        }
        hub = next(make)([source])
        yield hub, port
        next(make, None)


def test_a_push_is_answered_after_commit_with_what_was_stored(pushed: Any) -> None:
    hub, port = pushed
    status, answer = post(port, "1001", json.dumps(BODY).encode())
    assert (status, answer) == (200, {"ok": True, "accepted": 2, "rejected": []})
    rows = stored(hub)  # answered after the commit: the rows are there as soon as the answer is
    noon = parse_time("2026-11-27T12:00:00+09:00")  # the site's local time, Asia/Tokyo
    assert [(row[0], row[1]) for row in rows] == [(noon, 1.5), (noon + 900_000, 1.6205)]
    assert {row[2] for row in rows} == {"se"}


@pytest.mark.parametrize(
    ("site", "body", "token", "status", "code"),
    [
        ("1001", json.dumps(BODY).encode(), "wrong-token", 401, "bad_credentials"),
        ("1001", json.dumps(BODY).encode(), None, 401, "bad_credentials"),
        ("9999", json.dumps(BODY).encode(), TOKEN, 404, "unknown_der"),
        ("1001", b"<html>not json</html>", TOKEN, 422, "decode_error"),
        ("1001", b'{"power": {"values": []}}' + b" " * 5000, TOKEN, 413, "too_large"),
    ],
)
def test_a_bad_push_gets_its_error_code_and_status_and_stores_nothing(
    pushed: Any, site: str, body: bytes, token: str | None, status: int, code: str
) -> None:
    hub, port = pushed
    got, answer = post(port, site, body, token)
    assert got == status and answer["ok"] is False and answer["error"]["code"] == code
    assert TOKEN not in json.dumps(answer)
    assert stored(hub) == []
    good, _ = post(port, "1001", json.dumps(BODY).encode())  # the listener goes on serving
    assert good == 200
    if code == "decode_error":
        kept = records(hub, "data.quarantined")
        assert len(kept) == 1 and kept[0]["topic"] == "POST /v1/push/1001"
    if code == "bad_credentials":
        assert len(records(hub, "cloud.push_refused")) == 1
