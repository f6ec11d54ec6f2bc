"""The data path: a raw message → decoded readings → authenticated → committed → the sender's answer.

Readings of one message are judged one by one: good ones are stored, bad ones are refused with a code. A
message that cannot be decoded at all goes to quarantine (its first bytes, size and hash), so nothing received
is lost without a trace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from loguru import logger

from hubd import decode
from hubd.audit import AuditLog
from hubd.auth import Authenticator, Refused
from hubd.clock.state import Clocks
from hubd.config import LimitsConfig
from hubd.decode.native import ReplyRule, sent_at_of
from hubd.decode.registry import Decoded, Limits
from hubd.model import ErrorCode, HubError, RawMessage, Reading, Sender
from hubd.quarantine import Quarantine
from hubd.store import Rows, add_flagged_rows, add_rows
from hubd.store.writer import BatchWriter, Write

Answer = tuple[dict[str, Any], Decoded | None]  # the answer, and what was decoded (for the reply address)
Outcome = Answer | BaseException
"""What becomes of a message: its answer; or the exception a bug of the hub's raised on it; or
``asyncio.CancelledError`` when the hub stopped before it was committed (then it must not be acknowledged)."""
_NO_ANSWER = HubError(ErrorCode.INTERNAL, "no answer was made for this message")  # a bug if ever seen


class _Reply:
    """Where one message's outcome goes, exactly once (the first outcome given wins)."""

    __slots__ = ("_to", "given")

    def __init__(self, to: Callable[[Outcome], None]) -> None:
        self._to = to
        self.given = False

    def __call__(self, outcome: Outcome) -> None:
        if self.given:
            return
        self.given = True
        try:
            self._to(outcome)
        except Exception:  # the receiver's own failure: logged, and it must not stop the other messages
            logger.exception("handing a message's outcome on failed")


# A message whose readings wait for the group's commit: where its outcome goes, the message, what was decoded,
# its rows, and its refused readings for the answer.
_ToCommit = tuple[_Reply, RawMessage, Decoded, Write, list[dict[str, Any]]]


@dataclass(slots=True)
class _Checked:
    """A decoded message, its readings split by what memory knows of their credentials."""

    raw: RawMessage
    decoded: Decoded
    source_id: str
    good: list[Reading]
    slow: list[tuple[int, Reading]]
    refused: Refused
    gateway_pending: bool = False  # sent by a gateway whose password only bcrypt can judge


