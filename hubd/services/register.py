"""``hub/v1/register``: a DER trades the initial password for a unique one (``hubd.auth.registration``)."""

from __future__ import annotations

from typing import Any

from hubd.audit import AuditLog
from hubd.auth.registration import Registration
from hubd.services import Request, refusal


class RegisterService:
    name = "register"

    def __init__(self, registration: Registration, audit: AuditLog) -> None:
        self._registration = registration
        self._audit = audit

    async def handle(self, request: Request) -> dict[str, Any]:
        if request.body is None:
            assert request.error is not None
            error = request.error
            self._audit.append("register.failed", error.code.value, requester=request.requester, reason=error.message)
            return refusal(error)
        return await self._registration.handle(request.body, request.requester)

    async def settle(self, answer: dict[str, Any], topic: str | None, failure: str | None) -> None:
        """A registration counts once its answer, with the new password, reached the broker; else it is undone."""
        if answer.get("ok"):
            await self._registration.settle(str(answer["der_id"]), topic, failure)
