"""Wiring: the hub's parts built from the config and connected along the flow.

driver (MQTT) → topic routing → ingest (formats → auth → store) | registration | query | time,
with every step appending to the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loguru import logger

from hubd.audit import AuditLog
from hubd.auth import Authenticator
from hubd.auth.registration import Registration
from hubd.auth.registry import Registry
from hubd.broker import BrokerUnreachable, EmbeddedBroker
from hubd.config import Config
from hubd.decode.native import reply_fields
from hubd.decode.registry import load_json_object
from hubd.decode.vendor import Catalog, Change
from hubd.drivers.mqtt import Done, MqttDriver, MqttError, per_message
from hubd.ingest import Ingest, Outcome
from hubd.model import ErrorCode, HubError, RawMessage, format_time, now_ms
from hubd.quarantine import Quarantine
from hubd.query.conditions import parse_query
from hubd.query.execute import run as run_query
from hubd.store.factory import open_query, open_sink
from hubd.store.writer import BatchWriter


class Hub:
    """One running hub: owns the broker connection, the stores and the audit log."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.prefix = config.topic_prefix
        self.topics = {
            "register": f"{self.prefix}/register",
            "data": f"{self.prefix}/data",
            "query": f"{self.prefix}/query",
            "time": f"{self.prefix}/time",
        }
        self._request_topics = frozenset(self.topics.values())
        self._data_prefix = self.topics["data"] + "/"  # hub/v1/data/<format code>
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self._requests = per_message(self._on_request)

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (or ``stop()``), then drain: commit and answer what is in hand."""
        config = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(RuntimeError, ValueError):  # not the main thread: tests run hubs in threads
                loop.add_signal_handler(sig, self.stop)
        async with AsyncExitStack() as stack:
            url = config.broker.url
            if url is None:
                broker = EmbeddedBroker(
                    config.data_path, port=config.broker.embedded_port, bind=config.broker.embedded_bind
                )
                await broker.start()
                stack.push_async_callback(broker.stop)
                url = broker.url
            self.audit = AuditLog(config.audit_path, fsync=config.audit.fsync)
            stack.callback(self.audit.close)
            pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hubd-bcrypt")
            stack.callback(pool.shutdown)
            registry = Registry(config.registry_path)
            stack.callback(registry.close)
            quarantine = Quarantine(config.registry_path)
            stack.callback(quarantine.close)
            store = open_sink(config)
            await store.start()
            stack.push_async_callback(store.close)
            # Queries read through their own connection and thread: WAL lets them run beside the writer, so a
            # long settlement query never holds up the acknowledgement of incoming data.
            self.reader = open_query(config)
            stack.callback(self.reader.close)
            self.query_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubd-query")
            stack.callback(self.query_thread.shutdown)
            self.auth = Authenticator(registry, pool)
            self.writer = BatchWriter(
                store, self.audit, config.store.batch_max_readings, config.store.queue_max_messages
            )
            self.writer.start()
            self.ingest = Ingest(self.auth, self.writer, quarantine, self.audit, config.limits)
            self.registration = Registration(self.auth, config.auth, self.audit, pool)
            self.catalog = Catalog([config.formats_shipped_path, config.formats_user_path])
            stack.callback(self.catalog.close)
            self._formats_changed(self.catalog.scan())
            self.driver = MqttDriver(
                config.broker,
                url,
                [
                    self.topics["register"],
                    self.topics["data"],
                    self.topics["data"] + "/+",
                    self.topics["query"],
                    self.topics["time"],
                ],
                self.on_message,
                password=_read_secret(config.broker.password_file),
            )
            self.audit.append("hub.start", broker=url, store=str(config.readings_path))
            self.audit.flush()
            _quiet_gc()  # before the first message: what is frozen is never collected
            try:
                await self.driver.start()
            except (OSError, TimeoutError, MqttError) as exc:
                where = f"{urlsplit(url).scheme}://{self.driver.address}"  # never the URL's user or password
                raise BrokerUnreachable(
                    f"cannot connect to the broker at {where}: {exc or type(exc).__name__}"
                ) from exc
            registered = sum(der.status == "registered" for der in self.auth.ders.values())
            logger.info(
                "hubd serving on {} (prefix {}), {} DERs known, {} of them registered",
                url,
                self.prefix,
                len(self.auth.ders),
                registered,
            )
            self.ready.set()
            watcher = asyncio.create_task(self._watch_formats(), name="hubd-formats")
            await self._stop.wait()
            watcher.cancel()
            logger.info("stopping: taking no new messages, committing and answering those in hand")
            await self.driver.stop()
            await self.ingest.close()
            await self.writer.close()
            self.audit.append("hub.stop")
        logger.info("hubd stopped")

    def stop(self) -> None:
        self._stop.set()

    async def _watch_formats(self) -> None:
        """Keep the vendor formats in step with their folders: a change counts within ``formats.poll_s``."""
        while True:
            await asyncio.sleep(self.config.formats.poll_s)
            try:
                self._formats_changed(self.catalog.scan())
            except Exception:  # a failing scan must not end the watching
                logger.exception("scanning the format definitions failed")

    def _formats_changed(self, changes: list[Change]) -> None:
        for change in changes:
            if change.event == "format.refused":
                logger.warning("format definition refused: {}", change.reason)
                self.audit.append(change.event, "error", code=change.code, file=change.file, reason=change.reason)
            else:
                logger.info("{} {} ({})", change.event, change.code, change.file)
                self.audit.append(change.event, code=change.code, file=change.file)
        if changes:
            self.audit.flush()

    # -- routing ----------------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, properties: dict[str, Any], done: Done) -> None:
        """Route one message: data to ingest (taken in with the others of its loop turn), a request to a task
        of its own. ``done(True)`` once it is answered (or needs no answer), so the driver acknowledges it."""
        if self._is_data(topic):
            raw = self._raw_message(topic, payload, properties)
            self.ingest.submit(raw, partial(self._data_answered, raw, properties, done))
        else:
            self._requests(topic, payload, properties, done)

    def _data_answered(self, raw: RawMessage, properties: dict[str, Any], done: Done, outcome: Outcome) -> None:
        """Send a data message's answer, then let the driver acknowledge it; stopping: not acknowledged."""
        if isinstance(outcome, asyncio.CancelledError):
            done(False)
            return
        try:
            if isinstance(outcome, BaseException):
                self._failed(raw.topic, raw.payload, properties, outcome)
            else:
                answer, decoded = outcome
                reply_to, request_id = (decoded.reply_to, decoded.request_id) if decoded else _reply_of(raw.payload)
                response_topic, correlation = _v5_reply(properties)
                if self._answer(answer, response_topic, correlation, reply_to, request_id):
                    source_id = decoded.source_id or raw.source_id if decoded else raw.source_id
                    self.writer.count("data.answered", source_id)
        except Exception:
            logger.exception("message on {} failed; not acknowledged, the broker will deliver it again", raw.topic)
            done(False)
            return
        done(True)

    async def _on_request(self, topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        try:
            await self._route(topic, payload, properties)
        except Exception as exc:
            self._failed(topic, payload, properties, exc)

    def _failed(self, topic: str, payload: bytes, properties: dict[str, Any], exc: BaseException) -> None:
        """A failure of the hub's own: answered ``internal`` and the payload kept.

        Acknowledging such a message (after keeping it) stops one poison message from being delivered again
        and again; if even keeping it fails, the exception propagates and the broker keeps the message.
        """
        logger.opt(exception=exc).error("internal error on a message on {}", topic)
        reason = f"internal error ({type(exc).__name__}); the message is kept for the operator"
        if self._is_data(topic):
            self.ingest.keep(self._raw_message(topic, payload, properties), HubError(ErrorCode.INTERNAL, reason))
        else:
            self.audit.append("request.failed", "internal", topic=topic, reason=reason)
        self.audit.flush()
        reply_to, request_id = _reply_of(payload)
        error = HubError(ErrorCode.INTERNAL, "the hub failed on this message; the operator can find it")
        self._answer({"ok": False, "error": error.as_dict()}, *_v5_reply(properties), reply_to, request_id)

    def _is_data(self, topic: str) -> bool:
        return topic == self.topics["data"] or topic.startswith(self._data_prefix)

    def _raw_message(self, topic: str, payload: bytes, properties: dict[str, Any]) -> RawMessage:
        """A data message as the drivers hand it on: the format code from the topic, the v5 user properties."""
        user = _user_properties(properties)
        return RawMessage(
            source_id=user.get("source_id", "unknown"),
            format_code=topic[len(self._data_prefix) :] or "hub.v1",
            payload=payload,
            received_at=now_ms(),
            topic=topic,
            requester=_first(properties.get("response_topic")),
            properties=user,
        )

    async def _route(self, topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        """A request (registration, query, time): answered from its own task."""
        response_topic, correlation = _v5_reply(properties)
        request, error = _json_request(payload, self.config.limits.max_payload_bytes)
        reply_to, request_id = reply_fields(request) if request else (None, None)
        requester = response_topic or reply_to
        answer: dict[str, Any]
        if topic == self.topics["register"]:
            if request is None:
                assert error is not None
                self.audit.append("register.failed", error.code.value, requester=requester, reason=error.message)
                answer = {"ok": False, "error": error.as_dict()}
            else:
                answer = await self.registration.handle(request, requester)
        elif topic == self.topics["query"]:
            answer = await self._query(request, error, requester)
        elif topic == self.topics["time"]:
            answer = self._time()
            self.audit.append("time.asked", requester=requester)
        else:
            return
        self.audit.flush()  # audited before answered
        size = self._answer(answer, response_topic, correlation, reply_to, request_id)
        if size:
            self.audit.append(
                "answer.sent",
                "ok" if answer.get("ok") else answer["error"]["code"],
                topic=topic,
                requester=requester,
                bytes=size,
            )
        self.audit.flush()

    def _answer(
        self,
        body: dict[str, Any],
        response_topic: str | None,
        correlation: bytes | None,
        reply_to: str | None,
        request_id: Any,
    ) -> int:
        """Answer on the v5 response topic, else on the v3.1.1 ``reply_to``; nothing when neither is set."""
        if response_topic and self._may_answer_on(response_topic):
            return self.driver.publish(response_topic, body, correlation)
        if reply_to and self._may_answer_on(reply_to):
            if request_id is not None:
                body = {**body, "request_id": request_id}
            return self.driver.publish(reply_to, body)
        return 0

    def _may_answer_on(self, topic: str) -> bool:
        # Never answer into a topic the hub itself takes requests on: that would loop.
        return (
            topic not in self._request_topics
            and not topic.startswith(self._data_prefix)
            and "#" not in topic
            and "+" not in topic
        )

    # -- query and time ---------------------------------------------------------------------------------

    async def _query(
        self, request: dict[str, Any] | None, error: HubError | None, requester: str | None
    ) -> dict[str, Any]:
        if request is None:
            assert error is not None
            self.audit.append("query.received", error.code.value, requester=requester, reason=error.message)
            return {"ok": False, "error": error.as_dict()}
        client_id = request.get("client_id")
        conditions = {k: v for k, v in request.items() if k not in ("password", "reply_to", "request_id")}
        try:
            self.audit.append("query.received", requester=requester, client_id=_text(client_id), conditions=conditions)
        except (TypeError, ValueError):  # a password-like or unwritable condition: record the names only
            names = sorted(conditions)
            self.audit.append("query.received", requester=requester, client_id=_text(client_id), condition_names=names)
        try:
            password = request.get("password")
            if not isinstance(client_id, str) or not isinstance(password, str):
                raise HubError(ErrorCode.BAD_REQUEST, "client_id and password are required")
            self.auth.refresh()
            denied = await self.auth.check_system(client_id, password, "consumer")
            if denied:
                self.audit.append("query.auth", denied.code.value, client_id=client_id, reason=denied.message)
                raise denied
            self.audit.append("query.auth", client_id=client_id)
            query = parse_query(request, self.config.query, self.auth.ders)
            answer = await asyncio.get_running_loop().run_in_executor(self.query_thread, run_query, query, self.reader)
        except HubError as exc:
            self.audit.append("query.failed", exc.code.value, client_id=_text(client_id), reason=exc.message)
            return {"ok": False, "error": exc.as_dict()}
        assert isinstance(answer, dict)
        self.audit.append(
            "query.extracted",
            client_id=client_id,
            rows=answer["count"],
            der_count=len({row["der_id"] for row in answer["rows"]}),
        )
        return answer

    def _time(self) -> dict[str, Any]:
        return {
            "ok": True,
            "hub_time": format_time(now_ms()),
            "ntp": {"synced": False, "offset_s": None, "server": None, "checked_at": None},
        }


def _first(values: Any) -> Any:
    return values[0] if values else None


def _v5_reply(properties: dict[str, Any]) -> tuple[str | None, bytes | None]:
    """Where an MQTT v5 sender wants its answer: the response topic and the correlation data to echo."""
    return _first(properties.get("response_topic")), _first(properties.get("correlation_data"))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _user_properties(properties: dict[str, Any]) -> dict[str, str]:
    """The MQTT v5 user properties as a dict (a key sent twice: the last value); a vendor format may read them."""
    pairs = properties.get("user_property")
    return {str(key): str(value) for key, value in pairs} if pairs else {}


def _quiet_gc() -> None:
    """Fewer garbage collections on the hot path, which allocates many short-lived objects and few cycles.

    What start-up built (registry, formats, caches) is frozen out of every later collection, and the youngest
    generation is collected every 50,000 allocations instead of 700: a collection per few dozen messages was
    15-20 % of the event loop's time in both cases of bench/ingest (bench/README.md). Frozen objects are never
    collected, so this runs before the first message is taken; a format definition replaced or removed later
    is freed all the same, by reference counting (it holds no reference cycle; a test keeps it so).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


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


def _read_secret(path: str | None) -> str | None:
    return Path(path).read_text(encoding="utf-8").strip() if path else None
