"""The data path: a raw message → decoded readings → authenticated → committed → the sender's answer.

Readings of one message are judged one by one: good ones are stored, bad ones are refused with a code. A
message that cannot be decoded at all goes to quarantine whole, so nothing received is lost.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loguru import logger

from hubd import formats
from hubd.audit import AuditLog
from hubd.auth import Authenticator
from hubd.config import LimitsConfig
from hubd.formats import Decoded, Limits
from hubd.model import ErrorCode, HubError, RawMessage, Reading, now_ms
from hubd.quarantine import Quarantine
from hubd.store import Rows
from hubd.store.writer import BatchWriter


class Ingest:
    """Turns data messages into committed readings and the answer their sender is owed."""

    def __init__(
        self,
        auth: Authenticator,
        writer: BatchWriter,
        quarantine: Quarantine,
        audit: AuditLog,
        limits: LimitsConfig,
    ) -> None:
        self._auth = auth
        self._writer = writer
        self._quarantine = quarantine
        self._audit = audit
        self._limits = limits
        self._registry_checked = -_REGISTRY_CHECK_S

    async def handle(self, raw: RawMessage) -> tuple[dict[str, Any], Decoded | None]:
        """Process one data message; return the answer and what was decoded (for the reply address)."""
        try:
            decoded = self._decode(raw)
        except HubError as exc:
            self.keep(raw, exc)
            return {"ok": False, "error": exc.as_dict()}, None
        source_id = decoded.source_id or raw.source_id
        good, rejected = await self._authenticate(decoded, source_id)
        if good:
            rows: Rows = []
            der_ids = set()
            tail = (raw.received_at, source_id, raw.format_code)
            names: tuple[str, ...] = ()
            run: list[tuple[Any, ...]] = []
            for r in good:
                der_ids.add(r.der_id)
                if tuple(r.values) != names:
                    names, run = tuple(r.values), []
                    rows.append((names, run))
                run.append((r.der_id, r.measured_at, *r.values.values(), *tail))
            try:
                await self._writer.write(source_id, rows, der_ids, offered=len(decoded.items))
            except HubError as exc:
                # The store failed: keep the whole message so it can be replayed, and say so.
                self.keep(raw, exc)
                return {"ok": False, "error": exc.as_dict()}, decoded
        else:
            self._audit.append(
                "data.received", "rejected", source_id=source_id, topic=raw.topic, readings=len(decoded.items)
            )
            self._audit.flush()  # no commit follows to flush the refusals: write them before the answer
        return {"ok": True, "accepted": len(good), "rejected": rejected}, decoded

    def _decode(self, raw: RawMessage) -> Decoded:
        if len(raw.payload) > self._limits.max_payload_bytes:
            raise HubError(
                ErrorCode.TOO_LARGE,
                f"the payload has {len(raw.payload)} bytes; the limit is {self._limits.max_payload_bytes}",
            )
        decoder = formats.decoder_for(raw.format_code)
        limits = Limits(
            now_ms(), int(self._limits.max_future_s * 1000), self._limits.max_readings_per_message, raw.properties
        )
        try:
            return decoder(raw.payload, limits)
        except HubError:
            raise
        except Exception as exc:  # a decoder must never take the daemon down
            logger.exception("decoder {} failed on a payload from {}", raw.format_code, raw.topic)
            raise HubError(ErrorCode.DECODE_ERROR, f"the {raw.format_code} decoder failed: {exc}") from None

    async def _authenticate(self, decoded: Decoded, source_id: str) -> tuple[list[Reading], list[dict[str, Any]]]:
        """Split readings into authenticated ones and refusals (index, der_id, error), auditing each refusal."""
        auth = self._auth
        now = time.monotonic()
        if now - self._registry_checked >= _REGISTRY_CHECK_S:
            self._registry_checked = now
            auth.refresh()  # the operator's rotate, reset or revoke (another process) counts at once
        good: list[Reading] = []
        slow: list[tuple[int, Reading]] = []
        refused: list[tuple[int, str | None, HubError]] = []
        for index, item in enumerate(decoded.items):
            if isinstance(item, HubError):
                refused.append((index, item.der_id, item))
                continue
            verdict = auth.der_precheck(item.der_id, item.password or "")
            if verdict is True:
                good.append(item)
            elif verdict is None:
                slow.append((index, item))
            else:
                refused.append((index, item.der_id, verdict))
        if slow:
            # A few checks at a time: the bcrypt pool runs two at once anyway, and a message's hundred checks
            # in flight, times every message in hand, held hundreds of MB (bench/README.md, memory).
            verdicts: list[HubError | None] = []
            for start in range(0, len(slow), _BCRYPT_AT_ONCE):
                chunk = slow[start : start + _BCRYPT_AT_ONCE]
                verdicts += await asyncio.gather(*(auth.check_der(r.der_id, r.password or "") for _, r in chunk))
            for (index, reading), error in zip(slow, verdicts, strict=True):
                if error is None:
                    good.append(reading)
                else:
                    refused.append((index, reading.der_id, error))
        rejected = []
        for index, der_id, error in sorted(refused, key=lambda item: item[0]):
            event = "auth.failed" if error.code in _AUTH_CODES else "data.rejected"
            self._audit.append(
                event, error.code.value, source_id=source_id, index=index, der_id=der_id, reason=error.message
            )
            rejected.append({"index": index, "der_id": der_id, "error": error.as_dict()})
        for reading in good:
            reading.password = None  # not needed past this point; keep it out of every later structure
        return good, rejected

    def keep(self, raw: RawMessage, error: HubError) -> None:
        """Keep a message the hub could not take in quarantine, whole, and audit it."""
        entry = self._quarantine.add(
            received_at=raw.received_at,
            topic=raw.topic,
            format_code=raw.format_code,
            source_id=raw.source_id,
            code=error.code.value,
            reason=error.message,
            payload=raw.payload,
        )
        self._audit.append(
            "data.quarantined",
            error.code.value,
            source_id=raw.source_id,
            topic=raw.topic,
            quarantine_id=entry,
            size=len(raw.payload),
            reason=error.message,
        )
        self._audit.flush()
        logger.info("quarantined {} bytes from {} as #{}: {}", len(raw.payload), raw.topic, entry, error.message)


# How often the data path asks SQLite whether the operator changed the registry (about 12 µs a time): at most
# every 10 ms, so under load it costs next to nothing and a rotate, reset or revoke counts within 10 ms.
_REGISTRY_CHECK_S = 0.01
_BCRYPT_AT_ONCE = 4  # per message; the hub's bcrypt pool has two threads
_AUTH_CODES = {ErrorCode.BAD_CREDENTIALS, ErrorCode.UNKNOWN_DER, ErrorCode.NOT_ALLOWED}
