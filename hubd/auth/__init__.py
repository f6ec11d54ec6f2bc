"""Who may speak: may this sender write readings for this DER? System credentials on queries; registration.

The registry is mirrored in memory and re-read only when SQLite says another process changed it, so a
credential check on the hot path is two dict lookups and a digest comparison.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Literal

from hubd.auth.credentials import RateLimiter, VerifiedCache
from hubd.auth.registry import Der, Registry, System
from hubd.config import RateLimitConfig
from hubd.model import EDGE, ErrorCode, HubError, Reading, Sender

Refused = list[tuple[int, str | None, HubError]]
"""Readings of a message refused: (index in the message, the DER id it named, the error)."""


class Authenticator:
    """Checks DER and system passwords against the registry, from memory when it can."""

    def __init__(self, registry: Registry, pool: Executor, limits: RateLimitConfig | None = None) -> None:
        limits = limits or RateLimitConfig()
        self.registry = registry
        self.cache = VerifiedCache(pool)  # systems' passwords and the initial password
        self.der_cache = VerifiedCache(pool)  # DERs' unique passwords, by DER id
        self.ders: dict[str, Der] = {}
        self.systems: dict[str, System] = {}
        self.gateways: dict[str, frozenset[str]] = {}  # the DERs bound to each gateway
        # bcrypt calls of the data path per DER: without a limit, a flood of readings with ever new wrong
        # passwords for one DER costs a bcrypt call (~85 ms) each, and holds up every DER's new passwords
        self._checks = RateLimiter(limits.der_checks, limits.der_window_s)
        # and per source: one that names ever other DERs (each with a budget of its own) is held all the same
        self._source_checks = RateLimiter(limits.source_checks, limits.source_window_s)
        self._version = -1
        self.refresh()

    def refresh(self) -> bool:
        """Re-read the registry if another process (the operator CLI) changed it; True when it did."""
        version = self.registry.data_version()
        if version == self._version:
            return False
        self._version = version
        self.ders = self.registry.ders()
        self.systems = self.registry.systems()
        self.gateways = self.registry.bindings()
        return True

    def reload_der(self, der_id: str) -> None:
        """Pick up this process's own change to one DER without a full reload."""
        der = self.registry.der(der_id)
        if der is None:
            self.ders.pop(der_id, None)
        else:
            self.ders[der_id] = der
        self.der_cache.forget(der_id)

    def der_precheck(self, der_id: str, password: str) -> HubError | Literal[True] | None:
        """The synchronous part of a DER check: an error, True when verified from memory, None for bcrypt."""
        der = self.ders.get(der_id)
        if der is None:
            return HubError(ErrorCode.UNKNOWN_DER, f"DER {der_id} is not registered with this hub")
        if der.status == "revoked":
            return HubError(ErrorCode.NOT_ALLOWED, f"DER {der_id} has been revoked")
        if der.password_hash is None:
            return HubError(ErrorCode.BAD_CREDENTIALS, f"DER {der_id} has no unique password yet: register it first")
        known = self.der_cache.lookup(der_id, der.password_hash, password)
        if known is None:
            return None
        return True if known else _bad_password("DER", der_id)

    def split_readings(
        self, items: Sequence[Reading | HubError], sender: Sender = EDGE
    ) -> tuple[list[Reading], list[tuple[int, Reading]], Refused]:
        """May this sender write these readings? Split into: allowed; needing bcrypt (index, reading); refused.

        A sender the operator configured for some DERs (``sender.ders``) may write those, without passwords;
        any other sender proves each reading with its DER's password. Synchronous, so a message of known
        senders costs no coroutine. Most readings are verified in one call each. An allowed reading takes the
        registry's own string for its DER id: one object per DER, which the store's batches then carry once
        per DER, not once per reading.
        """
        if sender.ders is not None:
            return self._split_bound(items, sender, sender.ders)
        ders, verified = self.ders, self.der_cache.verified
        good: list[Reading] = []
        slow: list[tuple[int, Reading]] = []
        refused: Refused = []
        for index, item in enumerate(items):
            if isinstance(item, HubError):
                refused.append((index, item.der_id, item))
                continue
            der = ders.get(item.der_id)
            password = item.password or ""
            if der is not None and der.status != "revoked" and verified(der.der_id, der.password_hash, password):
                item.der_id = der.der_id
                good.append(item)
                continue
            verdict = self.der_precheck(item.der_id, password)
            if verdict is True:
                good.append(item)
            elif verdict is None:
                slow.append((index, item))
            else:
                refused.append((index, item.der_id, verdict))
        return good, slow, refused

    def _split_bound(
        self, items: Sequence[Reading | HubError], sender: Sender, bound: frozenset[str]
    ) -> tuple[list[Reading], list[tuple[int, Reading]], Refused]:
        """A bound sender's readings (a gateway, a configured source): its own DERs' are allowed while the
        registry knows them unrevoked."""
        good: list[Reading] = []
        refused: Refused = []
        for index, item in enumerate(items):
            if isinstance(item, HubError):
                refused.append((index, item.der_id, item))
                continue
            der = self.ders.get(item.der_id)
            if der is None:  # first, as for every sender (docs/protocol.md)
                error = HubError(ErrorCode.UNKNOWN_DER, f"DER {item.der_id} is not known to this hub")
            elif item.der_id not in bound:
                reason = f"{sender.kind} {sender.name} is not bound to DER {item.der_id}"
                error = HubError(ErrorCode.NOT_ALLOWED, reason)
            elif der.status == "revoked":
                error = HubError(ErrorCode.NOT_ALLOWED, f"DER {item.der_id} has been revoked")
            else:
                item.der_id = der.der_id
                item.password = None
                good.append(item)
                continue
            refused.append((index, item.der_id, error))
        return good, [], refused

    async def check_der(self, der_id: str, password: str, source_id: str = "unknown") -> HubError | None:
        """None when ``password`` is the DER's unique password, else the error to answer. ``source_id``: the
        message's source, whose budget of bcrypt checks a check spends as well as the DER's."""
        verdict = self.der_precheck(der_id, password)
        if isinstance(verdict, HubError):
            return verdict
        if verdict:
            return None
        der = self.ders[der_id]
        assert der.password_hash is not None
        # Only a check that makes a bcrypt call of its own is counted: one that joins a call under way for the
        # same password is free. Passwords memory knows (right or wrong) were answered above, past any limit.
        if not self.der_cache.checking(der_id, der.password_hash, password):
            now = time.monotonic()
            if self._checks.blocked(der_id, now):
                return HubError(ErrorCode.RATE_LIMITED, f"too many new passwords tried for DER {der_id}; try later")
            if self._source_checks.blocked(source_id, now):
                return HubError(
                    ErrorCode.RATE_LIMITED, f"too many new passwords tried from source {source_id}; try later"
                )
            self._checks.count(der_id, now)
            self._source_checks.count(source_id, now)
        good = await self.der_cache.check(der_id, der.password_hash, password)
        return None if good else _bad_password("DER", der_id)

    def gateway_precheck(self, name: str, password: str) -> Sender | HubError | None:
        """The sender a gateway's message speaks for, from memory: its bound DERs; an error; None for bcrypt."""
        system = self.systems.get(name)
        if system is None or system.status != "active":
            return HubError(ErrorCode.BAD_CREDENTIALS, f"unknown or revoked gateway {name}")
        known = self.cache.lookup("system:" + name, system.password_hash, password)
        if known is None:
            return None
        if not known:
            return _bad_password("gateway", name)
        if system.role != "gateway":
            return HubError(ErrorCode.NOT_ALLOWED, f"client {name} has role {system.role}, not gateway")
        return self._gateway(name)

    async def check_gateway(self, name: str, password: str) -> Sender | HubError:
        """The sender a gateway's message speaks for, bcrypt-checking its password if memory cannot tell."""
        verdict = self.gateway_precheck(name, password)
        if verdict is not None:
            return verdict
        denied = await self.check_system(name, password, "gateway")
        return denied or self._gateway(name)

    def _gateway(self, name: str) -> Sender:
        """A gateway that proved its password, as a sender: the DERs the operator bound to it."""
        return Sender("gateway", name, self.gateways.get(name, frozenset()))

    async def check_system(self, name: str, password: str, role: str | tuple[str, ...]) -> HubError | None:
        """None when ``name`` is an active system of ``role`` (or one of several) and ``password`` is its password."""
        system = self.systems.get(name)
        if system is None or system.status != "active":
            return HubError(ErrorCode.BAD_CREDENTIALS, f"unknown or revoked client {name}")
        if not await self.cache.check("system:" + name, system.password_hash, password):
            return _bad_password("client", name)
        roles = (role,) if isinstance(role, str) else role
        if system.role not in roles:
            return HubError(ErrorCode.NOT_ALLOWED, f"client {name} has role {system.role}, not {' or '.join(roles)}")
        return None


def _bad_password(what: str, name: str) -> HubError:
    return HubError(ErrorCode.BAD_CREDENTIALS, f"wrong password for {what} {name}")
