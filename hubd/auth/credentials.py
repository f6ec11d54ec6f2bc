"""Password checks that cost a hash lookup on the hot path and a bcrypt call only on a miss.

bcrypt is slow on purpose (~85 ms at cost 10), so a verified credential is remembered by a fast digest of
the password (never the password itself) together with the stored hash it was checked against: a rotate,
reset or revoke changes that hash and so invalidates the entry at once. Every bcrypt call runs in a thread
pool, off the event loop, and concurrent checks of the same credential share one call.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from concurrent.futures import Executor

import bcrypt

_MAX_BAD_PER_KEY = 16
_NONE_BAD: frozenset[bytes] = frozenset()
_MAX_TRACKED = 10_000  # rate-limit keys kept before stale ones are pruned


def issue_password() -> str:
    """A new unique password: 24 URL-safe characters (144 bits) from ``secrets``."""
    return secrets.token_urlsafe(18)


def hash_password(password: str, rounds: int) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


def _digest(password: str) -> bytes:
    # SHA-256: on the hot path once per reading, and the fastest of hashlib's here (0.7 µs vs blake2b's 1.1).
    return hashlib.sha256(password.encode()).digest()


class VerifiedCache:
    """Remembers which (principal, password) pairs bcrypt already judged, per stored hash."""

    def __init__(self, pool: Executor) -> None:
        self._pool = pool
        # key -> (stored hash, digest of the good password or None, digests of wrong passwords): a frozenset,
        # shared while empty (most entries never see a wrong password; a set each was 21 MB per 100,000 DERs)
        self._known: dict[str, tuple[str, bytes | None, frozenset[bytes]]] = {}
        self._pending: dict[tuple[str, bytes], asyncio.Future[bool]] = {}

    def lookup(self, key: str, stored_hash: str, password: str) -> bool | None:
        """True/False when already judged against this stored hash, None when bcrypt must decide."""
        entry = self._known.get(key)
        if entry is None or entry[0] != stored_hash:
            return None
        digest = _digest(password)
        if entry[1] is not None and secrets.compare_digest(entry[1], digest):
            return True
        if digest in entry[2]:
            return False
        return None

    def verified(self, key: str, stored_hash: str | None, password: str) -> bool:
        """Whether ``password`` is the one bcrypt already found good against ``stored_hash``: the data path's
        question for nearly every reading, answered in one call."""
        entry = self._known.get(key)
        return (
            entry is not None
            and entry[0] == stored_hash
            and entry[1] is not None
            and secrets.compare_digest(entry[1], _digest(password))
        )

    def remember(self, key: str, stored_hash: str, password: str, good: bool) -> None:
        entry = self._known.get(key)
        if entry is None or entry[0] != stored_hash:
            entry = (stored_hash, None, _NONE_BAD)
        digest = _digest(password)
        if good:
            entry = (stored_hash, digest, entry[2])
        elif len(entry[2]) < _MAX_BAD_PER_KEY:
            entry = (stored_hash, entry[1], entry[2] | {digest})
        self._known[key] = entry

    def forget(self, key: str) -> None:
        self._known.pop(key, None)

    def checking(self, key: str, stored_hash: str, password: str) -> bool:
        """Whether bcrypt is judging this password against ``stored_hash`` now: a check that would join that
        call instead of making its own, and so costs no bcrypt call of its own."""
        return (key + "\0" + stored_hash, _digest(password)) in self._pending

    async def check(self, key: str, stored_hash: str, password: str) -> bool:
        """Judge ``password`` against ``stored_hash``: from memory when possible, else bcrypt off-loop."""
        known = self.lookup(key, stored_hash, password)
        if known is not None:
            return known
        pending_key = (key + "\0" + stored_hash, _digest(password))
        pending = self._pending.get(pending_key)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._pending[pending_key] = future
        try:
            good = await loop.run_in_executor(self._pool, bcrypt_check, password, stored_hash)
            self.remember(key, stored_hash, password, good)
            future.set_result(good)
            return good
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) get it through shield
            raise
        finally:
            del self._pending[pending_key]


def bcrypt_check(password: str, stored_hash: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode(), stored_hash.encode())
    except ValueError:  # a malformed stored hash never matches
        return False


class RateLimiter:
    """Counts events per key in a sliding window (registration's failures, the data path's bcrypt checks); a
    key at the limit is refused until its oldest events leave the window."""

    def __init__(self, failures: int, window_s: float) -> None:
        self._failures = failures
        self._window = window_s
        self._seen: dict[str, list[float]] = {}

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._seen.get(key, ()) if now - t < self._window]
        if times:
            self._seen[key] = times
        else:
            self._seen.pop(key, None)
        return times

    def blocked(self, key: str, now: float) -> bool:
        return len(self._recent(key, now)) >= self._failures

    def count(self, key: str, now: float) -> None:
        if len(self._seen) > _MAX_TRACKED:  # many distinct keys (an attack): forget those that cooled down
            for stale in [k for k, times in self._seen.items() if now - times[-1] >= self._window]:
                del self._seen[stale]
        self._recent(key, now)
        self._seen.setdefault(key, []).append(now)
