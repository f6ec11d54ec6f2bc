"""Bad registrations and the operator's password changes, driven as a DER and an operator would.

Each refusal is checked for its PROTOCOL.md code, its audit record, that nothing already granted is lost
(a unique password issued keeps working, a DER refused can still register) and that the hub goes on
serving other DERs. The field-by-field cases share one hub (``shared``), each with its own DER id.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import INITIAL_PASSWORD, RunningHub
from helpers import DAY_S, Site, at, last_seq, outcomes, reading, records, rr_on, running_hub, stamp, warm_up

from hubd.auth import credentials


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with running_hub(tmp_path_factory.mktemp("shared")) as hub:
        site = Site.on(hub)
        warm_up(site)
        yield site


def register(hub: RunningHub, body: dict[str, Any] | str) -> dict[str, Any]:
    return hub.rr(f"{hub.prefix}/register", body)


def send(hub: RunningHub, der_id: str, password: str, measured_at: str) -> dict[str, Any]:
    return hub.rr(f"{hub.prefix}/data", {"source_id": "edge-r", "readings": [reading(der_id, password, measured_at)]})


def refusal(answer: dict[str, Any]) -> str:
    """The code of a refused reading (the message itself is fine)."""
    assert answer["ok"] is True and answer["accepted"] == 0, answer
    (refused,) = answer["rejected"]
    return str(refused["error"]["code"])


def der_status(hub: RunningHub, der_id: str) -> str:
    result = hub.cli("der", "show", der_id)
    assert result.exit_code == 0, result.output
    return str(json.loads(result.output)["status"])


def test_second_registration_is_already_registered_and_the_first_password_keeps_working(shared: Site) -> None:
    hub, start, since = shared.hub, shared.window(), last_seq(shared.hub)
    first = hub.register("PV-A")
    answer = register(hub, {"der_id": "PV-A", "password": INITIAL_PASSWORD, "type": "pv"})
    assert answer["ok"] is False and answer["error"]["code"] == "already_registered"
    assert "password" not in answer
    (failed,) = records(hub, "register.failed", since)
    assert (failed["outcome"], failed["der_id"]) == ("already_registered", "PV-A")
    assert len(records(hub, "password.issued", since)) == 1

    assert send(hub, "PV-A", first, at(start)) == {"ok": True, "accepted": 1, "rejected": []}
    assert der_status(hub, "PV-A") == "registered"
    assert shared.stored(start) == [("PV-A", stamp(start))]
    shared.keeps_serving(start)


def _body(**fields: Any) -> Callable[[str], dict[str, Any]]:
    """A registration of the case's own DER id with ``fields`` changed (a callable gets the id)."""

    def make(der_id: str) -> dict[str, Any]:
        body = {"der_id": der_id, "password": INITIAL_PASSWORD, "type": "pv"}
        body.update({k: v(der_id) if callable(v) else v for k, v in fields.items()})
        return {k: v for k, v in body.items() if v is not _DROP}

    return make


_DROP = object()

BAD_REGISTRATIONS = [
    pytest.param(_body(password=INITIAL_PASSWORD[:-1] + "X"), "bad_credentials", id="wrong-initial-password"),
    pytest.param(_body(password=""), "bad_request", id="empty-password"),
    pytest.param(_body(password=_DROP), "bad_request", id="no-password"),
    pytest.param(_body(password=12345), "bad_request", id="password-number"),
    pytest.param(_body(der_id=_DROP), "bad_request", id="no-der-id"),
    pytest.param(_body(der_id=1), "bad_request", id="der-id-number"),
    pytest.param(_body(der_id=lambda d: d + "/1"), "bad_request", id="der-id-slash"),
    pytest.param(_body(der_id=lambda d: d + "\n"), "bad_request", id="der-id-trailing-newline"),
    pytest.param(_body(der_id=lambda d: d + "x" * 64), "bad_request", id="der-id-too-long"),
    pytest.param(_body(der_id=lambda d: d + "-unlisted"), "unknown_der", id="not-on-allowlist"),
    pytest.param(_body(type="nuclear"), "bad_request", id="unknown-type"),
    pytest.param(_body(capacity_kw="big"), "bad_request", id="capacity-text"),
    pytest.param(_body(capacity_kw=-5), "bad_request", id="capacity-negative"),
    pytest.param(_body(capacity_kw=10**400), "bad_request", id="capacity-beyond-double"),
    pytest.param(_body(location="Tokyo"), "bad_request", id="location-text"),
    pytest.param(_body(location={"lat": 91, "lon": 0}), "bad_request", id="latitude-out-of-range"),
    pytest.param(_body(location={"alt": 40}), "bad_request", id="unknown-location-field"),
    pytest.param(_body(name=7), "bad_request", id="name-number"),
    pytest.param(lambda d: f"der_id={d}", "decode_error", id="not-json"),
    pytest.param(lambda d: [d], "decode_error", id="json-array"),
]