class Ingest:
    """Turns data messages into committed readings and the answer their sender is owed."""

    def __init__(
        self,
        auth: Authenticator,
        writer: BatchWriter,
        quarantine: Quarantine,
        audit: AuditLog,
        limits: LimitsConfig,
        replies: ReplyRule | None = None,
        clocks: Clocks | None = None,
    ) -> None:
        self._auth = auth
        self._clocks = clocks  # None: a hub that judges no clocks (tests of other parts)
        self._refuse_bad_clock = clocks is not None and clocks.config.edges.bad_clock == "refuse"
        self._replies = replies  # where answers may go; None: a hub without a request/response source
        self._writer = writer
        self._quarantine = quarantine
        self._audit = audit
        self._limits = limits
        self._max_future_ms = int(limits.max_future_s * 1000)
        self._intake: list[tuple[RawMessage, _Reply]] = []
        self._intake_bytes = 0
        self._groups: set[asyncio.Task[None]] = set()
        # Read by the metrics at scrape time (hubd.ops.metrics): an addition per message, none per reading.
        self.messages = 0  # data messages taken in
        self.readings = 0  # readings they held, once decoded
        self.refused: dict[str, int] = {}  # readings refused, by error code
        self.kept: dict[str, int] = {}  # messages quarantined, by error code

    def submit(self, raw: RawMessage, reply: Callable[[Outcome], None]) -> None:
        """Take in one data message; ``reply`` is called once, later, with its outcome.

        The messages that arrive in one turn of the event loop are taken in together: decoded and checked one
        after the other, committed in one write, so the hub does each step for many messages at a time instead
        of switching between messages at every step (case A of bench/ingest: most of its time went there).
        """
        self._intake.append((raw, _Reply(reply)))
        self.messages += 1
        self._intake_bytes += len(raw.payload)
        if len(self._intake) == 1:
            asyncio.get_running_loop().call_soon(self._take_intake)
        elif len(self._intake) >= _GROUP_MESSAGES or self._intake_bytes >= _GROUP_BYTES:
            self._take_intake()  # a group no larger than this, so decoding and committing overlap

    def _take_intake(self) -> None:
        intake, self._intake, self._intake_bytes = self._intake, [], 0
        if not intake:
            return
        group = asyncio.get_running_loop().create_task(self._handle_group(intake))
        self._groups.add(group)  # a strong reference while it runs
        group.add_done_callback(self._groups.discard)

    async def _handle_group(self, intake: list[tuple[RawMessage, _Reply]]) -> None:
        """Reply to each message as soon as its own outcome is known: its answer, or the exception a bug of
        the hub's raised on it (that message's alone). Cancelled (the hub stopping): the messages not yet
        answered get CancelledError, so they are not acknowledged and the broker delivers them again."""
        replies = [reply for _, reply in intake]
        try:
            await self._handle_many([raw for raw, _ in intake], replies)
        except asyncio.CancelledError as exc:
            for reply in replies:
                reply(exc)
            raise
        except Exception as exc:  # a failure of the group's own steps (the audit log): every message left
            for reply in replies:
                reply(exc)
        for reply in replies:
            if not reply.given:
                reply(_NO_ANSWER)  # a bug if any is left

    async def _handle_many(self, raws: list[RawMessage], replies: list[_Reply]) -> None:
        # The operator's rotate, reset or revoke (another process) counts for every message after its commit:
        # asked once per group (PRAGMA data_version, ~12 µs), not per message (4 % of case A's time).
        self._auth.refresh()
        ready: list[tuple[_Reply, Outcome]] = []
        writes: list[_ToCommit] = []
        slow: list[Awaitable[None]] = []
        for raw, reply in zip(raws, replies, strict=True):
            try:
                checked = self._check(raw)
                if not isinstance(checked, _Checked):
                    ready.append((reply, checked))
                elif checked.slow or checked.gateway_pending:  # on its own: the others need not wait for bcrypt
                    slow.append(self._finish_slow(checked, reply))
                elif (answer := self._finish(checked, reply, writes)) is not None:
                    ready.append((reply, answer))
            except Exception as exc:  # a bug on one message must not fail the others
                ready.append((reply, exc))
        self._audit.flush()  # refusals and quarantined messages are written before their answers
        for reply, outcome in ready:
            reply(outcome)
        await asyncio.gather(self._commit(writes), *slow)

    def _check(self, raw: RawMessage) -> _Checked | Answer:
        """Decode and check credentials from memory; a message that cannot be decoded is kept and answered."""
        try:
            decoded = self._decode(raw)
        except HubError as exc:
            self.keep(raw, exc)
            return {"ok": False, "error": exc.as_dict()}, None
        source_id = decoded.source_id or raw.source_id
        # A reply address the hub may not answer on refuses the message before anything is stored
        # (docs/protocol.md, Answers). Most messages have one, found good in a cached set.
        if self._replies is not None and (raw.requester is not None or decoded.reply_to is not None):
            try:
                self._replies.check(raw.requester, decoded.reply_to)
            except HubError as exc:
                self.keep(raw, exc, source_id)
                return {"ok": False, "error": exc.as_dict()}, None
        # Whom the message speaks for: its source's sender, or the gateway it names (the DERs bound to it, or
        # why it is refused; None while only bcrypt can judge its password).
        sender = raw.sender if decoded.gateway is None else self._auth.gateway_precheck(*decoded.gateway)
        if sender is None:
            return _Checked(raw, decoded, source_id, [], [], [], gateway_pending=True)
        good, slow, refused = self._precheck(sender, decoded)
        return _Checked(raw, decoded, source_id, good, slow, refused)

    async def _finish_slow(self, checked: _Checked, reply: _Reply) -> None:
        """A message with credentials only bcrypt can judge: checked and committed on its own."""
        try:
            if checked.gateway_pending:
                assert checked.decoded.gateway is not None
                sender = await self._auth.check_gateway(*checked.decoded.gateway)
                checked.good, checked.slow, checked.refused = self._precheck(sender, checked.decoded)
            await self._check_slow(checked.slow, checked.good, checked.refused, checked.source_id)
            writes: list[_ToCommit] = []
            answer = self._finish(checked, reply, writes)
            self._audit.flush()
            if answer is not None:
                reply(answer)
            await self._commit(writes)
        except Exception as exc:
            reply(exc)

    def _finish(self, checked: _Checked, reply: _Reply, writes: list[_ToCommit]) -> Answer | None:
        """Audit the refusals; the answer of a message with nothing to store, else add its rows to ``writes``."""
        raw, decoded, source_id, good = checked.raw, checked.decoded, checked.source_id, checked.good
        flag = None
        if good and self._clocks is not None:  # the message's evidence of its source's clock, and the verdict
            newest = good[0].measured_at if len(good) == 1 else max(map(_MEASURED_AT, good))
            flag = self._clocks.observe(source_id, raw.received_at, newest, raw.sender.kind == "mqtt")
            if flag is not None and self._refuse_bad_clock:
                self._refuse_clock(checked, flag)
                good, flag = checked.good, None
        rejected = self._refusals(checked.refused, source_id) if checked.refused else []
        self.readings += len(decoded.items)
        if not good:
            self._audit.append(
                "data.received", "rejected", source_id=source_id, topic=raw.topic, readings=len(decoded.items)
            )
            return {"ok": True, "accepted": 0, "rejected": rejected}, decoded
        for r in good:
            r.password = None  # not needed past this point; keep it out of every later structure
        rows: Rows = []
        tail = (raw.received_at, source_id, raw.format_code, decoded.sent_at)
        if flag is None:
            add_rows(rows, good, tail)
        else:
            add_flagged_rows(rows, good, tail, flag)
        der_ids = {r.der_id for r in good}
        writes.append((reply, raw, decoded, Write(source_id, rows, len(good), der_ids, len(decoded.items)), rejected))
        return None

    @staticmethod
    def _refuse_clock(checked: _Checked, flag: tuple[str, float]) -> None:
        """``time.edges.bad_clock: refuse``: the message's good readings are refused (``bad_request``), since
        the times they carry are known to be wrong; the source corrects its clock and sends them again."""
        how, offset = flag
        found = "a check" if how == "check" else "its readings' times"
        error = HubError(
            ErrorCode.BAD_REQUEST,
            f"the clock of source {checked.source_id} is {offset:+.3f} s off the hub's ({found}); "
            "correct it and send these readings again",
        )
        index = {id(item): i for i, item in enumerate(checked.decoded.items)}
        checked.refused.extend((index.get(id(r), -1), r.der_id, error) for r in checked.good)
        checked.good = []

    async def _commit(self, writes: list[_ToCommit]) -> None:
        """Commit the messages' readings together, then answer each; if the store fails, keep each whole."""
        if not writes:
            return
        try:
            await self._writer.write([write for _, _, _, write, _ in writes])
        except HubError as exc:
            for reply, raw, decoded, _, _ in writes:
                try:
                    self.keep(raw, exc)  # so it can be replayed
                    reply(({"ok": False, "error": exc.as_dict()}, decoded))
                except Exception as failed:
                    reply(failed)
            return
        except Exception as exc:
            for reply, *_ in writes:
                reply(exc)
            return
        for reply, _, decoded, write, rejected in writes:
            reply(({"ok": True, "accepted": write.readings, "rejected": rejected}, decoded))

    async def close(self, timeout_s: float = 5.0) -> None:
        """Let the groups in hand finish (the driver has stopped taking messages), then cancel what is left."""
        self._take_intake()
        if not self._groups:
            return
        _, late = await asyncio.wait(set(self._groups), timeout=timeout_s)
        for group in late:
            group.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    def _decode(self, raw: RawMessage) -> Decoded:
        if len(raw.payload) > self._limits.max_payload_bytes:
            raise HubError(
                ErrorCode.TOO_LARGE,
                f"the payload has {len(raw.payload)} bytes; the limit is {self._limits.max_payload_bytes}",
            )
        if raw.readings is not None:  # a source that reads values, not payloads
            most = self._limits.max_readings_per_message
            if len(raw.readings) > most:
                raise HubError(ErrorCode.TOO_LARGE, f"{len(raw.readings)} readings in one message; the limit is {most}")
            # the hub read them itself: the version is when it did, so a later read replaces an earlier one
            return Decoded(raw.source_id, raw.readings, sent_at=raw.received_at)
        decoder = decode.decoder_for(raw.format_code)
        # The message's own receive time: "too far in the future" is judged against it, and a vendor format's
        # ``default: received`` time is it.
        limits = Limits(
            raw.received_at,
            self._max_future_ms,
            self._limits.max_readings_per_message,
            raw.properties,
            raw.sender.ders is not None,
        )
        try:
            decoded = decoder(raw.payload, limits)
        except HubError:
            raise
        except Exception as exc:  # a decoder must never take the daemon down
            logger.exception("decoder {} failed on a payload from {}", raw.format_code, raw.topic)
            raise HubError(ErrorCode.DECODE_ERROR, f"the {raw.format_code} decoder failed: {exc}") from None
        if decoded.sent_at is None and raw.properties and "sent_at" in raw.properties:
            decoded.sent_at = _sent_at_property(raw.properties["sent_at"], limits)
        return decoded

    def _precheck(
        self, sender: Sender | HubError, decoded: Decoded
    ) -> tuple[list[Reading], list[tuple[int, Reading]], Refused]:
        """May the sender write these readings? Split by what memory knows: allowed, needing bcrypt (index,
        reading), refused (index, der_id, error). A refused gateway refuses each of its readings."""
        if isinstance(sender, HubError):
            items = decoded.items
            return [], [], [(i, r.der_id, r if isinstance(r, HubError) else sender) for i, r in enumerate(items)]
        return self._auth.split_readings(decoded.items, sender)

    async def _check_slow(
        self, slow: list[tuple[int, Reading]], good: list[Reading], refused: Refused, source_id: str
    ) -> None:
        """bcrypt the credentials memory does not know, adding each reading to ``good`` or ``refused``; each
        check spends the budgets of its DER and of the message's source."""
        # A few checks at a time: the bcrypt pool runs two at once anyway, and a message's hundred checks
        # in flight, times every message in hand, held hundreds of MB (bench/README.md, memory).
        auth = self._auth
        verdicts: list[HubError | None] = []
        for start in range(0, len(slow), _BCRYPT_AT_ONCE):
            chunk = slow[start : start + _BCRYPT_AT_ONCE]
            verdicts += await asyncio.gather(*(auth.check_der(r.der_id, r.password or "", source_id) for _, r in chunk))
        for (index, reading), error in zip(slow, verdicts, strict=True):
            if error is None:
                good.append(reading)
            else:
                refused.append((index, reading.der_id, error))

    def _refusals(self, refused: Refused, source_id: str) -> list[dict[str, Any]]:
        """Describe each refused reading for the answer, in the message's order, and audit the message's
        refusals as one record per event: its counts by code and the first few reasons, not a record per
        reading. A message of 10,000 refused readings added 3.47 MB to the audit trail that way; now it adds
        one or two records of a bounded size, and the sender's answer still names every reading."""
        rejected = []
        summaries: dict[str, _Refusals] = {}
        for index, der_id, error in sorted(refused, key=lambda item: item[0]):
            event = "auth.failed" if error.code in _AUTH_CODES else "data.rejected"
            summary = summaries.get(event)
            if summary is None:
                summary = summaries[event] = _Refusals()
            summary.add(index, der_id, error)
            rejected.append({"index": index, "der_id": der_id, "error": error.as_dict()})
        for event, summary in summaries.items():
            self._audit.append(event, summary.outcome(), source_id=source_id, **summary.fields())
            for code, n in summary.codes.items():
                self.refused[code] = self.refused.get(code, 0) + n
        return rejected

    def keep(self, raw: RawMessage, error: HubError, source_id: str | None = None) -> None:
        """Keep a message the hub could not take in quarantine (its payload's first bytes, its size and hash),
        and audit it, under ``source_id`` when its body named one that was read."""
        source_id = source_id or raw.source_id
        self.kept[error.code.value] = self.kept.get(error.code.value, 0) + 1
        entry = self._quarantine.add(
            received_at=raw.received_at,
            topic=raw.topic,
            format_code=raw.format_code,
            source_id=source_id,
            code=error.code.value,
            reason=error.message,
            payload=raw.payload,
        )
        self._audit.append(
            "data.quarantined",
            error.code.value,
            source_id=source_id,
            topic=raw.topic,
            quarantine_id=entry.id,
            size=len(raw.payload),
            kept=entry.kept,
            sha256=entry.sha256,
            reason=short(error.message),
        )
        self._audit.flush()
        logger.info(
            "quarantined {} bytes ({} kept) from {} as #{}: {}",
            len(raw.payload),
            entry.kept,
            raw.topic,
            entry.id,
            short(error.message),
        )


