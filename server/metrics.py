"""Prometheus metrics. One registry per app (several apps may live in one test process).

Request/latency/token series are observed by the routes; store residency and counters are read from
TieredStateStore.stats() at scrape time (so they are exact, not re-counted); persist and restore
latencies come from the store's event callback.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_IO_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)


class _StoreCollector(Collector):
    """deltamem_* series derived from the store's own counters at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self):  # type: ignore[override]
        try:
            s = self._stats()
        except Exception:  # noqa: BLE001 - a failing store must not break /metrics
            return
        resident = GaugeMetricFamily("deltamem_sessions_resident", "Session states resident per tier", labels=["tier"])
        resident.add_metric(["device"], s.get("device_resident", 0))
        resident.add_metric(["host"], s.get("host_resident", 0))
        yield resident
        nbytes = GaugeMetricFamily("deltamem_state_bytes", "Bytes of session state resident per tier", labels=["tier"])
        nbytes.add_metric(["device"], s.get("device_state_bytes", 0))
        nbytes.add_metric(["host"], s.get("host_state_bytes", 0))
        yield nbytes
        yield GaugeMetricFamily("deltamem_state_dirty", "Resident states not yet persisted", value=s.get("dirty", 0))
        for name, key, doc in (
            ("deltamem_state_restores", "restores", "States restored from the persistent tier"),
            ("deltamem_state_restore_failures", "restore_failures", "Restores that failed (corrupted, mismatched, unreachable)"),
            ("deltamem_state_persists", "persists", "States written to the persistent tier"),
            ("deltamem_state_persist_failures", "persist_failures", "Failed writes to the persistent tier"),
            ("deltamem_state_hits_device", "hits_device", "Lookups served from the device tier"),
            ("deltamem_state_hits_host", "hits_host", "Lookups served from the host tier"),
            ("deltamem_state_stale_drops", "stale_drops", "Resident states dropped because another replica committed"),
        ):
            yield CounterMetricFamily(name, doc, value=s.get(key, 0))
        ev = CounterMetricFamily("deltamem_state_evictions", "States evicted from a tier", labels=["tier"])
        ev.add_metric(["device"], s.get("evictions_device", 0))
        ev.add_metric(["host"], s.get("evictions_host", 0))
        yield ev


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("deltamem_http_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram("deltamem_http_request_duration_seconds", "HTTP request latency (until the last byte)",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("deltamem_time_to_first_token_seconds", "Time to first generated token",
                              ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("deltamem_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("deltamem_generation_tokens", "Tokens generated", registry=r)
        self.written_tokens = Counter("deltamem_written_tokens", "Tokens written into session states", registry=r)
        self.turns = Counter("deltamem_turns", "Generation requests by outcome", ["kind", "outcome"], registry=r)
        self.session_busy = Counter("deltamem_session_busy", "Requests refused because their session stayed busy", registry=r)
        self.active = Gauge("deltamem_active_generations", "Generations in flight", registry=r)
        self.persist_latency = Histogram("deltamem_state_persist_seconds", "Latency of a durable state write",
                                         buckets=_IO_BUCKETS, registry=r)
        self.restore_latency = Histogram("deltamem_state_restore_seconds", "Latency of a restore from the persistent tier",
                                         buckets=_IO_BUCKETS, registry=r)

    def attach_store(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_StoreCollector(stats))

    def on_store_event(self, name: str, info: dict[str, Any]) -> None:
        """TieredStateStore on_event callback."""
        if name == "persist" and "latency_s" in info:
            self.persist_latency.observe(info["latency_s"])
        elif name == "restore" and "latency_s" in info:
            self.restore_latency.observe(info["latency_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