@pytest.mark.parametrize(("make", "code"), BAD_REGISTRATIONS)
def test_bad_registration_is_refused_audited_and_changes_nothing(
    shared: Site, make: Callable[[str], Any], code: str
) -> None:
    hub, start, since = shared.hub, shared.window(), last_seq(shared.hub)
    der_id = f"PV-R{start // DAY_S}"
    assert hub.cli("der", "add", der_id).exit_code == 0
    body = make(der_id)
    answer = register(hub, body if isinstance(body, str) else json.dumps(body, allow_nan=True))
    assert answer["ok"] is False and answer["error"]["code"] == code, answer
    assert INITIAL_PASSWORD not in json.dumps(answer)
    assert outcomes(hub, "register.failed", since) == [code]
    assert records(hub, "password.issued", since) == []
    assert der_status(hub, der_id) == "allowed"

    # Nothing was spent: the DER can still register and send, and the hub serves the others.
    password = register(hub, {"der_id": der_id, "password": INITIAL_PASSWORD})["password"]
    assert send(hub, der_id, password, at(start))["accepted"] == 1
    shared.keeps_serving(start)


def test_guessing_the_initial_password_is_limited_for_the_whole_hub(hub_factory: Any) -> None:
    hub = hub_factory(auth={"rate_limit": {"failures": 3, "global_failures": 4, "window_s": 60}})
    pv1 = hub.register("PV-1")
    since = last_seq(hub)
    # A new DER id and a new reply topic each try: no count per id or requester ever reaches its limit.
    topic = f"{hub.prefix}/register"
    guesses = [
        rr_on(hub, topic, {"der_id": f"PV-{i}", "password": f"guess-{i}-guess-{i}"}, f"test/answers/g{i}")
        for i in range(100, 108)
    ]
    assert [answer["error"]["code"] for answer in guesses] == ["bad_credentials"] * 4 + ["rate_limited"] * 4
    # Each bad_credentials is one bcrypt check of a distinct password; the limited ones were never checked.
    failed = records(hub, "register.failed", since)
    assert [r["outcome"] for r in failed] == ["bad_credentials"] * 4 + ["rate_limited"] * 4
    assert all("on this hub" in r["reason"] for r in failed[4:])
    # Until the window passes no one is checked, the right password included: a guesser cannot tell it found it.
    assert hub.cli("der", "add", "PV-9").exit_code == 0
    answer = rr_on(hub, topic, {"der_id": "PV-9", "password": INITIAL_PASSWORD}, "test/answers/pv-9")
    assert answer["error"]["code"] == "rate_limited" and "password" not in answer
    assert records(hub, "password.issued", since) == []
    assert der_status(hub, "PV-9") == "allowed"
    # The data path is not held back.
    assert send(hub, "PV-1", pv1, at(0)) == {"ok": True, "accepted": 1, "rejected": []}


def test_past_the_hubs_limit_each_further_wrong_guess_doubles_the_pause(hub_factory: Any) -> None:
    """With a short window, a guesser who waits for it would get fresh tries: past the limit each further wrong
    initial password pauses every registration, twice as long as the one before, beyond the window. The right
    password is not checked during a pause (a guesser cannot tell), and is taken once the pause is over."""
    limits = {"global_failures": 2, "window_s": 0.3, "global_backoff_s": 1.0, "global_backoff_max_s": 60}
    hub = hub_factory(auth={"rate_limit": limits})
    assert hub.cli("der", "add", "PV-9").exit_code == 0
    topic = f"{hub.prefix}/register"
    right = {"der_id": "PV-9", "password": INITIAL_PASSWORD}

    def guess(i: int) -> tuple[str, float]:
        """The answer's code, and the time after it came (the hub judged the guess before)."""
        body = {"der_id": f"PV-{i}", "password": f"guess-{i}-guess-{i}"}
        answer = rr_on(hub, topic, body, f"test/answers/b{i}")
        return str(answer["error"]["code"]), time.monotonic()

    def wait_until(moment: float) -> None:
        time.sleep(max(0.0, moment - time.monotonic()))

    assert [guess(i)[0] for i in (1, 2)] == ["bad_credentials"] * 2  # the limit: strike 1, a pause of 1 s
    strike_1 = time.monotonic()
    wait_until(strike_1 + 0.45)  # the window (0.3 s) has passed, the pause has not
    assert rr_on(hub, topic, right, "test/answers/pv-9")["error"]["code"] == "rate_limited"
    wait_until(strike_1 + 1.1)
    code, strike_2 = guess(3)  # allowed again, and wrong: strike 2, a pause of 2 s
    assert code == "bad_credentials"
    wait_until(strike_2 + 1.2)  # longer than the first pause
    assert rr_on(hub, topic, right, "test/answers/pv-9")["error"]["code"] == "rate_limited"
    wait_until(strike_2 + 2.1)
    answer = rr_on(hub, topic, right, "test/answers/pv-9")
    assert answer["ok"] is True, answer
    assert outcomes(hub, "register.failed") == ["bad_credentials"] * 2 + [
        "rate_limited",
        "bad_credentials",
        "rate_limited",
    ]


