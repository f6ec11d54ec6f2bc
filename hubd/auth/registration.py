"""First contact: a DER proves the hub's initial password and receives a unique password of its own.

The unique password is shown once, in the answer, and stored only as a bcrypt hash. Failed attempts count
per requester, and wrong initial passwords also for the whole hub; past either limit the hub answers
``rate_limited`` without even checking. Past the hub's limit each further wrong initial password also pauses
all registrations, twice as long as the one before (capped), so a patient guesser who waits for the window
gets ever fewer tries, not the same number again. There is no count per DER id: the initial password is the same for
every id, so guesses on one id are guesses on all (the hub's count holds them), and a count per id let anyone
lock a DER out of its own registration. The count per requester is keyed on the reply topic, which a sender
chooses: it holds back one client that keeps failing, and is no guard against guessing (the hub's count is).

With access control at the broker (``broker.access_control: dynsec``) a request's sender has already proved the
initial password to the broker, as the claim account's: a wrong one in the request counts for its requester only
and pauses no one, and guessing is left to the broker's CONNECT, which no count limits (docs/operations.md).

Registration has its own bcrypt thread, so a registration never waits behind the data path's checks.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from concurrent.futures import Executor
from typing import Any

from loguru import logger

from hubd.audit import AuditLog
from hubd.auth import Authenticator
from hubd.auth.credentials import RateLimiter, VerifiedCache, bcrypt_check, hash_password, issue_password
from hubd.auth.dynsec import BrokerAcl, BrokerAclError, create_commands, delete_commands, der_principal, password_record
from hubd.auth.registry import DER_METADATA, check_id, check_metadata
from hubd.config import AuthConfig, ConfigError
from hubd.model import ErrorCode, HubError, format_time, now_ms

_HUB = "hub"  # the one key of the hub-wide count


class Registration:
    """Answers ``register`` requests per PROTOCOL.md (allowlist or open mode, one-time claim)."""

    def __init__(
        self,
        auth: Authenticator,
        config: AuthConfig,
        audit: AuditLog,
        pool: Executor,
        acl: BrokerAcl | None = None,
        prefix: str = "hub/v1",
        reserved: frozenset[str] = frozenset(),
        claim_password: str | None = None,
    ) -> None:
        self._reserved = reserved  # the broker user names of the hub's own accounts
        # With access control at the broker only the claim account may publish a registration, and the broker
        # checked its password, the initial password, at CONNECT: a request's sender knows it. A wrong one in
        # the request is then no guess (compared without bcrypt, counted for its requester only), so nobody's
        # mistakes pause everyone's registrations; guessing is the broker's CONNECT (docs/operations.md).
        if claim_password is not None and not (
            config.initial_password_hash and bcrypt_check(claim_password, config.initial_password_hash)
        ):
            raise ConfigError("broker.claim_password_file: must hold the initial password (auth.initial_password_hash)")
        self._claim_password = claim_password
        self._auth = auth
        self._acl = acl  # access control at the broker: a registered DER becomes a broker client of its own
        self._prefix = prefix
        self._config = config
        self._audit = audit
        self._pool = pool  # registration's own (one thread): never shared with the data path's checks
        self._initial = VerifiedCache(pool)
        limits = config.rate_limit
        self._requesters = RateLimiter(limits.failures, limits.window_s)
        self._hub = RateLimiter(limits.global_failures, limits.window_s)
        self._strikes = 0  # wrong initial passwords since the hub's count reached its limit
        self._paused_until = 0.0  # monotonic: no registration is checked before then
        # One initial-password check at a time, the limits read just before it: requests sent all at once
        # cannot all pass the limit before the first of them has failed. One bcrypt thread serves them anyway.
        self._turn = asyncio.Lock()
        # Claims whose answer (with the new password) the broker has not yet taken: DER id → (hash, password,
        # whether the claim created the DER). Undone if the broker refuses the answer (docs/protocol.md).
        self._unsettled: dict[str, tuple[str, str, bool]] = {}

    async def handle(self, request: dict[str, Any], requester: str | None) -> dict[str, Any]:
        der_id = request.get("der_id")
        try:
            return await self._register(request, requester)
        except HubError as exc:
            self._audit.append(
                "register.failed",
                exc.code.value,
                der_id=der_id if isinstance(der_id, str) else None,
                requester=requester,
                reason=exc.message,
            )
            return {"ok": False, "error": exc.as_dict()}

    async def _register(self, request: dict[str, Any], requester: str | None) -> dict[str, Any]:
        der_id = check_id(request.get("der_id"))
        password = request.get("password")
        if not isinstance(password, str) or not password:
            raise HubError(ErrorCode.BAD_REQUEST, "password (the initial password) is missing or not a string")
        location = request.get("location") or {}
        if not isinstance(location, dict):
            raise HubError(ErrorCode.BAD_REQUEST, "location must be an object with lat, lon and area")
        unknown = set(location) - {"lat", "lon", "area"}
        if unknown:
            raise HubError(ErrorCode.BAD_REQUEST, f"unknown location field {sorted(unknown)[0]!r}")
        meta = check_metadata(
            {key: request.get(key) for key in DER_METADATA if key not in ("lat", "lon", "area")} | location
        )
        await self._prove(password, requester)
        try:
            return await self._claim(der_id, meta)
        except HubError as exc:
            if requester and exc.code in (ErrorCode.UNKNOWN_DER, ErrorCode.ALREADY_REGISTERED):
                self._requesters.count(requester, time.monotonic())
            raise

    async def _prove(self, password: str, requester: str | None) -> None:
        """The limits, then the initial password: each wrong one counts for its requester and for the hub."""
        initial = self._config.initial_password_hash
        async with self._turn:
            now = time.monotonic()
            if requester and self._requesters.blocked(requester, now):
                raise HubError(ErrorCode.RATE_LIMITED, "too many failed registrations from this requester; try later")
            if self._hub.blocked(_HUB, now) or now < self._paused_until:
                raise HubError(ErrorCode.RATE_LIMITED, "too many wrong initial passwords on this hub; try later")
            if initial is None:
                raise HubError(ErrorCode.NOT_ALLOWED, "registration is closed: no initial password is configured")
            if self._claim_password is not None:
                right = hmac.compare_digest(password.encode(), self._claim_password.encode())
            else:
                right = await self._initial.check("initial", initial, password)
            if not right:
                now = time.monotonic()
                if self._claim_password is None:  # from anyone: a guess, counted for the whole hub
                    self._hub.count(_HUB, now)
                    self._strike(now)
                if requester:
                    self._requesters.count(requester, now)
                raise HubError(ErrorCode.BAD_CREDENTIALS, "wrong initial password")

    def _strike(self, now: float) -> None:
        """After a wrong initial password: once the hub's count has reached its limit, this and every further one
        is a strike, and strike n pauses every registration for ``global_backoff_s * 2 ** (n - 1)`` (at most
        ``global_backoff_max_s``). The strikes start over after a window with no wrong initial password that
        began when the last pause ended."""
        limits = self._config.rate_limit
        if self._strikes and now >= self._paused_until + limits.window_s:
            self._strikes = 0
        if self._strikes or self._hub.blocked(_HUB, now):
            self._strikes += 1
            pause = min(limits.global_backoff_s * 2.0 ** min(self._strikes - 1, 60), limits.global_backoff_max_s)
            self._paused_until = now + pause

    async def _claim(self, der_id: str, meta: dict[str, Any]) -> dict[str, Any]:
        """The initial password was right: the allowlist, revocation, an earlier claim, then the new password."""
        self._auth.refresh()
        der = self._auth.ders.get(der_id)
        if der is None and self._config.registration_mode == "allowlist":
            raise HubError(ErrorCode.UNKNOWN_DER, f"DER {der_id} is not on this hub's allowlist")
        if der is not None and der.status == "revoked":
            raise HubError(ErrorCode.NOT_ALLOWED, f"DER {der_id} has been revoked")
        at_broker = self._acl is not None or self._claim_password is not None  # dynsec, or emqx asking hubd
        if at_broker and (der_id in self._reserved or der_id in self._auth.systems):
            raise HubError(ErrorCode.NOT_ALLOWED, f"{der_id} names another principal at the broker; use another id")
        if der is not None and der.status == "registered":
            raise HubError(
                ErrorCode.ALREADY_REGISTERED,
                f"DER {der_id} already has a unique password; ask the operator to reset or rotate it",
            )
        unique = issue_password()
        hashed = await asyncio.get_running_loop().run_in_executor(
            self._pool, hash_password, unique, self._config.bcrypt_rounds
        )
        now = now_ms()
        if not self._auth.registry.claim(der_id, hashed, now, meta, create=der is None):
            raise HubError(ErrorCode.ALREADY_REGISTERED, f"DER {der_id} was registered by another request")
        if self._acl is not None:
            await self._admit(der_id, hashed, unique, created=der is None)
        self._auth.reload_der(der_id)
        self._unsettled[der_id] = (hashed, unique, der is None)
        self._audit.append("register.ok", der_id=der_id, mode=self._config.registration_mode)
        self._audit.append("password.issued", der_id=der_id)
        return {"ok": True, "der_id": der_id, "password": unique, "registered_at": format_time(now)}

    async def _admit(self, der_id: str, hashed: str, unique: str, created: bool) -> None:
        """The DER's broker client, with the new password and its own topics, before the answer goes out."""
        assert self._acl is not None
        try:
            await self._acl.run(create_commands(der_principal(self._prefix, der_id), unique))
        except BrokerAclError as exc:
            logger.error("registration of {} undone: {}", der_id, exc)
            self._auth.registry.unclaim(der_id, hashed, delete=created)
            self._auth.reload_der(der_id)
            raise HubError(
                ErrorCode.UNAVAILABLE, "the broker's access control could not be updated; try later"
            ) from None
        self._auth.registry.set_broker_record("der:" + der_id, password_record(unique))
        logger.debug("broker client of {} created", der_id)  # the daemon's log (operator commands print none)

    async def settle(self, der_id: str, topic: str | None, failure: str | None) -> None:
        """The broker's verdict on a registration's answer: taken (``failure`` None), the new password counts;
        otherwise the claim is undone (the DER may claim again) and the audit trail says where and why."""
        unsettled = self._unsettled.pop(der_id, None)
        if unsettled is None:
            return
        hashed, unique, created = unsettled
        if failure is None:
            self._auth.der_cache.remember(der_id, hashed, unique, good=True)
            return
        undone = self._auth.registry.unclaim(der_id, hashed, delete=created)
        self._auth.reload_der(der_id)
        if undone and self._acl is not None:
            self._auth.registry.set_broker_record("der:" + der_id, None)
            try:
                await self._acl.run(delete_commands(der_id))
            except BrokerAclError as exc:  # its password was never delivered: nobody can use the client
                logger.error("the broker client of {} could not be removed: {}", der_id, exc)
        self._audit.append(
            "register.undone",
            "undelivered" if undone else "kept",
            der_id=der_id,
            topic=topic,
            reason=f"the answer with the new password was not delivered: {failure}",
        )
