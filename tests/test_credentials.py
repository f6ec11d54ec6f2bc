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
    real = credentials._bcrypt_check

    def counting(password: str, stored: str) -> bool:
        calls.append(password)
        return real(password, stored)

    async def scenario() -> None:
        with patch.object(credentials, "_bcrypt_check", counting):
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
        limiter.fail("der:PV-1", t)
    assert limiter.blocked("der:PV-1", 3.0)
    assert not limiter.blocked("der:PV-2", 3.0)
    assert not limiter.blocked("der:PV-1", 12.5)  # the oldest failures have left the window
