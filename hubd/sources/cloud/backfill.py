"""The operator's commands on a cloud source: ``hubd source backfill NAME --start T --end T`` collects a window
again, on demand (after a vendor's outage, or for data from before the source was configured); ``hubd source
test NAME`` asks for the last window and shows what it decodes to, storing nothing.

A backfill runs in the command's own process with the daemon's pipeline (decode → auth → store) on the same config,
store and audit trail, so what it stores is judged and kept exactly as the running hub would; the store being
idempotent, what the hub already holds is replaced, not doubled. It leaves the sites' cursors as they are: the
running hub's collection neither jumps over nor goes back to anything because of a backfill.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hubd.audit import AuditLog
from hubd.auth import Authenticator
from hubd.auth.registry import Registry
from hubd.config import CloudSourceConfig, Config
from hubd.decode.vendor import Catalog
from hubd.ingest import Ingest
from hubd.model import HubError, Reading, format_time, now_ms
from hubd.quarantine import Quarantine
from hubd.sources.cloud import CloudSource, der_for
from hubd.sources.cloud.cursor import CloudState
from hubd.sources.cloud.profile import check_zones, load_profile
from hubd.store.factory import open_sink
from hubd.store.writer import BatchWriter

Report = Callable[[str, int, int, int], None]  # site, window start, window end, readings stored


async def backfill(config: Config, source_config: CloudSourceConfig, start_ms: int, end_ms: int, report: Report) -> int:
    """Every site of the source from ``start_ms`` to ``end_ms``, window by window; the readings stored."""
    profile = load_profile(config, source_config.profile)
    check_zones(config, source_config, profile)
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


async def probe(config: Config, source_config: CloudSourceConfig) -> list[dict[str, Any]]:
    """``hubd source test`` for a cloud source: the last hour of each site (one interval, if longer) asked for
    and decoded from here, nothing stored, no budget spent: how an operator tries a profile."""
    profile = load_profile(config, source_config.profile)
    check_zones(config, source_config, profile)
    catalog = Catalog([config.formats_shipped_path, config.formats_user_path])
    catalog.scan()
    audit = AuditLog(config.audit_path, fsync=config.audit.fsync)
    state = CloudState(config.registry_path)
    source = CloudSource(source_config, profile, audit, state, config)
    source.client._budget = None  # a try spends none of the collection's daily budget
    step = profile.interval_s * 1000
    end = (now_ms() - profile.delay_s * 1000) // step * step
    start = end - max(3600 * 1000, step)
    found: list[dict[str, Any]] = []
    try:
        for site in source_config.sites:
            for spec in profile.requests:
                der_id = der_for(source_config, site, spec.role)
                if der_id is None:
                    continue
                async for page in source.client.window(spec, site, start, end):
                    items = source.decode(page, spec.format, der_id)
                    readings = [r for r in items if isinstance(r, Reading)]
                    found.append(
                        {
                            "site": site,
                            "der_id": der_id,
                            "request": page.request,
                            "format": spec.format,
                            "readings": len(readings),
                            "refused": [e.message for e in items if isinstance(e, HubError)][:5],
                            "first": _shown(readings[0]) if readings else None,
                            "last": _shown(readings[-1]) if readings else None,
                        }
                    )
        if source.client.clock is not None:
            found.append({"clock_offset_s": source.client.clock[0], "rtt_s": source.client.clock[1]})
    finally:
        await source.client.close()
        state.close()
        audit.close()
        catalog.close()
    return found


def _shown(reading: Reading) -> dict[str, Any]:
    return {"measured_at": format_time(reading.measured_at), **reading.values}
