"""The client side of the hub's protocol, in Python (asyncio): for edge terminals and connectors, the demo,
the tests, and the hub's own clock checks.

``HubClient`` does what ``mosquitto_rr`` does: publish with a response topic and correlation data, wait for the
answer; it can also answer requests sent to it. ``EdgeTerminal`` is an edge terminal on top of it: it
registers DERs, sends their readings and answers the hub's time checks and set commands, correcting its own
timestamps when it may not set the system clock (``TerminalClock``). ``hubd edge`` is the same on the command
line. It runs on the same MQTT session code as the hub's driver (``hubd.mqtt.session``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from hubd.model import HubError, format_time, now_ms, parse_time
from hubd.mqtt.packets import parse_publish, publish_properties
from hubd.mqtt.session import MqttError, MqttSession

_NATIVE_DATA = ("/data", "/data/hub.v1")  # the topics of hub.v1 data messages, under any prefix


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
        client_id: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._url = urlsplit(url)
        self._id = client_id or f"{name}-{uuid.uuid4().hex[:8]}"  # a fixed one where the broker pins it
        self._tls = tls
        # With a broker user name, answers come under reply/<user name>/, the only place access control at the
        # broker lets it subscribe (docs/operations.md, Access at the broker); the last level is random, which
        # for the shared claim account is what keeps its answer from other claimants.
        default = f"reply/{username}/{secrets.token_urlsafe(16)}" if username else f"clients/{self._id}/answers"
        self.inbox = inbox or default
        self._waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._counter = itertools.count()
        self._last_sent_at = 0  # the last send time stamped on a data message (epoch ms)
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
        tls = (self._tls or ssl.create_default_context()) if self._url.scheme == "mqtts" else None
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

        A ``hub.v1`` data message (a dict with ``readings``, on ``.../data`` or ``.../data/hub.v1``) without
        ``sent_at`` gets its send time, the version of its readings (docs/protocol.md, Power data), set in
        ``body`` itself: sending the same dict again sends the same version, so a resend never outranks a
        correction sent after the first sending.
        """
        if isinstance(body, dict) and topic.endswith(_NATIVE_DATA) and "readings" in body and "sent_at" not in body:
            body["sent_at"] = format_time(self._send_time())
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

    def _send_time(self) -> int:
        """Now, in epoch ms, but never earlier than the last send time given plus 1 ms: a system clock stepped
        back (by NTP, or by the hub's set command) must not make this client's later messages older versions
        than its earlier ones."""
        self._last_sent_at = max(now_ms(), self._last_sent_at + 1)
        return self._last_sent_at

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


# -- an edge terminal's side of the protocol ----------------------------------------------------------------


class TerminalClock:
    """An edge terminal's clock: the system's, less the correction the hub told it, when it may not set the
    system clock (most terminals run unprivileged: they correct their own timestamps instead).

    ``ahead_s`` and ``drift_ppm`` simulate a clock that is wrong (the demo and the tests): ``ahead_s`` fast
    from the start, and ``drift_ppm`` more per second that passes (negative: slow).
    """

    def __init__(self, set_system: bool = False, ahead_s: float = 0.0, drift_ppm: float = 0.0) -> None:
        self.set_system = set_system
        self.correction_s = 0.0  # subtracted from the clock's reading; from the hub's set commands
        self._ahead_s = ahead_s
        self._drift = drift_ppm / 1e6
        self._since = time.monotonic()

    def now(self) -> float:
        """Epoch seconds, as this terminal stamps its readings."""
        simulated = self._ahead_s + self._drift * (time.monotonic() - self._since)
        return time.time() + simulated - self.correction_s

    def now_ms(self) -> int:
        return int(self.now() * 1000)

    def correct(self, offset_s: float) -> str:
        """The hub says this clock is ``offset_s`` ahead of its own: set the system clock back when allowed,
        else keep the correction for its own timestamps. Says which it did."""
        if self.set_system:
            try:
                time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME) - offset_s)
                return "system clock set"
            except OSError:  # no CAP_SYS_TIME: fall back to correcting its own timestamps
                pass
        self.correction_s += offset_s
        return "timestamps corrected"


