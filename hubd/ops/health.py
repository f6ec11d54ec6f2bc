"""Is the hub alive, is it ready, and the few numbers that say how it is doing: what ``/healthz``, ``/readyz``
and ``hubd status`` report, and the one-line status systemd shows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hubd.app import Hub


def checks(hub: Hub) -> dict[str, Any]:
    """Each part /readyz depends on: the broker session, the store's writer, every source."""
    sources = [{"kind": s.kind, "name": s.name, "state": s.health} for s in hub.sources.sources]
    store: dict[str, Any] = {"ok": hub.writer.serving, "backend": hub.config.store.backend}
    spooled = getattr(hub.writer.sink, "spooled", None)  # InfluxDB: readings acknowledged from the spool
    if spooled is not None:
        store["spooled_readings"] = spooled  # still ok (nothing is lost), but the operator should see it
    return {
        "broker": {"ok": hub.mqtt.driver.connected, "address": hub.mqtt.driver.address},
        "store": store,
        "sources": {"ok": all(s["state"] == "up" for s in sources), "sources": sources},
    }


def readiness(hub: Hub, stopping: bool) -> dict[str, Any]:
    """The /readyz body: ``ready`` only while the hub serves and every check passes, with the counts."""
    found = checks(hub)
    ready = hub.ready.is_set() and not stopping and all(check["ok"] for check in found.values())
    messages, readings = hub.writer.queued
    return {
        "ready": ready,
        "stopping": stopping,
        "checks": found,
        "counts": {
            "messages_received": hub.ingest.messages,
            "readings_stored": hub.writer.committed,
            "readings_refused": dict(sorted(hub.ingest.refused.items())),
            "messages_quarantined": dict(sorted(hub.ingest.kept.items())),
            "store_queue_messages": messages,
            "store_queue_readings": readings,
        },
    }


def status_line(hub: Hub) -> str:
    """systemd's STATUS=: what ``systemctl status hubd`` shows in one line."""
    broker = "broker connected" if hub.mqtt.driver.connected else "broker DISCONNECTED"
    down = [f"{s.kind} {s.name}" for s in hub.sources.sources if s.health != "up"]
    sources = f"sources down: {', '.join(down)}" if down else "sources up"
    return f"{broker}, {sources}, {hub.writer.committed} readings stored, {len(hub.auth.ders)} DERs known"
