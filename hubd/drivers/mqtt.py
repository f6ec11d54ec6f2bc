"""MQTT driver (gmqtt, MQTT v5): QoS 1, a fixed client id, a persistent session, PUBACK after commit.

gmqtt with ``optimistic_acknowledgement=False`` sends the PUBACK only when the async message callback
returns, so a message is acknowledged to the broker only once the hub has committed it. A message that
arrives while the hub is stopping is never acknowledged: the broker keeps it in the persistent session and
delivers it again when the hub comes back.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from gmqtt import Client
from gmqtt.mqtt.protocol import BaseMQTTProtocol
from loguru import logger

from hubd.config import BrokerConfig

Handler = Callable[[str, bytes, dict[str, Any]], Awaitable[None]]

# How long to wait before retrying an answer when every packet id is in flight. gmqtt signals no PUBACK;
# a broker acknowledges within a fraction of a millisecond on a loopback or LAN link, so start short and
# back off to the longer wait only while nothing moves (the connection is down).
_ID_RETRY_S = (0.001, 0.05)


def _cork(protocol: Any, data: bytes) -> None:
    """gmqtt's write, coalesced: the packets one loop iteration writes go out in one send.

    gmqtt writes each packet to the socket at once, so every PUBACK and every answer costs a system call;
    under load that was a quarter of the hub's time. CONNECT and DISCONNECT still go out at once (after what
    waits), so nothing is left behind when the connection closes.
    """
    protocol._connection._last_data_out = time.monotonic()
    pending: list[bytes] | None = getattr(protocol, "_hubd_pending", None)
    if pending is None:
        pending = protocol._hubd_pending = []
    pending.append(data)
    if data[:1] in (b"\x10", b"\xe0"):
        _flush(protocol)
    elif len(pending) == 1:
        asyncio.get_running_loop().call_soon(_flush, protocol)


def _flush(protocol: Any) -> None:
    pending: list[bytes] = protocol._hubd_pending
    if not pending:
        return
    data = b"".join(pending)
    pending.clear()
    transport = protocol._transport
    if transport is not None and not transport.is_closing():
        transport.write(data)
    else:
        logger.warning("the broker connection closed with {} bytes unsent", len(data))


# One place that reaches into gmqtt (pinned in pyproject.toml): its protocol's write_data.
BaseMQTTProtocol.write_data = _cork


class Deferred(Exception):
    """Raised by the message callback to withhold the PUBACK (the hub is stopping)."""


class _Gate:
    """Lets at most ``size`` messages be worked on at once; the others wait, undecoded, in arrival order.

    The broker should do this (the hub announces ``receive_maximum``), but Mosquitto 2.0.11 honours Receive
    Maximum only until the first PUBACK and then sends up to that many more per PUBACK (bench/README.md):
    a backlog reaches the hub all at once, and decoded it takes ten times its size in memory. Hand-rolled
    because asyncio.Semaphore scans all its waiters on every call in Python 3.11.
    """

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def enter(self) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn  # leave() hands its place over by resolving this
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.leave()  # handed a place but cancelled before taking it: pass it on
            raise

    def leave(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1


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
        # Answers waiting for a packet id: the broker's Receive Maximum (Mosquitto: max_inflight_messages)
        # bounds the QoS 1 answers in flight, and gmqtt raises OverflowError past it instead of waiting.
        self._backlog: deque[tuple[str, bytes, dict[str, Any]]] = deque()
        self._backlog_in = 0  # answers ever put in the backlog
        self._backlog_out = 0  # of those, handed to gmqtt
        self._backlog_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()  # (count, woken when out)
        self._drainer: asyncio.Task[None] | None = None
        self._gate = _Gate(config.receive_maximum)
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
        await self._gate.enter()
        try:
            if not self._accepting:  # the hub began to stop while this message waited at the gate
                raise Deferred
            self._in_flight += 1
            self._idle.clear()
            try:
                await self._handler(topic, payload, properties)
                if self._backlog:
                    # Its answer may wait for a packet id: acknowledge only once the answer is on its way.
                    await self._backlog_sent(self._backlog_in)
            except Exception:
                logger.exception("message on {} failed; not acknowledged, the broker will deliver it again", topic)
                raise Deferred from None
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()
        finally:
            self._gate.leave()
        return 0

    def publish(self, topic: str, body: dict[str, Any], correlation_data: bytes | None = None) -> int:
        """Publish an answer (QoS 1), in order, waiting in the backlog for a packet id; return its size."""
        payload = orjson.dumps(body)
        properties: dict[str, Any] = {"content_type": "application/json"}
        if correlation_data is not None:
            properties["correlation_data"] = correlation_data
        if not self._backlog and self._send(topic, payload, properties):
            return len(payload)
        self._backlog.append((topic, payload, properties))
        self._backlog_in += 1
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="hubd-mqtt-answers")
        return len(payload)

    def _send(self, topic: str, payload: bytes, properties: dict[str, Any]) -> bool:
        """Hand one QoS 1 publish to gmqtt; False when all packet ids are in flight."""
        try:
            self._client.publish(topic, payload, qos=1, **properties)
        except OverflowError:
            return False
        return True

    async def _drain(self) -> None:
        """Send the backlog as PUBACKs from the broker free packet ids."""
        shortest, longest = _ID_RETRY_S
        wait = shortest
        while self._backlog:
            sent = self._backlog_out
            while self._backlog and self._send(*self._backlog[0]):
                self._backlog.popleft()
                self._backlog_out += 1
            waiters = self._backlog_waiters
            while waiters and waiters[0][0] <= self._backlog_out:
                _, woken = waiters.popleft()
                if not woken.done():
                    woken.set_result(None)
            if self._backlog:
                wait = shortest if self._backlog_out > sent else min(wait * 2, longest)
                await asyncio.sleep(wait)

    async def _backlog_sent(self, count: int) -> None:
        """Return once the first ``count`` answers that ever went through the backlog are handed to gmqtt."""
        if self._backlog_out >= count:
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._backlog_waiters.append((count, woken))  # counts only grow, so the deque stays in order
        await woken

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
        if self._drainer is not None:
            self._drainer.cancel()