def stamp(epoch_s: float) -> str:
    """RFC 3339 in UTC with microseconds, as a terminal answers a time check."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class EdgeTerminal:
    """An edge terminal or connector: registers its DERs, sends their readings, answers the hub's time checks
    and set commands (docs/protocol.md, Time) on ``<prefix>/time/check|set/<source_id>``.

    ``answer_time=False`` makes one that never answers (it is then judged by its data alone).
    """

    def __init__(
        self,
        url: str,
        source_id: str,
        *,
        prefix: str = "hub/v1",
        clock: TerminalClock | None = None,
        answer_time: bool = True,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.source_id = source_id
        self.prefix = prefix
        self.clock = clock or TerminalClock()
        self.corrections: list[float] = []  # the offsets the hub told it, in order
        serve: dict[str, Serve] = {}
        if answer_time:
            serve = {f"{prefix}/time/check/{source_id}": self._check, f"{prefix}/time/set/{source_id}": self._set}
        self.client = HubClient(url, source_id, serve=serve, username=username, password=password, client_id=client_id)

    async def __aenter__(self) -> EdgeTerminal:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(*exc)

    async def register(self, der_id: str, initial_password: str, **details: Any) -> dict[str, Any]:
        """Registration's answer: with ``password``, the DER's own, to keep (``save_password``)."""
        body = {"der_id": der_id, "password": initial_password, **details}
        return await self.client.request(f"{self.prefix}/register", body)

    async def send(self, readings: list[dict[str, Any]], timeout: float = 10.0) -> dict[str, Any]:
        """Send readings in one message and return the hub's answer. A reading without ``measured_at`` is
        stamped now by this terminal's clock; with a correction from the hub, every ``measured_at`` given
        as epoch milliseconds or RFC 3339 is moved by it (the times were taken from this terminal's clock)."""
        shifted = [self._stamped(reading) for reading in readings]
        body = {"source_id": self.source_id, "readings": shifted}
        return await self.client.request(f"{self.prefix}/data", body, timeout=timeout)

    def _stamped(self, reading: dict[str, Any]) -> dict[str, Any]:
        if "measured_at" not in reading:
            return {**reading, "measured_at": self.clock.now_ms()}
        correction = self.clock.correction_s
        if not correction:
            return reading
        try:
            measured = parse_time(reading["measured_at"], "measured_at")
        except HubError:
            return reading  # the hub says what is wrong with it
        return {**reading, "measured_at": measured - round(correction * 1000)}

    async def _check(self, _: str, body: dict[str, Any]) -> dict[str, Any]:
        received = self.clock.now()
        return {"ok": True, "received_at": stamp(received), "source_time": stamp(self.clock.now())}

    async def _set(self, _: str, body: dict[str, Any]) -> dict[str, Any]:
        offset = body.get("offset_s")
        if isinstance(offset, bool) or not isinstance(offset, int | float) or not abs(offset) < 10 * 365 * 86400:
            return {"ok": False, "error": {"code": "bad_request", "message": "offset_s must be a number of seconds"}}
        done = self.clock.correct(float(offset))
        self.corrections.append(float(offset))
        return {"ok": True, "applied": done}


def save_password(path: Path, der_id: str, password: str) -> None:
    """Keep a DER's issued password in ``path`` (a JSON object of DER id → password), readable by its owner
    alone (0600), replacing the file whole so that a crash never leaves half of it."""
    passwords = load_passwords(path) if path.exists() else {}
    passwords[der_id] = password
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(orjson.dumps(passwords, option=orjson.OPT_INDENT_2))
    os.replace(temporary, path)


def load_passwords(path: Path) -> dict[str, str]:
    """The DER passwords kept by ``save_password``."""
    data = orjson.loads(path.read_bytes())
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: not a file of DER passwords")
    return {str(k): v for k, v in data.items()}
