"""Sources: where messages come in, one module per protocol, all under one contract.

A source speaks one protocol (MQTT today; Modbus devices and vendor clouds next) and hands the pipeline
messages tagged with their **sender**; it never decodes a payload's meaning, authenticates or stores. The
contract is small on purpose:

- ``kind`` names the protocol (and the config section a source brings); ``name`` tells instances apart;
- ``start(pipeline)`` connects or opens, and raises when it cannot, so a hub with a wrong broker address stops
  with one line instead of serving nothing;
- ``run()`` returns when the source was stopped and raises when it failed; the supervisor then restarts it
  (``stop``, ``start``) with a capped, jittered backoff, audited once per failure and once per recovery;
- ``stop()`` takes no new messages and lets those in hand finish;
- ``health`` is what an operator sees: starting, up, down (failed, or its peer is unreachable), stopped.

A new kind of source is a module here with a class that satisfies ``Source`` and a config section of its own;
the wiring (``hubd.app``) builds it from that section and hands it to the ``Supervisor``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson
from loguru import logger

from hubd.audit import AuditLog
from hubd.model import HubError, RawMessage

Health = Literal["starting", "up", "down", "stopped"]


def write_status(path: Path, status: dict[str, Any], kind: str, name: str) -> None:
    """A source's status for ``hubd source status`` (``<data_dir>/sources/<name>.json``), replaced whole so a
    reader never sees half of it; it is for the operator's eyes, so a failure is logged and collection goes on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(status, option=orjson.OPT_INDENT_2))
        temporary.replace(path)
    except OSError as exc:
        logger.warning("{} {}: cannot write its status: {}", kind, name, exc)


class Pipeline(Protocol):
    """What a source hands messages to (``hubd.ingest.Ingest``): decode, authorise, store, then ``reply``."""

    def submit(self, raw: RawMessage, reply: Callable[..., None]) -> None:
        """Take in one message; ``reply`` is called once, later, with its outcome (``hubd.ingest.Outcome``)."""
        ...

    def keep(self, raw: RawMessage, error: HubError) -> None:
        """Keep a message the hub failed on in quarantine, and audit it."""
        ...


class Source(Protocol):
    """One way in for messages; see the module's docstring for the contract."""

    kind: str
    name: str

    @property
    def health(self) -> Health: ...

    async def start(self, pipeline: Pipeline) -> None: ...

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


_BACKOFF_S = (1.0, 60.0)  # first and longest wait before a failed source is started again


class Supervisor:
    """Starts the hub's sources, restarts one that fails, and stops them all."""

    def __init__(self, sources: list[Source], audit: AuditLog, backoff_s: tuple[float, float] = _BACKOFF_S) -> None:
        self.sources = sources
        self._audit = audit
        self._backoff_s = backoff_s
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self, pipeline: Pipeline) -> None:
        """Start every source (the first that cannot start raises), then watch each in a task of its own."""
        for source in self.sources:
            await source.start(pipeline)
        self._watchers = [
            asyncio.create_task(self._watch(source, pipeline), name=f"hubd-source-{source.kind}-{source.name}")
            for source in self.sources
        ]

    async def stop(self) -> None:
        """Stop watching (no restarts from now on), then stop every source, in reverse order of starting."""
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for source in reversed(self.sources):
            await source.stop()

    async def _watch(self, source: Source, pipeline: Pipeline) -> None:
        delay = self._backoff_s[0]
        while True:
            try:
                await source.run()
                return
            except Exception as exc:
                logger.opt(exception=exc).error("source {} {} failed; starting it again", source.kind, source.name)
                self._audit.append("source.failed", "error", kind=source.kind, name=source.name, reason=repr(exc))
                self._audit.flush()
            while True:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._backoff_s[1])
                try:
                    await source.stop()
                    await source.start(pipeline)
                except Exception as exc:
                    logger.warning("source {} {} did not start again: {}", source.kind, source.name, exc)
                    continue
                break
            logger.info("source {} {} started again", source.kind, source.name)
            self._audit.append("source.restarted", kind=source.kind, name=source.name)
            self._audit.flush()
            delay = self._backoff_s[0]
