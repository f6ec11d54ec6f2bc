"""MQTT driver (gmqtt, MQTT v5): QoS 1, a fixed client id, a persistent session, PUBACK after commit.

gmqtt with ``optimistic_acknowledgement=False`` sends the PUBACK only when the async message callback
returns, so a message is acknowledged to the broker only once the hub has committed it. A message that
arrives while the hub is stopping is never acknowledged: the broker keeps it in the persistent session and
delivers it again when the hub comes back.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from gmqtt import Client
from loguru import logger

from hubd.config import BrokerConfig

Handler = Callable[[str, bytes, dict[str, Any]], Awaitable[None]]


class Deferred(Exception):
    """Raised by the message callback to withhold the PUBACK (the hub is stopping)."""


class MqttDriver:
    """One MQTT v5 connection that receives the hub's topics and publishes its answers."""

    def __init__(
        self, config: BrokerConfig, url: str, topics: list[str], handler: Handler, password: str | None = None
    ) -> None:
        self._config = config
        self._url = urlsplit(url)
        group = config.shared_group
        self._topics = [f"$share/{group}/{t}" if group else t for t in topics]
        self._handler = handler
        self._password = password
        self._accepting = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._client = Client(
            config.client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=config.session_expiry_s,
            receive_maximum=config.receive_maximum,
        )
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def quiet_deferred(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if isinstance(context.get("exception"), Deferred):
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(quiet_deferred)
        if self._config.username:
            self._client.set_auth_credentials(self._config.username, self._password)
        tls: ssl.SSLContext | bool = ssl.create_default_context() if self._url.scheme == "mqtts" else False
        port = self._url.port or (8883 if tls else 1883)
        await self._client.connect(self._url.hostname or "127.0.0.1", port, ssl=tls, keepalive=self._config.keepalive_s)

    def _on_connect(self, client: Client, flags: int, rc: int, properties: dict[str, Any]) -> None:
        # Subscribe on every connect: cheap, and it restores the subscription if the broker lost the session.
        for topic in self._topics:
            client.subscribe(topic, qos=1)
        logger.info(
            "connected to {}://{}:{}; subscribed to {}",
            self._url.scheme,
            self._url.hostname,
            self._url.port,
            ", ".join(self._topics),
        )

    def _on_disconnect(self, client: Client, packet: bytes, exc: BaseException | None = None) -> None:
        if self._accepting:
            logger.warning("disconnected from the broker; reconnecting")

    async def _on_message(
        self, client: Client, topic: str, payload: bytes, qos: int, properties: dict[str, Any]
    ) -> int:
        if not self._accepting:
            raise Deferred
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._handler(topic, payload, properties)
        except Exception:
            logger.exception("message on {} failed; not acknowledged, the broker will deliver it again", topic)
            raise Deferred from None
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        return 0

    def publish(self, topic: str, body: dict[str, Any], correlation_data: bytes | None = None) -> int:
        """Publish an answer (QoS 1); return its size in bytes."""
        payload = orjson.dumps(body)
        properties: dict[str, Any] = {"content_type": "application/json"}
        if correlation_data is not None:
            properties["correlation_data"] = correlation_data
        self._client.publish(topic, payload, qos=1, **properties)
        return len(payload)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking messages, let those in hand finish (commit and answer), then disconnect."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            logger.warning(
                "{} messages still in hand after {} s; the broker will deliver them again",
                self._in_flight,
                timeout_s,
            )
        await asyncio.sleep(0.05)  # let the PUBACKs and answers of the last messages go out
        await self._client.disconnect()
