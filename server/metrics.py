"""Prometheus metrics of a server, read from its live counters at each scrape.

A custom collector rather than counters updated on the hot paths: senders and the repair listener already
keep plain integer counters (written by one thread each), so sending a datagram costs nothing more for
metrics, and a scrape costs one `Registry.list()`. Each server has its own `CollectorRegistry`, so two
servers in one process (the tests) never clash over the global one.

Per stream (labels ``stream_id``, ``image``, ``format``, ``group``): bytes, datagrams, loops, repair
requests, repair frames sent, parity frames sent and their CPU, repair frames pending, repair drops, leases,
receivers a holding stream still waits for, send errors, measured rate.
Server-wide: running streams, active leases, leases expired, repair datagrams received and dropped by
``reason`` (`RepairDrop`), HTTP range responses by ``status`` and bytes sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .registry import Registry, StreamStatus
from .repair_listener import RepairListener
from .throttle import SharedRateLimit

_STREAM_LABELS = ("stream_id", "image", "format", "group")

# name, help, kind, value of a stream's status
_PER_STREAM: tuple[tuple[str, str, type, Callable[[StreamStatus], float]], ...] = (
    ("vmcast_stream_bytes_sent", "UDP payload bytes sent (vmcast headers included).", CounterMetricFamily,
     lambda s: s.sender.bytes_sent),
    ("vmcast_stream_datagrams_sent", "Datagrams sent: data, metadata and repairs.", CounterMetricFamily,
     lambda s: s.sender.datagrams_sent),
    ("vmcast_stream_loops_completed", "Times the whole image was sent.", CounterMetricFamily,
     lambda s: s.sender.loops_completed),
    ("vmcast_stream_rests", "Times the carousel came to rest (every lease holder had heard a whole loop).",
     CounterMetricFamily, lambda s: s.sender.rests),
    ("vmcast_stream_resting", "1 while the carousel rests (sends only the repairs asked for), else 0.", GaugeMetricFamily,
     lambda s: float(s.sender.resting)),
    ("vmcast_stream_repair_requests", "Repair requests accepted for the stream.", CounterMetricFamily,
     lambda s: s.sender.repair_requests),
    ("vmcast_stream_repair_frames_sent", "Frames resent from the repair socket on request.", CounterMetricFamily,
     lambda s: s.sender.repair_frames_sent),
    ("vmcast_stream_parity_frames_sent", "RaptorQ parity frames sent from the repair socket on request.",
     CounterMetricFamily, lambda s: s.sender.parity_frames_sent),
    ("vmcast_stream_parity_cpu_seconds", "CPU time the parity worker processes spent on the stream's parity.",
     CounterMetricFamily, lambda s: s.sender.parity_cpu_seconds),
    ("vmcast_stream_parity_deferred", "Parity frames whose turn came before the workers had made them (sent once made).",
     CounterMetricFamily, lambda s: s.sender.parity_deferred),
    ("vmcast_stream_pacing_missed_seconds", "Sending time the stream lost at its rate (the sender woke too late to make it up).",
     CounterMetricFamily, lambda s: s.sender.pacing_missed_seconds),
    ("vmcast_stream_repair_drops", "Repair requests for the stream that were dropped.", CounterMetricFamily,
     lambda s: s.sender.repair_drops),
    ("vmcast_stream_send_errors", "Sends that failed (other than a full queue) and were retried.", CounterMetricFamily,
     lambda s: s.sender.send_errors),
    ("vmcast_stream_repair_pending", "Frames asked for and not sent yet.", GaugeMetricFamily,
     lambda s: s.sender.repair_pending),
    ("vmcast_stream_leases", "Leases holding the stream.", GaugeMetricFamily, lambda s: s.references),
    ("vmcast_stream_waiting_for_receivers", "Receivers the stream still holds for before its first loop (min_receivers).",
     GaugeMetricFamily, lambda s: s.waiting_for),
    ("vmcast_stream_measured_bits_per_second", "Send rate over about the last second, IP/UDP headers included.",
     GaugeMetricFamily, lambda s: s.sender.measured_bps),
)  # fmt: skip


class ServerCollector(Collector):
    def __init__(
        self,
        *,
        registry: Registry,
        listener: RepairListener,
        range_limit: SharedRateLimit,
        range_responses: dict[int, int],
    ) -> None:
        self._registry = registry
        self._listener = listener
        self._range_limit = range_limit
        self._range_responses = range_responses

    def collect(self) -> Iterator[Metric]:
        streams = self._registry.list()
        families: list[Any] = [kind(name, help, labels=_STREAM_LABELS) for name, help, kind, _ in _PER_STREAM]
        for stream in streams:
            labels = [stream.stream_id, stream.image, stream.format, str(stream.group)]
            for family, (_, _, _, value) in zip(families, _PER_STREAM, strict=True):
                family.add_metric(labels, value(stream))
        yield from families
        yield GaugeMetricFamily("vmcast_streams_running", "Streams running.", value=len(streams))
        yield GaugeMetricFamily(
            "vmcast_leases_active", "Leases granted and not ended.", value=self._registry.active_leases
        )
        yield CounterMetricFamily(
            "vmcast_leases_expired", "Leases ended because they were not renewed in time.",
            value=self._registry.leases_expired,
        )  # fmt: skip
        yield CounterMetricFamily(
            "vmcast_repair_datagrams_received", "Datagrams received on the repair port.", value=self._listener.datagrams
        )
        yield CounterMetricFamily(
            "vmcast_repair_requests_accepted",
            "Repair requests handed to a stream's sender.",
            value=self._listener.accepted,
        )
        dropped = CounterMetricFamily(
            "vmcast_repair_requests_dropped", "Repair datagrams dropped, by reason.", labels=("reason",)
        )
        for reason, count in sorted(self._listener.drops.items()):
            dropped.add_metric([reason], count)
        yield dropped
        responses = CounterMetricFamily(
            "vmcast_range_responses", "Answers of GET /v1/streams/{id}/data, by status.", labels=("status",)
        )
        for status, count in sorted(self._range_responses.items()):
            responses.add_metric([str(status)], count)
        yield responses
        yield CounterMetricFamily(
            "vmcast_range_bytes_sent", "Image bytes sent by HTTP range downloads.", value=self._range_limit.bytes_taken
        )
        yield GaugeMetricFamily(
            "vmcast_range_rate_limit_bits_per_second", "The shared cap of range downloads (--repair-rate); 0 = none.",
            value=self._range_limit.rate_bps,
        )  # fmt: skip


def metrics_registry(collector: ServerCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
