"""A small MQTT v5 request/response client, for the simulated fleet, the demo and the tests.

It does what ``mosquitto_rr`` does: publish with a response topic and correlation data, wait for the answer.
It runs on the same MQTT session code as the hub's driver (``hubd.mqtt.session``).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import uuid
from typing import Any
from urllib.parse import urlsplit

import orjson

from hubd.model import format_time, now_ms
from hubd.mqtt.packets import parse_publish, publish_properties
from hubd.mqtt.session import MqttError, MqttSession

_NATIVE_DATA = ("/data", "/data/hub.v1")  # the topics of hub.v1 data messages, under any prefix


class HubClient:
    """Connects to the hub's broker and asks requests of the hub."""

    def __init__(self, url: str, name: str = "client") -> None:
        self._url = urlsplit(url)
        self._id = f"{name}-{uuid.uuid4().hex[:8]}"
        self._inbox = f"clients/{self._id}/answers"
        self._waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._counter = itertools.count()
        self._session = MqttSession(self._id, on_publish=self._on_publish, on_lost=self._on_lost, clean_start=True)

    async def __aenter__(self) -> HubClient:
        tls = ssl.create_default_context() if self._url.scheme == "mqtts" else None
        port = self._url.port or (8883 if tls else 1883)
        await self._session.connect(self._url.hostname or "127.0.0.1", port, tls)
        codes = await self._session.subscribe([self._inbox], qos=1, timeout_s=5)
        if codes[0] >= 0x80:
            await self._session.disconnect()
            raise MqttError(f"the broker refused the subscription to {self._inbox} (reason 0x{codes[0]:02X})")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.disconnect()

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
        _, payload, qos, packet_id, properties = parse_publish(first, body)
        if qos:
            self._session.ack(packet_id)
        correlation = (properties.get("correlation_data") or [b""])[0]
        future = self._waiting.pop(correlation, None)
        if future is not None and not future.done():
            future.set_result(orjson.loads(payload))

    async def request(
        self, topic: str, body: dict[str, Any] | bytes, timeout: float = 10.0, properties: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Publish ``body`` on ``topic`` (QoS 1), with MQTT v5 user ``properties``, and return the hub's answer.

        Raises ``TimeoutError`` when no answer comes within ``timeout`` s (no hub listening), and
        ``ConnectionError`` when the connection to the broker is lost or was lost before.

        Sending again is the caller's job, and safe for data: the broker may already hold the first sending for
        the hub, but the store is idempotent on DER and time, so the reading is stored once however often it
        comes (docs/protocol.md, Power data). Only the hub's answer says a reading is stored; the broker's
        PUBACK does not. An answer that comes after the timeout is dropped, so each sending is a new request.

        A ``hub.v1`` data message (a dict with ``readings``, on ``.../data`` or ``.../data/hub.v1``) without
        ``sent_at`` gets the send time now, set in ``body`` itself: sending the same dict again sends the same
        version, so a resend never outranks a correction sent after the first sending.
        """
        if isinstance(body, dict) and topic.endswith(_NATIVE_DATA) and "readings" in body and "sent_at" not in body:
            body["sent_at"] = format_time(now_ms())
        if not self._session.connected:
            raise ConnectionError(f"not connected to the broker at {self._where()}")
        correlation = str(next(self._counter)).encode()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        extra = publish_properties(
            response_topic=self._inbox,
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
