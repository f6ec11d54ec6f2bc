"""``hubd source backfill NAME --start T --end T``: collect a window of a cloud source again, on demand (after a
vendor's outage, or for data from before the source was configured).

It runs in the command's own process with the daemon's pipeline (decode → auth → store) on the same config,
store and audit trail, so what it stores is judged and kept exactly as the running hub would; the store being
idempotent, what the hub already holds is replaced, not doubled. It leaves the sites' cursors as they are: the
running hub's collection neither jumps over nor goes back to anything because of a backfill.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from hubd.audit import AuditLog
from hubd.auth import Authenticator
from hubd.auth.registry import Registry
from hubd.config import CloudSourceConfig, Config
from hubd.decode.vendor import Catalog
from hubd.ingest import Ingest
from hubd.quarantine import Quarantine
from hubd.sources.cloud import CloudSource
from hubd.sources.cloud.cursor import CloudState
from hubd.sources.cloud.profile import load_profile
from hubd.store.factory import open_sink
from hubd.store.writer import BatchWriter

Report = Callable[[str, int, int, int], None]  # site, window start, window end, readings stored


async def backfill(config: Config, source_config: CloudSourceConfig, start_ms: int, end_ms: int, report: Report) -> int:
    """Every site of the source from ``start_ms`` to ``end_ms``, window by window; the readings stored."""
    profile = load_profile(config, source_config.profile)
    catalog = Catalog([config.formats_shipped_path, config.formats_user_path])
    catalog.scan()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubd-backfill")
    audit = AuditLog(config.audit_path, fsync=config.audit.fsync)
    registry = Registry(config.registry_path)
    quarantine = Quarantine(config.registry_path, config.limits.quarantine_max_bytes)
    state = CloudState(config.registry_path)
    store = open_sink(config, audit)
    await store.start()
    writer = BatchWriter(store, audit, config.store.batch_max_readings, config.store.queue_max_messages)
    writer.start()
    auth = Authenticator(registry, pool, config.auth.rate_limit)
    ingest = Ingest(auth, writer, quarantine, audit, config.limits)
    source = CloudSource(source_config, profile, audit, state, config)
    source.attach(ingest)
    audit.append("cloud.backfill", source=source.name, start=start_ms, end=end_ms)
    audit.flush()
    try:
        return sum(
            [await source.collect_site(site, start_ms, end_ms, report, advance=False) for site in source_config.sites]
        )
    finally:
        await source.client.close()
        await ingest.close()
        await writer.close()
        await store.close()
        state.close()
        quarantine.close()
        registry.close()
        audit.close()
        catalog.close()
        pool.shutdown()


def run_backfill(config: Config, source_config: CloudSourceConfig, start_ms: int, end_ms: int, report: Report) -> int:
    return asyncio.run(backfill(config, source_config, start_ms, end_ms, report))
