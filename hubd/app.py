"""Wiring: the hub's parts built from the config and connected along the flow, and nothing else.

sources (MQTT) → ingest (decode → auth → store) | services (register, query, time),
with every step appending to the audit log. Each part lives in a module of its own; this one only builds them
in order, starts them, and on stop drains them in the reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path

from loguru import logger

from hubd.audit import AuditLog
from hubd.auth import Authenticator, dynsec
from hubd.auth.dynsec import broker_acl
from hubd.auth.registration import Registration
from hubd.auth.registry import Registry
from hubd.broker import EmbeddedBroker, packet_limit
from hubd.clock.edges import EdgeChecks
from hubd.clock.ntp import NtpWatch
from hubd.clock.state import Clocks
from hubd.config import Config, read_secret
from hubd.decode.native import ReplyRule
from hubd.decode.vendor import Catalog, Change
from hubd.ingest import Ingest
from hubd.market.data import MarketData
from hubd.market.fetch import WeatherFetch
from hubd.ops.http import Ops
from hubd.quarantine import Quarantine
from hubd.services import Service
from hubd.services.plan import PlanService
from hubd.services.query import QueryService
from hubd.services.register import RegisterService
from hubd.services.time import TimeService
from hubd.sources import Supervisor
from hubd.sources.cloud import build_sources as cloud_sources
from hubd.sources.modbus import build_sources as modbus_sources
from hubd.sources.mqtt import MqttSource
from hubd.store.factory import open_query, open_sink
from hubd.store.writer import BatchWriter


class Hub:
    """One running hub: builds its parts from the config, runs until stopped, then drains."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (or ``stop()``), then drain: commit and answer what is in hand."""
        config = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(RuntimeError, ValueError):  # not the main thread: tests run hubs in threads
                loop.add_signal_handler(sig, self.stop)
        async with AsyncExitStack() as stack:
            url = config.broker.url
            broker = None
            if url is None:
                broker = EmbeddedBroker(
                    config.data_path,
                    port=config.broker.embedded_port,
                    bind=config.broker.embedded_bind,
                    max_packet_size=packet_limit(config.limits.max_payload_bytes),
                    dynsec=_embedded_dynsec(config),
                )
                await broker.start()
                stack.push_async_callback(broker.stop)
                url = broker.url
            self.audit = audit = AuditLog(config.audit_path, fsync=config.audit.fsync)
            stack.callback(audit.close)
            supervising = None
            if broker is not None:  # cancelled before the broker is stopped and the audit closed (the stack's order)
                supervising = asyncio.create_task(broker.supervise(self._broker_restarted), name="hubd-broker")
                stack.push_async_callback(_cancel, supervising)
            pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hubd-bcrypt")
            stack.callback(pool.shutdown)
            # Registration's bcrypt runs apart from the data path's: data messages full of wrong passwords
            # must not hold up a DER's registration. One thread: its checks are few and rate-limited.
            register_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubd-register")
            stack.callback(register_pool.shutdown)
            registry = Registry(config.registry_path)
            stack.callback(registry.close)
            quarantine = Quarantine(config.registry_path, config.limits.quarantine_max_bytes)
            stack.callback(quarantine.close)
            store = open_sink(config, audit)
            await store.start()
            stack.push_async_callback(store.close)
            # Queries read through their own connection and thread, beside the writer, so a long settlement
            # query never holds up the acknowledgement of incoming data.
            reader = open_query(config)
            stack.callback(reader.close)
            query_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubd-query")
            stack.callback(query_thread.shutdown)
            self.auth = auth = Authenticator(registry, pool, config.auth.rate_limit)
            # Groups, plans and series (hubd.market): one connection for the event loop, one for the query thread.
            market, query_market = MarketData(config.registry_path), MarketData(config.registry_path)
            stack.callback(market.close)
            stack.callback(query_market.close)
            self.writer = writer = BatchWriter(
                store, audit, config.store.batch_max_readings, config.store.queue_max_messages
            )
            writer.start()
            # One rule for where answers may go: ingest refuses a data message by it, the MQTT source answers by
            # it, and the addresses it found good are remembered once for both.
            replies = ReplyRule(config.topic_prefix)
            # Clocks: the hub's against NTP, the sources' checked over MQTT and judged from their data; the data
            # path flags (or refuses) the readings of a clock known to be off. Read by hubd time and ops.
            self.clocks = clocks = Clocks(config.time, audit, config.data_path)
            stack.callback(clocks.save, True)
            self.ingest = Ingest(auth, writer, quarantine, audit, config.limits, replies, clocks)
            self.catalog = Catalog([config.formats_shipped_path, config.formats_user_path])
            stack.callback(self.catalog.close)
            self._formats_changed(self.catalog.scan())
            services: list[Service] = [
                RegisterService(
                    Registration(
                        auth,
                        config.auth,
                        audit,
                        register_pool,
                        broker_acl(config, url),
                        config.topic_prefix,
                        dynsec.reserved(config),
                        dynsec.claim_password(config),
                    ),
                    audit,
                ),
                QueryService(auth, config.query, reader, query_thread, audit, (query_market, config.market)),
                PlanService(auth, market, audit),
                TimeService(audit, clocks),
            ]
            self.mqtt = MqttSource(
                config.broker,
                url,
                config.topic_prefix,
                replies,
                config.limits,
                services,
                audit,
                writer.count,
                password=read_secret(config.broker.password_file),
                debug=config.log.level == "DEBUG",
                vouched=config.broker.access_control != "none",
            )
            polled = modbus_sources(config, audit, registry.describe)  # devices the hub polls itself
            clouds = cloud_sources(config, audit, clocks)  # vendor-cloud accounts the hub collects
            for cloud in clouds:
                stack.callback(cloud.state.close)
            self.sources = Supervisor([self.mqtt, *polled, *clouds], audit)
            audit.append("hub.start", broker=url, store=config.store.backend)
            audit.flush()
            _quiet_gc()  # before the first message: what is frozen is never collected
            await self.sources.start(self.ingest)
            # Operating it (hubd.ops): systemd's notifications, metrics, health and the status page on http.bind.
            self.ops = ops = Ops(self)
            stack.push_async_callback(ops.stop)
            await ops.start()
            registered = sum(der.status == "registered" for der in auth.ders.values())
            logger.info(
                "hubd serving on {} (prefix {}), DERs known: {}, registered: {}",
                url,
                config.topic_prefix,
                len(auth.ders),
                registered,
            )
            clock_tasks = [asyncio.create_task(NtpWatch(clocks, config.time.ntp).run(), name="hubd-ntp")]
            if config.time.edges.check:
                checks = EdgeChecks(
                    clocks,
                    config.time.edges,
                    config.topic_prefix,
                    config.broker,
                    url,
                    audit,
                    password=read_secret(config.broker.password_file),
                )
                clock_tasks.append(asyncio.create_task(checks.run(), name="hubd-clock-checks"))
            for task in clock_tasks:
                stack.push_async_callback(_cancel, task)
            for fetch in config.market.weather:  # weather fetched on a schedule (hubd.market.fetch)
                fetching = asyncio.create_task(
                    WeatherFetch(fetch, market, audit).run(), name=f"hubd-weather-{fetch.place}"
                )
                stack.push_async_callback(_cancel, fetching)
            self.ready.set()
            ops.ready()  # READY=1: the broker session, the store and the sources are up
            watcher = asyncio.create_task(self._watch_formats(), name="hubd-formats")
            stopping = asyncio.create_task(self._stop.wait(), name="hubd-stop")
            await asyncio.wait([t for t in (stopping, supervising) if t is not None], return_when="FIRST_COMPLETED")
            stopping.cancel()
            watcher.cancel()
            failure = supervising.exception() if supervising is not None and supervising.done() else None
            if failure is not None:
                audit.append("broker.failed", "error", reason=str(failure))
            logger.info("stopping: taking no new messages, committing and answering those in hand")
            await ops.stop()  # STOPPING=1, and the listener closes
            await self.sources.stop()
            await self.ingest.close()
            await writer.close()
            audit.append("hub.stop")
        if failure is not None:
            raise failure  # the CLI says it in one line; systemd's Restart= starts the whole hub again
        logger.info("hubd stopped")

    def stop(self) -> None:
        self._stop.set()

    def _broker_restarted(self, status: int) -> None:
        """The embedded broker died and runs again: said once, audited with how it ended (-9: SIGKILL)."""
        logger.warning("the embedded broker exited with status {} and was started again", status)
        self.audit.append("broker.restarted", status=status)
        self.audit.flush()

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


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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


def _embedded_dynsec(config: Config) -> tuple[str, Path] | None:
    """Access control at the embedded broker: its plugin file rebuilt from the registry before it starts."""
    if config.broker.access_control != "dynsec":
        return None
    registry = Registry(config.registry_path)
    try:
        changes = dynsec.rebuild(config, registry)
    finally:
        registry.close()
    if changes:
        logger.info("the broker's access control was rebuilt from the registry: {}", "; ".join(changes[:10]))
    return dynsec.find_plugin(), config.plugin_path
