"""Who may open the status page: a system account of role ``viewer`` or ``consumer``, by its password.

A login gives a random session token in a cookie (``HttpOnly; SameSite=Strict``: no script reads it, no other
site's page sends it), kept in memory for ``http.session_hours``; a restart logs everyone out. Gateways, DERs
and unknown names are refused alike, each refusal audited, and failed logins are limited for the whole hub
(bcrypt is slow on purpose; a flood must not take the data path's threads).
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from typing import TYPE_CHECKING

from hubd.model import ErrorCode, HubError

if TYPE_CHECKING:
    from hubd.app import Hub

COOKIE = "hubd_session"
ROLES = ("viewer", "consumer")
_FAILURES = 10  # failed logins the hub takes in _WINDOW_S before it refuses the rest unchecked
_WINDOW_S = 60.0


class Logins:
    """Checks logins against the registry and keeps the sessions they open."""

    def __init__(self, hub: Hub, hours: float) -> None:
        self._hub = hub
        self._lifetime_s = hours * 3600
        self._sessions: dict[str, tuple[str, float]] = {}  # token -> (system name, expiry in monotonic time)
        self._failures: deque[float] = deque()

    async def login(self, name: str, password: str) -> str:
        """A new session's token; raises HubError (audited) when ``name`` may not open the page."""
        now = time.monotonic()
        while self._failures and self._failures[0] < now - _WINDOW_S:
            self._failures.popleft()
        audit = self._hub.audit
        error: HubError | None
        if len(self._failures) >= _FAILURES:
            error = HubError(ErrorCode.RATE_LIMITED, "too many failed logins; wait a minute")
        else:
            error = await self._check(name, password)
        if error is not None:
            self._failures.append(now)
            audit.append("page.login", error.code.value, client_id=name[:64], reason=error.message)
            audit.flush()
            raise error
        token = secrets.token_urlsafe(32)
        self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}  # the expired ones go
        self._sessions[token] = (name, now + self._lifetime_s)
        audit.append("page.login", client_id=name)
        audit.flush()
        return token

    async def _check(self, name: str, password: str) -> HubError | None:
        auth = self._hub.auth
        auth.refresh()  # a system the operator added or revoked since
        error = await auth.check_system(name, password, ROLES)
        if error is not None and error.code == ErrorCode.NOT_ALLOWED:
            return HubError(ErrorCode.NOT_ALLOWED, f"{name} may not open the status page (role viewer or consumer)")
        return error

    def who(self, token: str | None) -> str | None:
        """The system a session token belongs to, while it is valid and the system is still active."""
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        name, expiry = session
        self._hub.auth.refresh()  # a revocation counts at once
        system = self._hub.auth.systems.get(name)
        if time.monotonic() >= expiry or system is None or system.status != "active":
            del self._sessions[token]
            return None
        return name

    def logout(self, token: str | None) -> None:
        if token:
            self._sessions.pop(token, None)