def test_guesses_sent_all_at_once_are_limited_all_the_same(hub_factory: Any) -> None:
    hub = hub_factory(auth={"rate_limit": {"global_failures": 3, "window_s": 60}})
    topic = f"{hub.prefix}/register"

    def guess(i: int) -> str:
        body = {"der_id": f"PV-{i}", "password": f"guess-{i}-guess-{i}"}
        return str(rr_on(hub, topic, body, f"test/answers/c{i}")["error"]["code"])

    with ThreadPoolExecutor(max_workers=12) as senders:
        codes = list(senders.map(guess, range(12)))
    assert sorted(codes) == ["bad_credentials"] * 3 + ["rate_limited"] * 9
    assert sorted(outcomes(hub, "register.failed")) == ["bad_credentials"] * 3 + ["rate_limited"] * 9


def test_a_der_whose_id_was_attacked_still_registers_with_the_right_password(hub_factory: Any) -> None:
    hub = hub_factory(auth={"rate_limit": {"failures": 3, "window_s": 60}})
    assert hub.cli("der", "add", "PV-9").exit_code == 0
    topic = f"{hub.prefix}/register"
    # Wrong guesses on PV-9 from many requesters (each mosquitto_rr answers on a topic of its own) ...
    codes = [register(hub, {"der_id": "PV-9", "password": f"guess-{i}-guess-{i}"})["error"]["code"] for i in range(6)]
    assert codes == ["bad_credentials"] * 6
    # ... and from one requester, which is held back after its third.
    body = {"der_id": "PV-9", "password": "guess-x-guess-x"}
    codes = [rr_on(hub, topic, body, "test/answers/attacker")["error"]["code"] for _ in range(4)]
    assert codes == ["bad_credentials"] * 3 + ["rate_limited"]
    assert outcomes(hub, "register.failed") == ["bad_credentials"] * 9 + ["rate_limited"]
    assert all(r["der_id"] == "PV-9" for r in records(hub, "register.failed"))

    # PV-9 itself, from its own reply topic, is not locked out by them.
    answer = register(hub, {"der_id": "PV-9", "password": INITIAL_PASSWORD})
    assert answer["ok"] is True, answer
    assert send(hub, "PV-9", answer["password"], at(0))["accepted"] == 1
    assert der_status(hub, "PV-9") == "registered"


