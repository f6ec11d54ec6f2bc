"""A small MQTT v5 request/response client, for the simulated fleet, the demo and the tests.

It does what ``mosquitto_rr`` does: publish with a response topic and correlation data, wait for the answer.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any
from urllib.parse import urlsplit

import orjson
from gmqtt import Client


class HubClient:
    """Connects to the hub's broker and asks requests of the hub."""

    def __init__(self, url: str, name: str = "client") -> None:
        self._url = urlsplit(url)
        self._id = f"{name}-{uuid.uuid4().hex[:8]}"
        self._inbox = f"clients/{self._id}/answers"
        self._waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._counter = itertools.count()
        self._client = Client(self._id)
        self._client.on_message = self._on_message

    async def __aenter__(self) -> HubClient:
        await self._client.connect(self._url.hostname or "127.0.0.1", self._url.port or 1883)
        subscribed = asyncio.get_running_loop().create_future()

        def on_subscribe(*args: object) -> None:
            if not subscribed.done():
                subscribed.set_result(None)

        self._client.on_subscribe = on_subscribe
        self._client.subscribe(self._inbox, qos=1)
        await asyncio.wait_for(subscribed, 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.disconnect()

    def _on_message(self, client: Client, topic: str, payload: bytes, qos: int, properties: dict[str, Any]) -> int:
        correlation = (properties.get("correlation_data") or [b""])[0]
        future = self._waiting.pop(correlation, None)
        if future is not None and not future.done():
            future.set_result(orjson.loads(payload))
        return 0

    async def request(
        self, topic: str, body: dict[str, Any] | bytes, timeout: float = 10.0, properties: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Publish ``body`` on ``topic`` (QoS 1), with MQTT v5 user ``properties``, and return the hub's answer."""
        correlation = str(next(self._counter)).encode()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        extra = {"user_property": list(properties.items())} if properties else {}
        self._client.publish(topic, payload, qos=1, response_topic=self._inbox, correlation_data=correlation, **extra)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(correlation, None)

    def publish(self, topic: str, body: dict[str, Any] | bytes) -> None:
        """Fire and forget (QoS 1), no answer asked for."""
        self._client.publish(topic, body if isinstance(body, bytes) else orjson.dumps(body), qos=1)
