"""The MQTT source: edge terminals' data and the market system's requests, over one MQTT v5 connection.

``<prefix>/data`` and ``<prefix>/data/<format code>`` go to the pipeline as raw messages of the sender
``EDGE`` (each reading carries its DER's password); ``<prefix>/<service>`` goes to that service. Each
message's answer goes back on the MQTT v5 response topic (with its correlation data) or on the v3.1.1
``reply_to`` of the body, and only then is the message acknowledged to the broker (docs/protocol.md).
The MQTT session itself is ``hubd.mqtt``; this module is the hub's routing and answering on top of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from loguru import logger

from hubd.audit import AuditLog
from hubd.broker import BrokerUnreachable
from hubd.config import BrokerConfig, LimitsConfig
from hubd.decode import load_json_object
from hubd.decode.native import ReplyRule, reply_fields, valid_id
from hubd.ingest import Outcome
from hubd.model import ErrorCode, HubError, RawMessage, Sender, now_ms
from hubd.mqtt.driver import AnswerTooLarge, Done, MqttDriver, MqttError, per_message
from hubd.mqtt.packets import reason_text
from hubd.services import Request, Service, Settled, refusal
from hubd.sources import Health, Pipeline

ANSWER_ACK_TIMEOUT_S = 30.0  # a request's answer not acknowledged by the broker by then counts as not delivered


class MqttSource:
    """Routes the hub's topics to the pipeline and the services, and answers each message before its ack."""

    kind = "mqtt"

    def __init__(
        self,
        config: BrokerConfig,
        url: str,
        prefix: str,
        replies: ReplyRule,
        limits: LimitsConfig,
        services: list[Service],
        audit: AuditLog,
        count: Callable[[str, str], None],
        password: str | None = None,
        debug: bool = False,
        vouched: bool = False,
    ) -> None:
        self.name = config.client_id
        self._debug = debug  # log.level DEBUG: a line per data answer
        self._url = url
        self._limits = limits
        self._audit = audit
        self._count = count  # a frequent event, for the next coalesced audit record
        self._services = {f"{prefix}/{service.name}": service for service in services}
        self._replies = replies  # never an answer inside the hub's own topics (docs/protocol.md)
        self.data_topic = f"{prefix}/data"
        self._data_prefix = self.data_topic + "/"  # hub/v1/data/<format code>
        # hub/v1/der/<der id>/data[/<format code>]: only with access control at the broker, which lets that DER's
        # client alone publish there; the topic is then the proof of sender (docs/protocol.md).
        self._der_prefix = f"{prefix}/der/" if vouched else None
        own = [f"{prefix}/der/+/data", f"{prefix}/der/+/data/+"] if vouched else []
        self._requests = per_message(self._on_request)
        self._pipeline: Pipeline | None = None
        self._stopped = asyncio.Event()
        self.answers: dict[str, int] = {}  # answers sent, by topic (data, or a service's): read by the metrics
        self.driver = MqttDriver(
            config,
            url,
            [*self._services, self.data_topic, self.data_topic + "/+", *own],
            self.on_message,
            password=password,
            status_topic=f"{prefix}/status",
        )

    @property
    def health(self) -> Health:
        if self._pipeline is None:
            return "stopped" if self._stopped.is_set() else "starting"
        return "up" if self.driver.connected else "down"

    async def start(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._stopped.clear()
        try:
            await self.driver.start()
        except (OSError, TimeoutError, MqttError) as exc:
            self._pipeline = None
            where = f"{urlsplit(self._url).scheme}://{self.driver.address}"  # never the URL's user or password
            raise BrokerUnreachable(f"cannot connect to the broker at {where}: {exc or type(exc).__name__}") from exc

    async def run(self) -> None:
        """Until stopped: the driver reconnects by itself after the broker goes away."""
        await self._stopped.wait()

    async def stop(self) -> None:
        """Take no new messages; answer and acknowledge those the pipeline finishes meanwhile."""
        if self._pipeline is not None:
            await self.driver.stop()
        self._pipeline = None
        self._stopped.set()

    # -- routing --------------------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, properties: dict[str, Any], done: Done) -> None:
        """Route one message: data to the pipeline (taken in with the others of its loop turn), a request to
        a task of its own. ``done(True)`` once it is answered (or needs no answer), so the driver acknowledges
        it."""
        if self._is_data(topic):
            assert self._pipeline is not None
            raw = self._raw_message(topic, payload, properties)
            if raw.properties and not valid_id(raw.source_id):  # only a user property can break the id rule
                self._refuse_source_id(raw, properties, done)
                return
            self._pipeline.submit(raw, partial(self._data_answered, raw, properties, done))
        else:
            self._requests(topic, payload, properties, done)

    def _data_answered(self, raw: RawMessage, properties: dict[str, Any], done: Done, outcome: Outcome) -> None:
        """Send a data message's answer, then let the driver acknowledge it; stopping: not acknowledged."""
        if isinstance(outcome, asyncio.CancelledError):
            done(False)
            return
        try:
            if isinstance(outcome, BaseException):
                self._failed(raw.topic, payload=raw.payload, properties=properties, exc=outcome, raw=raw)
            else:
                answer, decoded = outcome
                reply_to, request_id = (decoded.reply_to, decoded.request_id) if decoded else _reply_of(raw.payload)
                response_topic, correlation = _v5_reply(properties)
                source_id = decoded.source_id or raw.source_id if decoded else raw.source_id
                answered = self._answer(answer, response_topic, correlation, reply_to, request_id)
                if answered:
                    self._count("data.answered", source_id)
                    self.answers["data"] = self.answers.get("data", 0) + 1
                if self._debug:  # asked first: the call's arguments cost ~1 µs a message even when not logged
                    logger.debug(
                        "data on {} from {}: {} in {} ms{}",
                        raw.topic,
                        source_id,
                        _data_outcome(answer),
                        now_ms() - raw.received_at,
                        "" if answered else " (no reply address)",
                    )
        except Exception:
            logger.exception("message on {} failed; not acknowledged, the broker will deliver it again", raw.topic)
            done(False)
            return
        done(True)

    def _refuse_source_id(self, raw: RawMessage, properties: dict[str, Any], done: Done) -> None:
        """A data message whose MQTT v5 user property ``source_id`` breaks the id rule: kept whole in quarantine
        under the source ``unknown`` (the stated text goes to neither the audit trail nor the store), refused
        ``bad_request`` and acknowledged."""
        assert self._pipeline is not None
        stated = raw.source_id
        raw.source_id = "unknown"
        error = HubError(
            ErrorCode.BAD_REQUEST,
            f"source_id (MQTT v5 user property, {len(stated)} characters) must be 1-64 characters of letters, "
            "digits and ._:-",
        )
        try:
            self._pipeline.keep(raw, error)
            self._answer(refusal(error), *_v5_reply(properties), *_reply_of(raw.payload))
        except Exception:
            logger.exception("message on {} failed; not acknowledged, the broker will deliver it again", raw.topic)
            done(False)
            return
        done(True)

    async def _on_request(self, topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        try:
            await self._serve(topic, payload, properties)
        except Exception as exc:
            self._failed(topic, payload, properties, exc)

    async def _serve(self, topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        """A request (registration, query, time): answered by its service, from its own task."""
        service = self._services.get(topic)
        if service is None:
            return
        started = time.perf_counter()
        response_topic, correlation = _v5_reply(properties)
        body, error = _json_request(payload, self._limits.max_payload_bytes)
        reply_to, request_id, refused = None, None, None
        if body:
            try:
                reply_to, request_id = reply_fields(body)
            except HubError as exc:
                refused = exc
        refused = refused or self._replies.refusal(response_topic, reply_to)
        requester = response_topic or reply_to
        if refused is not None:  # not handed to the service: nothing is registered, queried or told
            self._audit.append("request.refused", refused.code.value, topic=topic, reason=refused.message)
            answer = refusal(refused)
        else:
            answer = await service.handle(Request(body, error, requester))
        self._audit.flush()  # audited before answered
        verdict: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        size = self._answer(answer, response_topic, correlation, reply_to, request_id, partial(_told, verdict))
        outcome = "ok" if answer.get("ok") else answer["error"]["code"]
        settled = service if isinstance(service, Settled) else None
        failure = await self._delivery(verdict, settled is not None) if size else "no reply address"
        if size:
            if failure is None:
                self._audit.append("answer.sent", outcome, topic=topic, requester=requester, bytes=size)
                self.answers[service.name] = self.answers.get(service.name, 0) + 1
            else:  # the broker's verdict, never ``ok``: the requester did not get its answer
                self._audit.append("answer.sent", "refused", topic=topic, requester=requester, reason=failure)
                logger.warning("the answer on {} to {} was not delivered: {}", topic, requester, failure)
        if settled is not None:
            await settled.settle(answer, requester, failure)
        self._audit.flush()
        # The outcome's code only: a registration's answer carries the DER's new password.
        logger.debug(
            "request on {} from {} via {}: {} in {:.1f} ms{}",
            topic,
            _named(body),
            requester,
            outcome,
            (time.perf_counter() - started) * 1000,
            "" if size else " (no reply address)",
        )

    async def _delivery(self, verdict: asyncio.Future[int], settled: bool) -> str | None:
        """Why an answer was not delivered (the broker refused it, or did not acknowledge it in time); None
        when the broker took it. A refused answer is not sent again: the broker would refuse it again. An answer
        that must reach its requester (``settled``: a new password) also fails on 0x10, "no matching
        subscribers": nobody was there to receive it."""
        try:
            code = await asyncio.wait_for(asyncio.shield(verdict), ANSWER_ACK_TIMEOUT_S)
        except TimeoutError:
            return f"the broker did not acknowledge it within {ANSWER_ACK_TIMEOUT_S:g} s"
        if code >= 0x80 or (settled and code == 0x10):
            return f"the broker refused it: {reason_text(code)}"
        return None

    def _failed(
        self,
        topic: str,
        payload: bytes,
        properties: dict[str, Any],
        exc: BaseException,
        raw: RawMessage | None = None,
    ) -> None:
        """A failure of the hub's own: answered ``internal`` and the payload kept.

        Acknowledging such a message (after keeping it) stops one poison message from being delivered again
        and again; if even keeping it fails, the exception propagates and the broker keeps the message.
        """
        logger.opt(exception=exc).error("internal error on a message on {}", topic)
        reason = f"internal error ({type(exc).__name__}); the message is kept for the operator"
        if self._is_data(topic):
            assert self._pipeline is not None
            self._pipeline.keep(
                raw or self._raw_message(topic, payload, properties), HubError(ErrorCode.INTERNAL, reason)
            )
        else:
            self._audit.append("request.failed", "internal", topic=topic, reason=reason)
        self._audit.flush()
        reply_to, request_id = _reply_of(payload)
        error = HubError(ErrorCode.INTERNAL, "the hub failed on this message; the operator can find it")
        self._answer(refusal(error), *_v5_reply(properties), reply_to, request_id)

    def _is_data(self, topic: str) -> bool:
        return (
            topic == self.data_topic
            or topic.startswith(self._data_prefix)
            or (self._der_prefix is not None and topic.startswith(self._der_prefix))
        )

    def _raw_message(self, topic: str, payload: bytes, properties: dict[str, Any]) -> RawMessage:
        """A data message as the pipeline takes it: the format code from the topic, the v5 user properties."""
        user = _user_properties(properties)
        if self._der_prefix is not None and topic.startswith(self._der_prefix):
            return self._own_topic(topic, payload, properties, user)
        return RawMessage(
            source_id=user.get("source_id", "unknown"),
            format_code=topic[len(self._data_prefix) :] or "hub.v1",
            payload=payload,
            received_at=now_ms(),
            topic=topic,
            requester=_first(properties.get("response_topic")),
            properties=user,
        )

    def _own_topic(self, topic: str, payload: bytes, properties: dict[str, Any], user: dict[str, str]) -> RawMessage:
        """A message on a DER's own topic: the broker let that DER's client alone publish it, so the sender is
        that DER, which may write its own readings without passwords and no other's."""
        assert self._der_prefix is not None
        der_id, _, rest = topic[len(self._der_prefix) :].partition("/data")
        return RawMessage(
            source_id=user.get("source_id", der_id),
            format_code=rest[1:] or "hub.v1",
            payload=payload,
            received_at=now_ms(),
            topic=topic,
            requester=_first(properties.get("response_topic")),
            properties=user,
            sender=Sender("topic", self._der_prefix + der_id, frozenset((der_id,))),
        )

    def _answer(
        self,
        body: dict[str, Any],
        response_topic: str | None,
        correlation: bytes | None,
        reply_to: str | None,
        request_id: Any,
        verdict: Callable[[int], None] | None = None,
    ) -> int:
        """Answer on the v5 response topic, else on the v3.1.1 ``reply_to``; nothing when neither is set, nor
        on an address the hub may not use (``ReplyRule``). An answer larger than the broker takes (a query page
        of many fields, a data answer naming thousands of refused readings) is replaced by a ``too_large``
        refusal that says so."""
        try:
            return self._publish(body, response_topic, correlation, reply_to, request_id, verdict)
        except AnswerTooLarge as exc:
            message = f"{exc}; ask for fewer rows or fields"
            if "accepted" in body:  # a data answer: what became of the readings all the same
                message = f"{exc}; {body['accepted']} readings accepted, {len(body['rejected'])} refused"
            logger.warning("not sent: {}", message)
            refused = refusal(HubError(ErrorCode.TOO_LARGE, message))
            size = self._publish(refused, response_topic, correlation, reply_to, request_id)
            if verdict is not None and size:
                verdict(0x95)  # the answer itself never went, only its refusal: "packet too large"
            return size

    def _publish(
        self,
        body: dict[str, Any],
        response_topic: str | None,
        correlation: bytes | None,
        reply_to: str | None,
        request_id: Any,
        verdict: Callable[[int], None] | None = None,
    ) -> int:
        """A refused response topic is not replaced by ``reply_to``: the sender asked for its answer there."""
        if response_topic:
            if not self._replies.allows(response_topic):
                return 0
            return self.driver.publish(response_topic, body, correlation, verdict)
        if reply_to and self._replies.allows(reply_to):
            if request_id is not None:
                body = {**body, "request_id": request_id}
            return self.driver.publish(reply_to, body, verdict=verdict)
        return 0


def _told(verdict: asyncio.Future[int], code: int) -> None:
    """The broker's PUBACK reason code for an answer, to the request waiting for it (if it still waits)."""
    if not verdict.done():
        verdict.set_result(code)


def _data_outcome(answer: dict[str, Any]) -> str:
    """A data answer in a few words for the DEBUG log: how many readings were taken, or the error's code."""
    if not answer.get("ok"):
        return str(answer["error"]["code"])
    return f"ok, accepted {answer['accepted']}, rejected {len(answer['rejected'])}"


def _named(body: dict[str, Any] | None) -> str:
    """Who a request says it comes from (a DER id or a system's client id), for the DEBUG log."""
    for key in ("der_id", "client_id"):
        name = body.get(key) if body else None
        if isinstance(name, str):
            return name[:64]
    return "?"


def _first(values: Any) -> Any:
    return values[0] if values else None


def _v5_reply(properties: dict[str, Any]) -> tuple[str | None, bytes | None]:
    """Where an MQTT v5 sender wants its answer: the response topic and the correlation data to echo."""
    return _first(properties.get("response_topic")), _first(properties.get("correlation_data"))


def _user_properties(properties: dict[str, Any]) -> dict[str, str]:
    """The MQTT v5 user properties as a dict (a key sent twice: the last value); a vendor format may read them."""
    pairs = properties.get("user_property")
    return {str(key): str(value) for key, value in pairs} if pairs else {}


def _reply_of(payload: bytes) -> tuple[str | None, Any]:
    try:
        return reply_fields(load_json_object(payload))
    except HubError:
        return None, None


def _json_request(payload: bytes, max_bytes: int) -> tuple[dict[str, Any] | None, HubError | None]:
    if len(payload) > max_bytes:
        return None, HubError(ErrorCode.TOO_LARGE, f"the payload has {len(payload)} bytes; the limit is {max_bytes}")
    try:
        return load_json_object(payload), None
    except HubError as exc:
        return None, exc