def test_registration_is_not_queued_behind_the_data_paths_password_checks(
    hub_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The data path's budget of checks per DER set high, so all 16 wrong passwords below are checked.
    hub = hub_factory(auth={"rate_limit": {"der_checks": 100}})
    pv1 = hub.register("PV-1")
    assert hub.cli("der", "add", "PV-9").exit_code == 0
    # Every bcrypt check on the data path's threads takes half a second, as a costlier hash or a slower
    # machine would; registration's own thread is left as it is.
    busy = threading.Event()
    original = credentials.bcrypt_check

    def slow_on_data_path(password: str, stored_hash: str) -> bool:
        if threading.current_thread().name.startswith("hubd-bcrypt"):
            busy.set()
            time.sleep(0.5)
        return original(password, stored_hash)

    monkeypatch.setattr(credentials, "bcrypt_check", slow_on_data_path)
    # 16 messages, each a distinct wrong password: 4 s of checks queued on the data path's two threads.
    mqtt = ["-h", "127.0.0.1", "-p", str(hub.broker.port), "-q", "1", "-t", f"{hub.prefix}/data"]
    for i in range(16):
        body = {"source_id": "edge-w", "readings": [reading("PV-1", f"{pv1[:-4]}w{i:03d}", at(0))]}
        subprocess.run(["mosquitto_pub", *mqtt, "-m", json.dumps(body)], check=True, timeout=10)
    assert busy.wait(10)

    started = time.monotonic()
    answer = register(hub, {"der_id": "PV-9", "password": INITIAL_PASSWORD})
    assert answer["ok"] is True, answer
    assert time.monotonic() - started < 2.0


def test_repeated_failures_from_one_requester_are_rate_limited(hub_factory: Any) -> None:
    hub = hub_factory(auth={"rate_limit": {"failures": 3, "window_s": 60}})
    topic, answers = f"{hub.prefix}/register", "test/answers/prober"
    codes = [
        rr_on(hub, topic, {"der_id": f"PV-{i}", "password": INITIAL_PASSWORD}, answers)["error"]["code"]
        for i in range(100, 104)
    ]
    assert codes == ["unknown_der"] * 3 + ["rate_limited"]
    assert outcomes(hub, "register.failed") == ["unknown_der"] * 3 + ["rate_limited"]
    assert {r["requester"] for r in records(hub, "register.failed")} == {answers}
    # Other requesters (each mosquitto_rr answers on a topic of its own) are not held back.
    site = Site.on(hub)
    site.keeps_serving(site.window())


def test_rotate_reset_and_revoke_from_the_cli_take_effect_at_once(shared: Site) -> None:
    hub, start, since = shared.hub, shared.window(), last_seq(shared.hub)
    first = hub.register("PV-B")
    assert send(hub, "PV-B", first, at(start))["accepted"] == 1  # verified once: now known to the running hub

    rotated = hub.cli("der", "rotate", "PV-B")
    assert rotated.exit_code == 0, rotated.output
    second = rotated.output.strip()
    assert second and second != first
    assert refusal(send(hub, "PV-B", first, at(start + 60))) == "bad_credentials"
    assert send(hub, "PV-B", second, at(start + 60))["accepted"] == 1

    assert hub.cli("der", "reset", "PV-B").exit_code == 0
    assert refusal(send(hub, "PV-B", second, at(start + 120))) == "bad_credentials"
    answer = register(hub, {"der_id": "PV-B", "password": INITIAL_PASSWORD})
    assert answer["ok"] is True, answer
    third = answer["password"]
    assert send(hub, "PV-B", third, at(start + 120))["accepted"] == 1

    assert hub.cli("der", "revoke", "PV-B").exit_code == 0
    assert refusal(send(hub, "PV-B", third, at(start + 180))) == "not_allowed"
    assert register(hub, {"der_id": "PV-B", "password": INITIAL_PASSWORD})["error"]["code"] == "not_allowed"
    assert der_status(hub, "PV-B") == "revoked"

    # A plain reset does not lift a revocation, nor does a rotate (each says how); --reinstate does, on purpose.
    refused = hub.cli("der", "reset", "PV-B")
    assert refused.exit_code == 1 and "--reinstate" in refused.output
    refused = hub.cli("der", "rotate", "PV-B")
    assert refused.exit_code == 1 and "is revoked" in refused.output and "--reinstate" in refused.output
    assert der_status(hub, "PV-B") == "revoked"
    assert hub.cli("der", "reset", "PV-B", "--reinstate").exit_code == 0
    answer = register(hub, {"der_id": "PV-B", "password": INITIAL_PASSWORD})
    assert answer["ok"] is True, answer
    assert send(hub, "PV-B", answer["password"], at(start + 240))["accepted"] == 1

    failures = [(r["outcome"], *r["der_ids"]) for r in records(hub, "auth.failed", since)]  # one per message
    assert failures == [("bad_credentials", "PV-B"), ("bad_credentials", "PV-B"), ("not_allowed", "PV-B")]
    assert outcomes(hub, "register.failed", since) == ["not_allowed"]
    by_operator = [r["event"] for r in records(hub, since=since) if r.get("by") == "operator"]
    assert by_operator == [
        "der.added",
        "password.rotated",
        "password.reset",
        "der.revoked",
        "der.reinstated",
        "password.reset",
    ]

    # What was accepted stays; the hub serves the others.
    assert shared.stored(start) == [("PV-B", stamp(start + s)) for s in (0, 60, 120, 240)]
    shared.keeps_serving(start)
