"""The one module that speaks to pymodbus's client: a connection to one device and timed register reads.

pymodbus renames things between minor versions (``slave`` became ``device_id`` in 3.10); wrapping it here
keeps those names in one place. Every failure is one of three exceptions the poll loop knows how to treat:
``Offline`` (no connection, no answer in time), ``NoAnswer`` (a Modbus exception response: the device is
there but refuses this read) and ``ShortRead`` (fewer registers than asked for).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Literal

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

Table = Literal["holding", "input"]

# pymodbus logs each failed connection and timeout itself; hubd says them once, audited (offline/online).
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class Offline(Exception):
    """The device cannot be reached: no connection, or no answer within the timeout."""


class NoAnswer(Exception):
    """The device answered with a Modbus exception (an address it does not have, say)."""

    def __init__(self, table: str, address: int, count: int, code: int) -> None:
        name = EXCEPTION_NAMES.get(code, "unknown exception")
        super().__init__(f"{table} registers {address}+{count}: exception {code} ({name})")
        self.code = code


class ShortRead(Exception):
    """The device answered with fewer registers than were asked for."""


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request and its answer: the registers, and when it was sent and answered (epoch ns, wall clock)."""

    registers: list[int]
    sent_ns: int
    answered_ns: int


class Link:
    """A connection to one Modbus TCP device (one unit id behind one address)."""

    def __init__(self, host: str, port: int, unit_id: int, timeout_s: float) -> None:
        self.host, self.port, self.unit_id, self.timeout_s = host, port, unit_id, timeout_s
        self._client: AsyncModbusTcpClient | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def connect(self) -> None:
        """Open the connection (pymodbus's own reconnecting is off: the poll loop decides when to retry)."""
        self.close()
        client = AsyncModbusTcpClient(
            self.host, port=self.port, timeout=self.timeout_s, retries=0, reconnect_delay=0, reconnect_delay_max=0
        )
        try:
            async with asyncio.timeout(self.timeout_s + 1):
                connected = await client.connect()
        except (TimeoutError, OSError, ModbusException) as exc:
            client.close()
            raise Offline(f"cannot connect to {self.host}:{self.port}: {exc or 'timed out'}") from None
        if not connected:
            client.close()
            raise Offline(f"cannot connect to {self.host}:{self.port}")
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def read(self, table: Table, address: int, count: int) -> Exchange:
        """Read ``count`` registers of ``table`` from ``address``, timed."""
        client = self._client
        if client is None or not client.connected:
            raise Offline(f"not connected to {self.host}:{self.port}")
        call = client.read_holding_registers if table == "holding" else client.read_input_registers
        sent = time.time_ns()
        try:
            async with asyncio.timeout(self.timeout_s + 1):  # pymodbus's own timeout first; no task per read
                answer = await call(address, count=count, device_id=self.unit_id)
        except (TimeoutError, ModbusException, OSError) as exc:
            self.close()
            raise Offline(f"{table} registers {address}+{count}: no answer ({type(exc).__name__})") from None
        answered = time.time_ns()
        if answer.isError():
            raise NoAnswer(table, address, count, int(getattr(answer, "exception_code", 0)))
        registers = list(answer.registers)
        if len(registers) < count:
            got = f"{len(registers)} register{'' if len(registers) == 1 else 's'}"
            raise ShortRead(f"{table} registers {address}+{count}: {got} in the answer")
        return Exchange(registers[:count], sent, answered)
