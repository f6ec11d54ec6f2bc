"""Prometheus metrics of one hub, in a registry of its own (never the library's global default).

Almost everything is read at scrape time from counters and state the hub keeps anyway (``HubCollector``), so
metrics cost the data path an addition per message at most; the commit histograms are observed once per
commit. No metric has a DER id as a label: 100,000 DERs would be 100,000 series per metric. The list, with
types and labels, is in docs/operations.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hubd.ops.clocks import clocks
from hubd.store.influx.sink import InfluxSink

if TYPE_CHECKING:
    from hubd.app import Hub

_SOURCE_STATES = ("starting", "up", "down", "stopped")


class HubCollector(Collector):
    """The hub's counters and state, read when Prometheus scrapes."""

    def __init__(self, hub: Hub, quarantined: Callable[[], int]) -> None:
        self._hub = hub
        self._quarantined = quarantined

    def collect(self) -> Iterator[Metric]:
        hub = self._hub
        ingest, writer = hub.ingest, hub.writer
        yield _counter("hubd_messages_received", "Data messages taken in from every source.", ingest.messages)
        yield _counter("hubd_readings_received", "Readings in the decoded data messages.", ingest.readings)
        yield _counter("hubd_readings_stored", "Readings committed to the store (accepted).", writer.committed)
        yield _by("hubd_readings_refused", "Readings refused, by error code.", "code", ingest.refused)
        yield _by("hubd_messages_quarantined", "Data messages kept in quarantine, by error code.", "code", ingest.kept)
        yield _by(
            "hubd_answers_sent", "Answers published, by topic (data, register, query, time).", "topic", hub.mqtt.answers
        )
        messages, readings = writer.queued
        yield _gauge("hubd_store_queue_messages", "Messages waiting for a commit.", messages)
        yield _gauge("hubd_store_queue_readings", "Readings waiting for a commit.", readings)
        if isinstance(writer.sink, InfluxSink):  # store.backend: influxdb: its durable spool
            sink = writer.sink
            age = 0.0 if sink.oldest_at is None else max(time.time() - sink.oldest_at / 1000, 0.0)
            yield _gauge("hubd_spool_readings", "Readings in the InfluxDB spool, waiting for InfluxDB.", sink.spooled)
            yield _gauge("hubd_spool_oldest_age_seconds", "Age of the spool's oldest batch (0: empty).", age)
            yield _counter(
                "hubd_spool_replayed_readings", "Readings replayed from the spool into InfluxDB.", sink.replayed
            )
        in_hand, in_hand_bytes = hub.mqtt.driver.in_hand
        yield _gauge("hubd_mqtt_in_hand_messages", "MQTT messages taken and not yet acknowledged.", in_hand)
        yield _gauge("hubd_mqtt_in_hand_bytes", "Bytes of the MQTT messages in hand.", in_hand_bytes)
        yield _gauge("hubd_broker_connected", "1 while the broker session is up.", hub.mqtt.driver.connected)
        statuses = {"allowed": 0, "registered": 0, "revoked": 0}
        for der in list(hub.auth.ders.values()):
            statuses[der.status] = statuses.get(der.status, 0) + 1
        yield _by(
            "hubd_ders",
            "DERs in the registry, by status (registered: got their password).",
            "status",
            statuses,
            gauge=True,
        )
        yield _gauge("hubd_quarantine_entries", "Entries in the quarantine.", self._quarantined())
        state = GaugeMetricFamily(
            "hubd_source_state",
            "1 for the state each source is in (starting, up, down, stopped).",
            labels=["kind", "name", "state"],
        )
        for source in hub.sources.sources:
            health = source.health
            for name in _SOURCE_STATES:
                state.add_metric([source.kind, source.name, name], 1.0 if health == name else 0.0)
        yield state
        measured = [c for c in clocks(hub) if c.offset_s is not None]
        if measured:
            clock = GaugeMetricFamily(
                "hubd_clock_offset_seconds", "Measured clock offsets (the hub's and its sources').", labels=["clock"]
            )
            for c in measured:
                clock.add_metric([c.name], c.offset_s or 0.0)
            yield clock


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _by(name: str, documentation: str, label: str, values: dict[str, int], gauge: bool = False) -> Metric:
    family: CounterMetricFamily | GaugeMetricFamily = (
        GaugeMetricFamily(name, documentation, labels=[label])
        if gauge
        else CounterMetricFamily(name, documentation, labels=[label])
    )
    for key, value in sorted(dict(values).items()):
        family.add_metric([key], value)
    return family


def hub_registry(hub: Hub, quarantined: Callable[[], int]) -> CollectorRegistry:
    """A registry with the hub's metrics, its commit histograms (fed by the writer) and the process's own
    (memory, CPU, open files)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(HubCollector(hub, quarantined))
    ProcessCollector(registry=registry)
    seconds = Histogram(
        "hubd_commit_duration_seconds",
        "Time from handing a batch to the store until it was committed.",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        registry=registry,
    )
    sizes = Histogram(
        "hubd_commit_readings",
        "Readings committed in one batch.",
        buckets=(1, 10, 100, 300, 1000, 3000, 10000, 30000),
        registry=registry,
    )

    def observe(readings: int, duration_s: float) -> None:
        seconds.observe(duration_s)
        sizes.observe(readings)

    hub.writer.on_commit = observe
    return registry
