"""Prometheus metrics, one registry per app (tests build many apps in one process)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fake_openai_server.engine.core import BatchReport

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Up to REQUEST_TIMEOUT's default (300 s): a 504, or the first int8 request's wait for
# the calibration on a CPU (a minute or two), had all fallen in +Inf beyond 60 s.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, CPU seconds, open file descriptors (Linux), of
        # this (the API) process; the engine process's: track_engine_process.
        ProcessCollector(registry=r)
        # python_gc_collections_total by generation: passes of the garbage collector.
        GCCollector(registry=r)
        self.requests = Counter(
            "fos_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.in_progress = Gauge(
            "fos_requests_in_progress", "HTTP requests being served", ["route"], registry=r
        )
        self.latency = Histogram(
            "fos_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_items = Histogram(
            "fos_batch_items",
            "Items per forward pass",
            ["model"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Counter(
            "fos_batch_tokens", "Tokens run through the model", ["model"], registry=r
        )
        self.padded_tokens = Counter(
            "fos_batch_padded_tokens", "Tokens including padding", ["model"], registry=r
        )
        self.inference = Histogram(
            "fos_inference_seconds",
            "Time per forward pass",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.graph_batches = Counter(
            "fos_batch_graphs",
            "Forward passes that replayed a CUDA graph captured at start-up (GPU)",
            ["model"],
            registry=r,
        )
        self.batch_failures = Counter(
            "fos_batch_failures",
            "Forward passes that raised (their requests got 500)",
            ["model"],
            registry=r,
        )
        self.queue_tokens = Gauge(
            "fos_queue_tokens", "Tokens waiting for the model", ["model"], registry=r
        )
        # What an autoscaler reads (docs/scaling.ja.md): how long work waits for a
        # busy model. One observation per item, from submit() until its batch is sent to
        # the engine process (which holds at most one more behind the running one).
        self.queue_wait = Histogram(
            "fos_queue_wait_seconds",
            "Time an item waited in the queue, until its batch was sent to the engine process",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            "fos_event_loop_lag_seconds",
            "How late the event loop ran a timer (what every request waits before it is read)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )

        self.tokenizer_memory = Gauge(
            "fos_tokenizer_processes_resident_memory_bytes",
            "Resident memory of the tokenizer processes, summed (0 without them)",
            registry=r,
        )

        self.ready = Gauge(
            "fos_ready",
            "1 while the server serves (/ready answers 200), else 0 (loading, restarting, "
            "failing, failed, stopping)",
            registry=r,
        )

    def track_restarts(self, engine: Callable[[], int], tokenizers: Callable[[], int]) -> None:
        """fos_engine_restarts_total and fos_tokenizer_process_restarts_total: counters
        (``increase()`` over them says how often processes die), kept by the runtime."""
        _CountedElsewhere(
            "fos_engine_restarts",
            "Times the engine process was replaced (it died or hung) since the server started",
            engine,
            self.registry,
        )
        _CountedElsewhere(
            "fos_tokenizer_process_restarts",
            "Times a tokenizer process was replaced since the server started",
            tokenizers,
            self.registry,
        )

    def track_ready(self, ready: Callable[[], bool]) -> None:
        self.ready.set_function(lambda: float(ready()))

    def track_engine_process(self, pid: Callable[[], int | None]) -> None:
        """fos_engine_process_resident_memory_bytes, CPU seconds and the rest, of the
        engine process (the model's memory: the process_* series are the API process's),
        whichever process that is after a restart; none while there is none."""
        ProcessCollector(
            namespace="fos_engine", pid=lambda: pid() or "none", registry=self.registry
        )

    def track_tokenizer_processes(self, pids: Callable[[], Iterable[int]]) -> None:
        """fos_tokenizer_processes_resident_memory_bytes, of the live ones at each scrape:
        with the engine process's and the API process's, the server's whole memory."""
        self.tokenizer_memory.set_function(lambda: float(sum(map(_resident_bytes, pids()))))

    def observe_loop_lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)

    def batch_observer(self, model: str) -> Callable[[BatchReport], None]:
        # Each series looked up once (prometheus_client checks the labels on every
        # .labels() call, and a batch observes every item's wait).
        failures = self.batch_failures.labels(model)
        items = self.batch_items.labels(model)
        tokens = self.batch_tokens.labels(model)
        padded_tokens = self.padded_tokens.labels(model)
        inference = self.inference.labels(model)
        graph_batches = self.graph_batches.labels(model)
        queue_wait = self.queue_wait.labels(model)

        def observe(report: BatchReport) -> None:
            if report.failed:
                failures.inc()
                return
            items.observe(report.items)
            tokens.inc(report.tokens)
            padded_tokens.inc(report.padded_tokens)
            inference.observe(report.seconds)
            if report.graph:
                graph_batches.inc()
            for seconds in report.queue_seconds:
                queue_wait.observe(seconds)

        return observe

    def track_queue(self, model: str, depth: Callable[[], int]) -> None:
        self.queue_tokens.labels(model).set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CountedElsewhere:
    """A counter whose count another object keeps (prometheus_client's Counter cannot
    read one from a function, and a Gauge that can is not a counter to Prometheus)."""

    def __init__(
        self, name: str, documentation: str, count: Callable[[], int], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.count = count
        registry.register(self)

    def describe(self) -> Iterable[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation, value=self.count())]


def _resident_bytes(pid: int) -> int:
    """A process's resident memory (Linux; 0 elsewhere, or when it has just ended)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0
