"""Prometheus metrics of throughput and per-stage retention.

One ``StageMetrics`` per process, on its own registry (no global state), served
over HTTP by ``serve_metrics``. Names follow Prometheus conventions; the
``stage`` label is the service stage ("scoring"), ``step`` a sub-step inside it
("heuristics", "ask_llm"); ``reason`` values come from a fixed set of rule names,
never from sample data, so label cardinality stays bounded.

Sample counters carry ``transport``: "kafka" for batches a stage worker consumed, "grpc"
for requests its API served, so in ``all`` mode each reconciles with its own source (the
topic's records, the clients' calls). The gRPC server sets it for the calls it runs
(``TRANSPORT``, a context variable: a core's own ``observe_step`` calls are labelled by
whichever transport called the core); everything else counts as "kafka".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.runtime.domain import Outcome, step_counts

# Score histograms: buckets per signal, since a probability and a perplexity live
# on different scales. Unknown signals get the unit-interval buckets.
UNIT_BUCKETS: tuple[float, ...] = tuple(round(i / 20, 2) for i in range(1, 21))
LOG_BUCKETS: tuple[float, ...] = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, math.inf)
# Density is a fraction of the corpus (1/n .. 1), spread over decades; its importance
# weight 1/p is >= 1.
DENSITY_BUCKETS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1)
WEIGHT_BUCKETS: tuple[float, ...] = (1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100, 1000, math.inf)
SCORE_BUCKETS: dict[str, tuple[float, ...]] = {
    "perplexity": LOG_BUCKETS,
    "density": DENSITY_BUCKETS,
    "density_weight": WEIGHT_BUCKETS,
}
TRANSPORT: ContextVar[str] = ContextVar("sluice_transport", default="kafka")
"""Which transport the samples being counted came through: "kafka" or "grpc"."""

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class StageMetrics:
    """Counters and histograms for one service stage."""

    def __init__(self, stage: str, registry: CollectorRegistry | None = None) -> None:
        self.stage = stage
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.samples_in = Counter(
            "sluice_stage_samples_in",
            "Samples received by the stage, by transport.",
            ["stage", "transport"],
            registry=r,
        )
        self.samples_out = Counter(
            "sluice_stage_samples_out",
            "Samples the stage kept and forwarded (Kafka) or returned kept (gRPC).",
            ["stage", "transport"],
            registry=r,
        )
        self.samples_dropped = Counter(
            "sluice_stage_samples_dropped",
            "Samples dropped, by reason ('<step>:<rule>') and transport.",
            ["stage", "reason", "transport"],
            registry=r,
        )
        self.tokens_in = Counter(
            "sluice_stage_tokens_in",
            "Whitespace tokens received.",
            ["stage", "transport"],
            registry=r,
        )
        self.tokens_out = Counter(
            "sluice_stage_tokens_out",
            "Whitespace tokens forwarded.",
            ["stage", "transport"],
            registry=r,
        )
        self.step_samples = Counter(
            "sluice_step_samples",
            "Samples seen by a step inside a stage, by outcome and transport.",
            ["stage", "step", "outcome", "transport"],
            registry=r,
        )
        self.batches = Counter("sluice_stage_batches", "Batches processed.", ["stage"], registry=r)
        self.dead_letters = Counter(
            "sluice_stage_dead_letters",
            "Messages sent to the dead-letter topic, by reason.",
            ["stage", "reason"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "sluice_stage_batch_seconds",
            "Time to process one batch (decode to acknowledged output).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "sluice_stage_consumer_lag",
            "Messages behind the partition high watermark.",
            ["stage", "topic", "partition"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "sluice_stage_generated_tokens",
            "Tokens the stage's model generated (generating stages).",
            ["stage"],
            registry=r,
        )
        self.generation_seconds = Histogram(
            "sluice_generation_seconds",
            "Time of one batched generate() call.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "sluice_grpc_requests",
            "gRPC calls by method and the status code their client saw, counted when "
            "the call ends (services.runtime.grpc_server says which refusals are seen).",
            ["stage", "method", "code"],
            registry=r,
        )
        self.model_info = Gauge(
            "sluice_stage_model_info",
            "1 for the model version deciding now (label model_version: the LM's, "
            "'classifier:<version>', or 'heuristics'); join on stage to break any series "
            "down by version. One series per version a process ran: bounded.",
            ["stage", "model_version"],
            registry=r,
        )
        self._scores: dict[str, Histogram] = {}

    def score_histogram(self, signal: str) -> Histogram:
        h = self._scores.get(signal)
        if h is None:
            h = Histogram(
                f"sluice_score_{signal}",
                f"Distribution of the '{signal}' score.",
                ["stage"],
                buckets=SCORE_BUCKETS.get(signal, UNIT_BUCKETS),
                registry=self.registry,
            )
            self._scores[signal] = h
        return h

    def observe_outcomes(
        self,
        outcomes: Sequence[Outcome],
        signals: Iterable[str],
        steps: Sequence[str] = (),
    ) -> None:
        """Record a processed batch: in/out/dropped counts, tokens and scores."""
        st = self.stage
        tr = TRANSPORT.get()
        kept_tokens = 0
        in_tokens = 0
        kept = 0
        sigs = list(signals)
        for o in outcomes:
            n = len(o.sample.content.split())
            in_tokens += n
            if o.kept:
                kept += 1
                kept_tokens += n
            else:
                self.samples_dropped.labels(st, o.reason or "unspecified", tr).inc()
            for sig in sigs:
                v = o.sample.scores.get(sig)
                if v is not None and math.isfinite(v):
                    self.score_histogram(sig).labels(st).observe(v)
        self.samples_in.labels(st, tr).inc(len(outcomes))
        self.samples_out.labels(st, tr).inc(kept)
        self.tokens_in.labels(st, tr).inc(in_tokens)
        self.tokens_out.labels(st, tr).inc(kept_tokens)
        for count in step_counts(outcomes, steps):
            self.observe_step(count.step, count.samples_in, count.samples_kept)

    def set_model_version(self, version: str) -> None:
        """Mark ``version`` as the one deciding now (and earlier ones of this process not)."""
        for labels in list(self.model_info._metrics):
            self.model_info.labels(*labels).set(0)
        self.model_info.labels(self.stage, version).set(1)

    def observe_generation(self, tokens: int, seconds: float) -> None:
        """Record one batched generate() call: tokens generated and its latency."""
        self.generated_tokens.labels(self.stage).inc(tokens)
        self.generation_seconds.labels(self.stage).observe(seconds)

    def observe_step(self, step: str, n_in: int, n_kept: int) -> None:
        tr = TRANSPORT.get()
        self.step_samples.labels(self.stage, step, "in", tr).inc(n_in)
        self.step_samples.labels(self.stage, step, "kept", tr).inc(n_kept)


def serve_metrics(metrics: StageMetrics, host: str, port: int) -> tuple[WSGIServer, int]:
    """Start the /metrics HTTP server in a daemon thread; returns it and its port."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server, server.server_port
