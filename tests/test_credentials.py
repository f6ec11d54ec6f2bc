"""The credential cache: bcrypt once per credential, never again on the hot path, forgotten on any change."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest.mock import patch

from hubd.auth import Authenticator
from hubd.auth.credentials import RateLimiter, hash_password
from hubd.auth.registry import Registry
from hubd.model import ErrorCode


def test_bcrypt_runs_once_per_credential_and_again_after_a_change(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "hub.sqlite3")
    registry.add_der("PV-1", 0, {"type": "pv"})
    registry.set_der_password("PV-1", hash_password("first", 4), "registered")
    pool = ThreadPoolExecutor(1)
    auth = Authenticator(registry, pool)

    import hubd.auth.credentials as credentials

    calls = []
    real = credentials.bcrypt_check

    def counting(password: str, stored: str) -> bool:
        calls.append(password)
        return real(password, stored)

    async def scenario() -> None:
        with patch.object(credentials, "bcrypt_check", counting):
            # 50 concurrent checks of a new credential share one bcrypt call.
            results = await asyncio.gather(*(auth.check_der("PV-1", "first") for _ in range(50)))
            assert results == [None] * 50
            assert auth.der_precheck("PV-1", "first") is True  # from memory now
            assert len(calls) == 1
            wrong = await auth.check_der("PV-1", "wrong")
            assert wrong is not None and wrong.code is ErrorCode.BAD_CREDENTIALS
            assert (await auth.check_der("PV-1", "wrong")) is not None
            assert len(calls) == 2  # a known-wrong password is not re-hashed either
            # Another process (the operator CLI) rotates the password: the cache forgets at once.
            other = Registry(tmp_path / "hub.sqlite3")
            other.set_der_password("PV-1", hash_password("second", 4), "registered")
            other.close()
            assert auth.refresh()
            assert (await auth.check_der("PV-1", "first")) is not None
            assert (await auth.check_der("PV-1", "second")) is None

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()
        registry.close()


def test_rate_limiter_window() -> None:
    limiter = RateLimiter(failures=3, window_s=10)
    for t in (0.0, 1.0, 2.0):
        assert not limiter.blocked("der:PV-1", t)
        limiter.count("der:PV-1", t)
    assert limiter.blocked("der:PV-1", 3.0)
    assert not limiter.blocked("der:PV-2", 3.0)
    assert not limiter.blocked("der:PV-1", 12.5)  # the oldest failures have left the window


def test_a_message_s_readings_are_split_by_what_memory_knows(tmp_path: Path) -> None:
    """Verified from memory, needing bcrypt, or refused, each in the message's order; and a change made by the
    operator in another process (revoke, reset, rotate) counts at once for a credential memory had verified."""
    from hubd.model import HubError, Reading

    registry = Registry(tmp_path / "hub.sqlite3")
    for der_id in ("PV-1", "PV-2", "PV-3"):
        registry.add_der(der_id, 0, {"type": "pv"})
        registry.set_der_password(der_id, hash_password(f"{der_id}-pw", 4), "registered")
    pool = ThreadPoolExecutor(1)
    auth = Authenticator(registry, pool)

    def message() -> list[Reading | HubError]:
        return [
            Reading("PV-1", 0, {"power_kw": 1.0}, "PV-1-pw"),
            HubError(ErrorCode.BAD_REQUEST, "refused by the decoder"),
            Reading("PV-2", 0, {"power_kw": 1.0}, "PV-2-pw"),
            Reading("PV-3", 0, {"power_kw": 1.0}, "PV-1-pw"),  # another DER's password
            Reading("PV-9", 0, {"power_kw": 1.0}, "PV-9-pw"),
            Reading("PV-1", 0, {"power_kw": 1.0}, None),
        ]

    try:
        good, slow, refused = auth.split_readings(message())
        assert good == [] and [i for i, _ in slow] == [0, 2, 3, 5]  # nothing verified yet: bcrypt decides
        assert [(i, der_id, e.code) for i, der_id, e in refused] == [
            (1, None, ErrorCode.BAD_REQUEST),
            (4, "PV-9", ErrorCode.UNKNOWN_DER),
        ]
        for der_id, password in (("PV-1", "PV-1-pw"), ("PV-2", "PV-2-pw"), ("PV-3", "PV-1-pw"), ("PV-1", "")):
            asyncio.run(auth.check_der(der_id, password))
        good, slow, refused = auth.split_readings(message())
        assert [r.der_id for r in good] == ["PV-1", "PV-2"] and slow == []
        assert good[0].der_id is auth.ders["PV-1"].der_id  # the registry's own string
        assert [(i, e.code) for i, _, e in refused] == [
            (1, ErrorCode.BAD_REQUEST),
            (3, ErrorCode.BAD_CREDENTIALS),
            (4, ErrorCode.UNKNOWN_DER),
            (5, ErrorCode.BAD_CREDENTIALS),
        ]

        other = Registry(tmp_path / "hub.sqlite3")  # the operator CLI
        other.set_der_password("PV-1", auth.ders["PV-1"].password_hash, "revoked")
        other.set_der_password("PV-2", None, "allowed")  # reset: registers again
        other.close()
        assert auth.refresh()
        good, slow, refused = auth.split_readings(message())
        assert good == [] and slow == []
        assert [(i, e.code) for i, _, e in refused] == [
            (0, ErrorCode.NOT_ALLOWED),
            (1, ErrorCode.BAD_REQUEST),
            (2, ErrorCode.BAD_CREDENTIALS),
            (3, ErrorCode.BAD_CREDENTIALS),
            (4, ErrorCode.UNKNOWN_DER),
            (5, ErrorCode.NOT_ALLOWED),
        ]
    finally:
        pool.shutdown()
        registry.close()
