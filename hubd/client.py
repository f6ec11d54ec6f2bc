"""A small MQTT v5 request/response client, for the simulated fleet, the demo and the tests.

It does what ``mosquitto_rr`` does: publish with a response topic and correlation data, wait for the answer.
It runs on the same MQTT session code as the hub's driver (``hubd.mqtt.session``).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson

from hubd.mqtt.packets import parse_publish, publish_properties
from hubd.mqtt.session import MqttError, MqttSession


class HubClient:
    """Connects to the hub's broker and asks requests of the hub."""

    def __init__(
        self,
        url: str,
        name: str = "client",
        *,
        inbox: str | None = None,
        serve: dict[str, Serve] | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._url = urlsplit(url)
        self._id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.inbox = inbox or f"clients/{self._id}/answers"
        self._waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._counter = itertools.count()
        # Requests this client answers itself (an edge terminal's time checks): topic filter → coroutine.
        self._serve = serve or {}
        self._serving: set[asyncio.Task[None]] = set()
        self._session = MqttSession(
            self._id,
            on_publish=self._on_publish,
            on_lost=self._on_lost,
            clean_start=True,
            username=username,
            password=password,
        )

    async def __aenter__(self) -> HubClient:
        tls = ssl.create_default_context() if self._url.scheme == "mqtts" else None
        port = self._url.port or (8883 if tls else 1883)
        await self._session.connect(self._url.hostname or "127.0.0.1", port, tls)
        topics = [self.inbox, *self._serve]
        codes = await self._session.subscribe(topics, qos=1, timeout_s=5)
        refused = [f"{t} (reason 0x{c:02X})" for t, c in zip(topics, codes, strict=False) if c >= 0x80]
        if refused:
            await self._session.disconnect()
            raise MqttError(f"the broker refused the subscription to {', '.join(refused)}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._serving:
            task.cancel()
        await self._session.disconnect()

    @property
    def connected(self) -> bool:
        return self._session.connected

    def _where(self) -> str:
        return f"{self._url.hostname or '127.0.0.1'}:{self._url.port or ''}".rstrip(":")

    def _on_lost(self, exc: Exception | None) -> None:
        """The broker went away: the requests waiting for an answer fail now, not at their timeout."""
        failure = ConnectionError(f"the connection to the broker at {self._where()} was lost ({exc or 'closed'})")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(failure)
        self._waiting.clear()

    def _on_publish(self, first: int, body: bytes) -> None:
        topic, payload, qos, packet_id, properties = parse_publish(first, body)
        if qos:
            self._session.ack(packet_id)
        if topic != self.inbox:
            self._request(topic, payload, properties)
            return
        try:
            answer = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(answer, dict):
            return
        correlation = (properties.get("correlation_data") or [b""])[0]
        if not correlation and isinstance(answer.get("request_id"), str):  # an MQTT 3.1.1 answer on reply_to
            correlation = answer["request_id"].encode()
        future = self._waiting.pop(correlation, None)
        if future is not None and not future.done():
            future.set_result(answer)

    def _request(self, topic: str, payload: bytes, properties: dict[str, Any]) -> None:
        """A request to this client: answered by the coroutine its topic filter names, on the requester's
        response topic (with its correlation data), else on the ``reply_to`` of its body."""
        serve = next((s for pattern, s in self._serve.items() if _matches(pattern, topic)), None)
        if serve is None:
            return
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            body = {}
        response_topic = (properties.get("response_topic") or [None])[0]
        correlation = (properties.get("correlation_data") or [None])[0]
        reply_to, request_id = body.get("reply_to"), body.get("request_id")

        async def answer() -> None:
            result = await serve(topic, body)
            if isinstance(request_id, str | int) and not response_topic:
                result = {**result, "request_id": request_id}
            where = response_topic or (reply_to if isinstance(reply_to, str) else None)
            if where and self._session.connected:
                self._session.publish(where, orjson.dumps(result), publish_properties(correlation_data=correlation))

        task = asyncio.get_running_loop().create_task(answer())
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def request(
        self,
        topic: str,
        body: dict[str, Any] | bytes,
        timeout: float = 10.0,
        properties: dict[str, str] | None = None,
        with_reply_to: bool = False,
    ) -> dict[str, Any]:
        """Publish ``body`` on ``topic`` (QoS 1), with MQTT v5 user ``properties``, and return the hub's answer.

        Raises ``TimeoutError`` when no answer comes within ``timeout`` s (no hub listening), and
        ``ConnectionError`` when the connection to the broker is lost or was lost before.

        Sending again is the caller's job, and safe for data: the broker may already hold the first sending for
        the hub, but the store is idempotent on DER and time, so the reading is stored once however often it
        comes (docs/protocol.md, Power data). Only the hub's answer says a reading is stored; the broker's
        PUBACK does not. An answer that comes after the timeout is dropped, so each sending is a new request.
        ``with_reply_to`` also puts ``reply_to`` and ``request_id`` in the body, for a peer on MQTT 3.1.1.
        """
        if not self._session.connected:
            raise ConnectionError(f"not connected to the broker at {self._where()}")
        correlation = f"{self._id}-{next(self._counter)}".encode()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        if isinstance(body, dict) and with_reply_to:  # for a peer on MQTT 3.1.1, which sees no response topic
            body = {**body, "reply_to": self.inbox, "request_id": correlation.decode()}
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        extra = publish_properties(
            response_topic=self.inbox,
            correlation_data=correlation,
            user_properties=list(properties.items()) if properties else None,
        )
        self._session.publish(topic, payload, extra)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(correlation, None)

    def publish(self, topic: str, body: dict[str, Any] | bytes) -> None:
        """Fire and forget (QoS 1), no answer asked for."""
        self._session.publish(topic, body if isinstance(body, bytes) else orjson.dumps(body))


Serve = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""Answers one request to the client: (topic, body) → the answer's body."""


def _matches(pattern: str, topic: str) -> bool:
    """MQTT topic filter matching, for the few filters a client subscribes to itself (``+`` and ``#``)."""
    wanted, levels = pattern.split("/"), topic.split("/")
    for index, part in enumerate(wanted):
        if part == "#":
            return True
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(wanted) == len(levels)