class _Refusals:
    """One message's refusals of one kind (authentication or the checks), as its audit record tells them."""

    __slots__ = ("codes", "der_ids", "first", "readings")

    def __init__(self) -> None:
        self.readings = 0
        self.codes: dict[str, int] = {}
        self.der_ids: dict[str, None] = {}  # distinct, in the message's order
        self.first: list[dict[str, Any]] = []

    def add(self, index: int, der_id: str | None, error: HubError) -> None:
        self.readings += 1
        code = error.code.value
        self.codes[code] = self.codes.get(code, 0) + 1
        if der_id is not None:
            self.der_ids[der_id] = None
        if len(self.first) < AUDITED_REASONS:
            self.first.append({"index": index, "der_id": der_id, "code": code, "reason": short(error.message)})

    def outcome(self) -> str:
        """The code of every refusal, or ``mixed`` when they differ (``codes`` counts each)."""
        return next(iter(self.codes)) if len(self.codes) == 1 else "mixed"

    def fields(self) -> dict[str, Any]:
        return {
            "readings": self.readings,
            "codes": self.codes,
            "der_count": len(self.der_ids),
            "der_ids": list(self.der_ids)[:AUDITED_REASONS],  # so `hubd audit tail --der` finds the record
            "refusals": self.first,
        }


