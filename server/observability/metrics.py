"""Prometheus metrics: baton's own, in a registry of this app (no global state), rendered
with what the process's default registry holds (process CPU and memory, and vLLM's own
engine metrics: KV-cache usage, running and waiting requests; not recomputed here).

Rules: labels stay bounded (deployment, version, strategy, phase, status code: never a
request or a client); the request path only increments and observes; everything that reads
state (in flight, waiting, slot states) is read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)
PHASE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        by_version = ("deployment", "version")
        self.requests = Counter("baton_requests", "Requests answered, by status code", (*by_version, "status"), registry=self.registry)
        self.request_seconds = Histogram("baton_request_duration_seconds", "End-to-end latency", by_version, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft_seconds = Histogram("baton_time_to_first_token_seconds", "Time to the first token", by_version, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot_seconds = Histogram("baton_time_per_output_token_seconds", "Time per output token after the first", by_version, buckets=TOKEN_BUCKETS, registry=self.registry)
        self.queue_seconds = Histogram("baton_queue_wait_seconds", "Wait for a place and a lease", ("deployment",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.prepare_seconds = Histogram(
            "baton_prepare_seconds", "From the lease to the prompts ready for the engine: chat template, tokenizer, limits", ("deployment",), buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.prompt_tokens = Counter("baton_prompt_tokens", "Prompt tokens", by_version, registry=self.registry)
        self.cached_prompt_tokens = Counter("baton_cached_prompt_tokens", "Prompt tokens the engine's prefix cache held (of baton_prompt_tokens)", by_version, registry=self.registry)
        self.completion_tokens = Counter("baton_completion_tokens", "Completion tokens", by_version, registry=self.registry)
        self.swaps = Counter("baton_swaps", "Swaps, rollbacks, canaries, loads and recoveries, by outcome", ("deployment", "action", "strategy", "outcome"), registry=self.registry)
        self.swap_phase_seconds = Histogram("baton_swap_phase_duration_seconds", "Each swap phase", ("action", "strategy", "phase"), buckets=PHASE_BUCKETS, registry=self.registry)
        self.cut_off = Counter("baton_requests_cut_off", "Requests ended at a drain deadline", ("deployment",), registry=self.registry)
        self.mirrored = Counter("baton_mirrored_requests", "Requests copied to a canary (copied), or not because copies were running already (dropped)", ("deployment", "outcome"), registry=self.registry)
        self.engine_starts = Counter("baton_engine_starts", "Engine starts, by outcome", ("engine", "outcome"), registry=self.registry)
        self.degradations = Counter("baton_degradation_alerts", "Objectives missed, and what was done", ("deployment", "reason", "action"), registry=self.registry)
        self.engine_failures = Counter("baton_engine_failures", "Engines found dead while serving", ("deployment", "version"), registry=self.registry)

    def watch(self, collector) -> None:
        """Add a collector whose `collect()` reads state at scrape time."""
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry)) + generate_latest(_WithoutCreated(REGISTRY))

    def record_swap(self, record) -> None:
        self.swaps.labels(record.deployment, record.action, record.strategy, record.status).inc()
        for phase in record.phases:
            if phase.duration_s is not None:
                self.swap_phase_seconds.labels(record.action, record.strategy, phase.name).observe(phase.duration_s)
        if record.num_cut_off:
            self.cut_off.labels(record.deployment).inc(record.num_cut_off)


class _WithoutCreated:
    """A registry's metrics without the `*_created` series prometheus_client adds to every
    counter, histogram and summary (one more series per label set, which Prometheus's text
    format cannot mark as metadata). Turning them off is process-wide in prometheus_client."""

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def collect(self):
        for metric in self._registry.collect():
            metric.samples = [sample for sample in metric.samples if sample.name != f"{metric.name}_created"]
            yield metric


class StateCollector:
    """Gauges read from the deployments at scrape time: nothing on the request path."""

    def __init__(self, deployments: Callable[[], Iterable]):
        self._deployments = deployments

    def collect(self):
        in_flight = GaugeMetricFamily("baton_requests_in_flight", "Requests holding a lease", labels=("deployment",))
        waiting = GaugeMetricFamily("baton_requests_waiting", "Requests held by a swap or queued for a place", labels=("deployment",))
        slots = GaugeMetricFamily("baton_slot_state", "1 for each slot's current state", labels=("deployment", "version", "role", "state"))
        for deployment in self._deployments():
            in_flight.add_metric((deployment.name,), sum(s.num_leases for s in deployment.slots()))
            waiting.add_metric((deployment.name,), deployment.num_waiting + deployment.admission.num_waiting)
            for role, slot in deployment.roles():
                slots.add_metric((deployment.name, slot.version, role, slot.state.value), 1)
        yield from (in_flight, waiting, slots)


class BatchCollector:
    """Gauges of the batches (server/batches/), read from their store at scrape time."""

    def __init__(self, summary: Callable[[], tuple[dict[str, int], int]]):
        self._summary = summary

    def collect(self):
        by_status, pending = self._summary()
        batches = GaugeMetricFamily("baton_batches", "Batches kept, by status", labels=("status",))
        for status, num_batches in sorted(by_status.items()):
            batches.add_metric((status,), num_batches)
        yield batches
        yield GaugeMetricFamily("baton_batch_requests_pending", "Requests that unfinished batches have yet to answer", value=pending)
