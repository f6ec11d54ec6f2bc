"""One MQTT v5 client session on an ``asyncio.Protocol``: the connection, its framing and flow control.

The hub's driver and the small request client share it (one MQTT implementation in the project). It knows
the protocol, not the hub: it hands inbound PUBLISH packets to its owner undecoded and sends PUBACK when the
owner says so; it keeps the QoS 1 publishes the broker has not acknowledged and resends them (DUP=1) after
a reconnect; it never has more than the broker's Receive Maximum of them unacknowledged and queues the rest
in order, sending them as PUBACKs come back. The writes of one event-loop turn go out in one
``transport.write``: a PUBACK and an answer per message cost one system call per turn, not two per message.
The session object outlives its connections (``connect`` again after a loss), as MQTT session state does.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable

from loguru import logger

from hubd.mqtt import packets


class MqttError(Exception):
    """The broker refused the connection or a subscription, or broke the protocol."""


LARGEST_PACKET = 268_435_455 + 5  # MQTT's largest remaining length and the fixed header around it


class MqttSession(asyncio.Protocol):
    """A client session: ``connect``, ``subscribe``, ``publish`` (QoS 1), ``ack``, ``disconnect``.

    ``on_publish(first_byte, body)`` receives every inbound PUBLISH as it arrives, not yet taken apart
    (``mqtt_packets.parse_publish``), so that an owner can hold messages back without paying to decode them.
    ``on_lost(exc)`` is called when an established connection ends other than by ``disconnect``;
    ``on_sent()`` whenever publishes that had to wait in the queue were handed to the connection.
    """

    def __init__(
        self,
        client_id: str,
        *,
        on_publish: Callable[[int, bytes], None],
        on_lost: Callable[[Exception | None], None] | None = None,
        on_sent: Callable[[], None] | None = None,
        clean_start: bool = False,
        session_expiry_s: int = 0,
        receive_maximum: int = 65535,
        keepalive_s: int = 60,
        username: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.client_id = client_id
        self._will = will
        self._on_publish = on_publish
        self._on_lost = on_lost
        self._on_sent = on_sent
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        self._keepalive_s = keepalive_s
        self._username = username
        self._password = password
        # Per connection.
        self._transport: asyncio.Transport | None = None
        self._up = False  # CONNACK received, not lost since
        self._closing = False  # disconnect() called
        self._pending: list[bytes] = []  # writes of this loop turn
        self._chunks: list[bytes] = []  # the start of a packet not yet whole
        self._have = 0
        self._need = 0
        self._connack: asyncio.Future[packets.ConnAck] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._last_out = 0.0
        self._ping_sent: float | None = None
        self._subscribing: dict[int, asyncio.Future[list[int]]] = {}
        self._first_topics: list[str] | None = None  # subscribed to with CONNECT
        self._first_subscription: asyncio.Future[list[int]] | None = None
        # Session state, kept across connections.
        self.generation = 0  # connections so far: a packet id is meaningful only on the one it came on
        self.server_receive_maximum = 65535
        self.server_maximum_packet = LARGEST_PACKET  # the broker's Maximum Packet Size, from its CONNACK
        self.server_maximum_qos = 2  # the broker's Maximum QoS: 0 means it takes no QoS 1 publish
        self._inflight: dict[int, bytes] = {}  # packet id → QoS 1 PUBLISH not yet acknowledged, in send order
        self._queue: deque[tuple[str, bytes, bytes, Callable[[int], None] | None]] = deque()  # waiting for a slot
        self._verdicts: dict[int, Callable[[int], None]] = {}  # packet id → told the reason code of its PUBACK
        self.queued_total = 0  # publishes that ever waited in the queue
        self.sent_total = 0  # of those, handed to the connection
        self._last_id = 0

    # -- connecting ----------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._up

    async def connect(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        timeout_s: float = 10.0,
        topics: list[str] | None = None,
    ) -> packets.ConnAck:
        """Open a connection, send CONNECT and wait for CONNACK; raise MqttError if the broker refuses.

        ``topics`` are subscribed to (QoS 1) in the same write as CONNECT, before anything else goes out (the
        publishes to resend, queued answers): a broker that lost the session drops what arrives for them until
        then. ``subscribed()`` then waits for the SUBACK.
        """
        if self._transport is not None:
            raise RuntimeError("already connected")
        loop = asyncio.get_running_loop()
        self._closing = False
        self._connack = loop.create_future()
        self._first_topics = topics
        await asyncio.wait_for(loop.create_connection(lambda: self, host, port, ssl=tls), timeout_s)
        try:
            connack = await asyncio.wait_for(self._connack, timeout_s)
        except BaseException:
            self._abort()
            self._forget_first_subscription()
            raise
        if connack.reason >= 0x80:
            self._abort()
            self._forget_first_subscription()
            text = connack.first("reason_string")
            raise MqttError(
                f"the broker at {host}:{port} refused the connection: {packets.reason_text(connack.reason)}"
                + (f", {text}" if text else "")
            )
        return connack

    def _established(self, connack: packets.ConnAck) -> None:
        """Called as CONNACK is read, before the packets behind it in the same read (the broker's resends)."""
        self._up = True
        self.generation += 1
        self.server_receive_maximum = connack.first("receive_maximum", 65535)
        self.server_maximum_packet = connack.first("maximum_packet_size", LARGEST_PACKET)
        self.server_maximum_qos = connack.first("maximum_qos", 2)
        self._keepalive_s = connack.first("server_keep_alive", self._keepalive_s)
        assigned = connack.first("assigned_client_identifier")
        if assigned and assigned != self.client_id:  # the broker named the session: use that name from now on
            logger.info("the broker assigned the client id {} (asked for {!r})", assigned, self.client_id)
            self.client_id = assigned
        # Publishes the broker never acknowledged go again, marked as duplicates when it kept the session.
        mark = packets.with_dup if connack.session_present else bytes
        for packet in self._inflight.values():
            self._write(mark(packet))
        self._send_queued()
        if self._keepalive_s:
            self._last_out = time.monotonic()
            self._ping_sent = None
            self._keepalive = asyncio.get_running_loop().call_later(self._keepalive_s / 2, self._check_alive)

    async def subscribed(self, timeout_s: float = 10.0) -> list[int]:
        """Wait for the SUBACK of the topics given to ``connect``; return its reason codes (as ``subscribe``)."""
        done = self._first_subscription
        if done is None:
            raise RuntimeError("connect() was given no topics")
        try:
            return await asyncio.wait_for(asyncio.shield(done), timeout_s)
        finally:
            self._forget_first_subscription()

    def _forget_first_subscription(self) -> None:
        done, self._first_subscription = self._first_subscription, None
        if done is not None:
            for packet_id, waiting in list(self._subscribing.items()):
                if waiting is done:
                    del self._subscribing[packet_id]
            if not done.done():
                done.cancel()
            elif not done.cancelled():
                done.exception()  # retrieved: a connection refused or lost is reported by connect()

    async def subscribe(self, topics: list[str], qos: int = 1, timeout_s: float = 10.0) -> list[int]:
        """Subscribe and wait for SUBACK; return its reason codes (the granted QoS, or an error ≥ 0x80)."""
        packet_id = self._next_id()
        done: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._subscribing[packet_id] = done
        self._write_now(packets.subscribe(packet_id, topics, qos))
        try:
            return await asyncio.wait_for(done, timeout_s)
        finally:
            self._subscribing.pop(packet_id, None)

    async def disconnect(self, timeout_s: float = 5.0) -> None:
        """Let what was written reach the broker, then DISCONNECT (reason 0: the broker keeps the session) and
        close.

        "Reached" means every publish acknowledged by the broker and the socket's buffer empty: under load it
        holds thousands of answers and the PUBACKs sent after them, and closing before they left lost answers the
        audit had counted as sent (their messages came again after a restart, and were stored again).
        """
        transport = self._transport
        if transport is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (
            self._up
            and (self._inflight or self._queue or self._pending or transport.get_write_buffer_size())
            and loop.time() < deadline
        ):
            await asyncio.sleep(0.01)
        self._closing = True
        lost = self._lost
        if self._up:
            self._write_now(packets.disconnect())
        transport.close()
        if lost is not None:
            try:
                await asyncio.wait_for(asyncio.shield(lost), max(deadline - loop.time(), 1.0))
            except TimeoutError:
                transport.abort()

    def _abort(self) -> None:
        if self._transport is not None:
            self._closing = True
            self._transport.abort()

    # -- asyncio.Protocol ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._lost = asyncio.get_running_loop().create_future()
        self._pending = []
        self._chunks = []
        self._have = self._need = 0
        self._write_now(
            packets.connect(
                self.client_id,
                keepalive_s=self._keepalive_s,
                clean_start=self._clean_start,
                session_expiry_s=self._session_expiry_s,
                receive_maximum=self._receive_maximum,
                username=self._username,
                password=self._password if self._username is not None else None,
                will=self._will,
            )
        )
        if self._first_topics:  # MQTT lets a client send on before CONNACK: the subscription is not a turn late
            packet_id = self._next_id()
            self._first_subscription = done = asyncio.get_running_loop().create_future()
            self._subscribing[packet_id] = done
            self._write_now(packets.subscribe(packet_id, self._first_topics, 1))

    def connection_lost(self, exc: Exception | None) -> None:
        was_up, expected = self._up, self._closing
        self._transport = None
        self._up = False
        self._pending = []
        self._chunks = []
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        failure = ConnectionError(f"the connection to the broker was lost ({exc or 'closed by the broker'})")
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(failure)
        for waiting in self._subscribing.values():
            if not waiting.done():
                waiting.set_exception(failure)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if was_up and not expected and self._on_lost is not None:
            self._on_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._chunks:  # the rest of a packet that began in an earlier read
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            data = b"".join(self._chunks)
            self._chunks = []
        pos = 0
        end = len(data)
        on_publish = self._on_publish
        inflight = self._inflight
        acked = False
        try:
            while end - pos >= 2:
                # The fixed header, inline for remaining lengths of one and two bytes (nearly every packet).
                first = data[pos]
                length = data[pos + 1]
                if length < 0x80:
                    start = pos + 2
                elif end - pos > 2 and data[pos + 2] < 0x80:
                    length = (length & 0x7F) | (data[pos + 2] << 7)
                    start = pos + 3
                else:
                    where = packets.split(data, pos)
                    if where is None:
                        break
                    _, start, stop = where
                    length = stop - start
                stop = start + length
                if stop > end:
                    break
                kind = first >> 4
                if kind == packets.PUBLISH:
                    on_publish(first, data[start:stop])
                elif kind == packets.PUBACK:  # the broker took one of our publishes
                    if length < 2:
                        raise packets.MalformedPacket("PUBACK shorter than two bytes")
                    packet_id = (data[start] << 8) | data[start + 1]
                    if inflight.pop(packet_id, None) is not None:
                        acked = True
                        code = data[start + 2] if length > 2 else 0
                        if code >= 0x80:
                            reason = packets.reason_text(code)
                            logger.warning("the broker refused a message published to it: {}", reason)
                        if self._verdicts:
                            told = self._verdicts.pop(packet_id, None)
                            if told is not None:
                                told(code)
                else:
                    self._control(kind, data[start:stop])
                pos = stop
        except packets.MalformedPacket as exc:
            logger.error("the broker sent a malformed packet ({}); closing the connection", exc)
            self._abort_lost()
            return
        if acked and self._queue:
            self._send_queued()  # once per read, for all the PUBACKs in it
        if pos < end:
            rest = data[pos:]
            self._chunks = [rest]
            self._have = len(rest)
            where = packets.split(rest)
            self._need = where[2] if where is not None else len(rest) + 1

    def _abort_lost(self) -> None:
        """Drop the connection as if the network had: the owner hears of it and may reconnect."""
        if self._transport is not None:
            self._transport.abort()

    def _control(self, kind: int, body: bytes) -> None:
        if kind == packets.CONNACK:
            connack = packets.parse_connack(body)
            if self._connack is not None and not self._connack.done():
                if connack.reason < 0x80:
                    self._established(connack)
                self._connack.set_result(connack)
        elif kind == packets.SUBACK:
            packet_id, codes, _ = packets.parse_suback(body)
            waiting = self._subscribing.get(packet_id)
            if waiting is not None and not waiting.done():
                waiting.set_result(codes)
        elif kind == packets.PINGRESP:
            self._ping_sent = None
        elif kind == packets.DISCONNECT:
            reason, properties = packets.parse_disconnect(body)
            text = (properties.get("reason_string") or [""])[0]
            logger.warning("the broker is closing the connection: {} {}", packets.reason_text(reason), text)
        elif kind in (packets.PUBREC, packets.PUBREL, packets.PUBCOMP):
            raise packets.MalformedPacket("QoS 2 packet: this client neither subscribes nor publishes at QoS 2")
        # UNSUBACK and AUTH are never asked for; anything else is ignored.

    # -- outbound QoS 1 ------------------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        properties: bytes = b"\x00",
        verdict: Callable[[int], None] | None = None,
    ) -> None:
        """Publish at QoS 1, now if the broker takes one more unacknowledged, else after those queued before.

        ``verdict`` is called with the reason code of the broker's PUBACK (below 0x80: taken; 0x87: not
        authorized, ...) when it comes: an answer that must reach its requester (a new password) waits for it.
        A broker whose CONNACK says Maximum QoS 0 gets it at QoS 0, and ``verdict`` hears 0 at once: it takes
        nothing better."""
        if self._up and self.server_maximum_qos == 0:
            self._write(packets.publish(topic, payload, 0, 0, properties))
            if verdict is not None:
                verdict(0)
            return
        if self._queue or not self._up or len(self._inflight) >= self.server_receive_maximum:
            self._queue.append((topic, payload, properties, verdict))
            self.queued_total += 1
            return
        packet_id = self._next_id()
        packet = packets.publish(topic, payload, 1, packet_id, properties)
        self._inflight[packet_id] = packet
        if verdict is not None:
            self._verdicts[packet_id] = verdict
        self._write(packet)

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """A retained message at QoS 0 (the hub's status): the latest one is what a new subscriber sees."""
        if self._up:
            self._write(packets.publish(topic, payload, 0, 0, retain=True))

    def _send_queued(self) -> None:
        queue = self._queue
        inflight = self._inflight
        limit = self.server_receive_maximum
        encode = packets.publish
        sent = 0
        while queue and self._up and len(inflight) < limit:
            topic, payload, properties, verdict = queue.popleft()
            packet_id = self._next_id()
            packet = encode(topic, payload, 1, packet_id, properties)
            inflight[packet_id] = packet
            if verdict is not None:
                self._verdicts[packet_id] = verdict
            self._write(packet)
            sent += 1
        if sent:
            self.sent_total += sent
            if self._on_sent is not None:
                self._on_sent()

    def _next_id(self) -> int:
        packet_id = self._last_id % 65535 + 1
        while packet_id in self._inflight or packet_id in self._subscribing:
            packet_id = packet_id % 65535 + 1
        self._last_id = packet_id
        return packet_id

    @property
    def unacknowledged(self) -> int:
        """QoS 1 publishes sent and not yet acknowledged, plus those waiting to be sent."""
        return len(self._inflight) + len(self._queue)

    # -- inbound acknowledgement ---------------------------------------------------------------------------

    def ack(self, packet_id: int) -> None:
        """PUBACK an inbound QoS 1 message (on the current connection; the caller checks the generation)."""
        if self._up:
            self._write(b"\x40\x02" + packet_id.to_bytes(2, "big"))  # packets.puback, inline: once a message

    # -- writing -------------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        pending = self._pending
        pending.append(data)
        if len(pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _write_now(self, data: bytes) -> None:
        """CONNECT, SUBSCRIBE, PINGREQ and DISCONNECT go at once, after what waits."""
        self._pending.append(data)
        self._flush()

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            self._last_out = time.monotonic()

    # -- keepalive -----------------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        """Every half keepalive: PINGREQ when nothing went out for that long; no PINGRESP in time: drop."""
        now = time.monotonic()
        if self._ping_sent is not None and now - self._ping_sent >= self._keepalive_s:
            logger.warning("no PINGRESP from the broker within {} s; dropping the connection", self._keepalive_s)
            self._abort_lost()
            return
        if self._ping_sent is None and now - self._last_out >= self._keepalive_s / 2:
            self._ping_sent = now
            self._write_now(packets.PINGREQ)
        self._keepalive = asyncio.get_running_loop().call_later(self._keepalive_s / 2, self._check_alive)

    def __repr__(self) -> str:
        state = "connected" if self._up else "not connected"
        return f"<MqttSession {self.client_id} {state}, {self.unacknowledged} unacknowledged>"