def _sent_at_property(stated: str, limits: Limits) -> int:
    """The MQTT v5 user property ``sent_at``, for a message whose body has none (a vendor payload): RFC 3339
    with an offset, or epoch milliseconds in digits (a property is always a string)."""
    number = stated.strip()
    digits = number.isascii() and number.lstrip("-").isdigit() and len(number) < 20
    return sent_at_of(int(number) if digits else stated, limits)


def short(reason: str) -> str:
    """A reason as the audit trail keeps it: a decoder's reason may quote the sender's text (an unknown field's
    name), which is the sender's to make as long as the payload, so a record keeps its first characters."""
    return reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 1] + "…"


_MEASURED_AT = attrgetter("measured_at")
AUDITED_REASONS = 10
"""The refusals one audit record describes one by one (the first of the message's); the rest are counted."""
_REASON_CHARS = 200
_GROUP_MESSAGES = 100  # most messages taken in together (one loop turn brings ~60 of case A's)
_GROUP_BYTES = 256 * 1024  # and their payloads' bytes: ~14 of case B's 100-reading messages
_BCRYPT_AT_ONCE = 4  # per message; the hub's bcrypt pool has two threads
_AUTH_CODES = {ErrorCode.BAD_CREDENTIALS, ErrorCode.UNKNOWN_DER, ErrorCode.NOT_ALLOWED, ErrorCode.RATE_LIMITED}
