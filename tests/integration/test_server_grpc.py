"""The shared gRPC server (services.runtime.grpc_server) under load and abuse, on real
servers running the scoring API (heuristics only: no model): idle streams cannot starve
health checks, the concurrency limit refuses at once, an idle client stream is ended, a
request for a signal the server does not compute is refused without loading a model,
response size is checked before the work, and the request metrics count what clients see,
apart from the samples Kafka brings in."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gen.sluice.common.v1 import sample_pb2
from services.gen.sluice.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from services.runtime.convert import RESULT_GROWTH_BYTES
from services.runtime.grpc_server import RunningServer, serve
from services.runtime.metrics import StageMetrics
from services.runtime.settings import GrpcSettings
from services.scoring.core import ScoringCore
from services.scoring.grpc_service import SERVICE_NAME, register
from services.scoring.settings import ScoringSettings

pytestmark = pytest.mark.integration

GOOD = (
    "The central bank raised interest rates by a quarter of a percentage point on Tuesday, "
    "citing persistent inflation in services and a tight labour market across the country. "
    "Officials said the decision was unanimous and that further increases remain possible if "
    "wage growth does not slow in the coming months. Economists had expected the move, and "
    "markets reacted calmly, with the currency little changed against the dollar by the close."
)


class Stage:
    """A running heuristics-only scoring server, its core and its metrics."""

    def __init__(self, running: RunningServer, core: ScoringCore, metrics: StageMetrics) -> None:
        self.running = running
        self.core = core
        self.metrics = metrics
        self.channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        self.stub = scoring_pb2_grpc.ScoringServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def requests(self, method: str, code: str) -> float:
        labels = {"stage": "scoring", "method": method, "code": code}
        return self.metrics.registry.get_sample_value("sluice_grpc_requests_total", labels) or 0

    def samples_in(self, transport: str) -> float:
        labels = {"stage": "scoring", "transport": transport}
        return self.metrics.registry.get_sample_value("sluice_stage_samples_in_total", labels) or 0


@pytest.fixture
def start() -> Iterator[Callable[..., Stage]]:
    stages: list[Stage] = []

    def _start(backend: Any = None, **grpc: Any) -> Stage:
        settings = ScoringSettings(
            steps=["heuristics"], grpc=GrpcSettings(host="127.0.0.1", port=0, **grpc)
        )
        metrics = StageMetrics("scoring")
        core = ScoringCore(settings, backend=backend)
        running = serve(settings.grpc, register(core, metrics), metrics=metrics)
        stages.append(Stage(running, core, metrics))
        return stages[-1]

    yield _start
    for s in stages:
        s.channel.close()
        s.running.stop(grace=0.5)


def _req(*texts: str, signals: tuple[str, ...] = ()) -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(
        samples=[sample_pb2.Sample(id=f"x{i}", text=t) for i, t in enumerate(texts)],
        signals=list(signals),
        apply_policy=True,
    )


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class Silent:
    """A client stream's requests: ``first`` ones, then nothing until released."""

    def __init__(self, *first: scoring_pb2.ScoreRequest) -> None:
        self.first = list(first)
        self.release = threading.Event()

    def __iter__(self) -> Iterator[scoring_pb2.ScoreRequest]:
        yield from self.first
        self.release.wait()


def test_health_answers_while_every_worker_holds_an_idle_stream(
    start: Callable[..., Stage],
) -> None:
    stage = start(max_workers=8, maximum_concurrent_rpcs=8)
    idle = [Silent() for _ in range(8)]
    calls = [stage.stub.ScoreStream(iter(s), timeout=60) for s in idle]
    _eventually(lambda: stage.running.api_calls_in_flight == 8)

    for _ in range(3):
        resp = stage.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

    # The ninth API call is refused at once, not queued behind the idle streams.
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stage.stub.Score(_req(GOOD), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - t0 < 5
    _eventually(lambda: stage.requests("Score", "RESOURCE_EXHAUSTED") == 1)

    for call in calls:
        call.cancel()
    for s in idle:
        s.release.set()
    _eventually(lambda: stage.requests("ScoreStream", "CANCELLED") == 8)
    _eventually(lambda: stage.running.api_calls_in_flight == 0)
    assert stage.stub.Score(_req(GOOD), timeout=10).results[0].kept
    assert stage.requests("Check", "OK") == 3


def test_idle_stream_is_ended_and_gives_its_thread_back(start: Callable[..., Stage]) -> None:
    stage = start(max_workers=1, stream_idle_timeout_seconds=0.5)
    quiet = Silent(_req(GOOD))
    responses = stage.stub.ScoreStream(iter(quiet), timeout=30)
    assert next(responses).results[0].sample.id == "x0"
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        next(responses)
    quiet.release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no request" in (err.value.details() or "")
    assert time.monotonic() - t0 < 10
    _eventually(lambda: stage.requests("ScoreStream", "DEADLINE_EXCEEDED") == 1)
    # The only worker thread is free again.
    assert stage.stub.Score(_req(GOOD), timeout=10).results[0].kept


def test_a_signal_the_server_does_not_compute_is_refused_without_loading_a_model(
    start: Callable[..., Stage],
) -> None:
    loads: list[int] = []

    def backend() -> Any:
        loads.append(1)
        raise AssertionError("the model must not load")

    stage = start(backend=backend)
    for signals in (("perplexity",), ("heuristics", "ask_llm")):
        with pytest.raises(grpc.RpcError) as err:
            stage.stub.Score(_req(GOOD, signals=signals), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not computed by this server" in (err.value.details() or "")
    assert not loads
    assert stage.stub.Score(_req(GOOD, signals=("heuristics",)), timeout=10).results[0].kept
    _eventually(lambda: stage.requests("Score", "INVALID_ARGUMENT") == 2)


def _request_of(size: int, n: int) -> scoring_pb2.ScoreRequest:
    """``n`` samples in a request of ``size`` bytes (to within a few)."""
    body = "word " * (size // n // 5)
    req = _req(*[f"{i} {body}" for i in range(n)])
    excess = req.ByteSize() - size
    last = req.samples[-1]
    last.text = last.text[: len(last.text) - excess]
    return req


def test_a_request_whose_response_cannot_fit_is_refused_before_the_work(
    start: Callable[..., Stage],
) -> None:
    limit = 64 * 1024
    stage = start(max_message_bytes=limit)
    req = _request_of(limit - 100, 64)  # the request fits; its samples echoed back do not
    assert req.ByteSize() <= limit
    with pytest.raises(grpc.RpcError) as err:
        stage.stub.Score(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "response would need" in (err.value.details() or "")
    assert stage.samples_in("grpc") == 0  # nothing was scored
    _eventually(lambda: stage.requests("Score", "RESOURCE_EXHAUSTED") == 1)


def test_a_response_over_the_limit_is_counted_as_its_client_sees_it(
    start: Callable[..., Stage],
) -> None:
    limit = 64 * 1024
    stage = start(max_message_bytes=limit)
    n = 64
    # Passes the lower-bound check, but each sample's lineage event is larger than the bound.
    req = _request_of(limit - RESULT_GROWTH_BYTES * n - 3 * n - 64, n)
    with pytest.raises(grpc.RpcError) as err:
        stage.stub.Score(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "exceeds the" in (err.value.details() or "")
    _eventually(lambda: stage.requests("Score", "RESOURCE_EXHAUSTED") == 1)
    assert stage.requests("Score", "OK") == 0


def test_an_oversized_request_is_refused_by_grpc_before_any_handler(
    start: Callable[..., Stage],
) -> None:
    stage = start(max_message_bytes=64 * 1024)
    with pytest.raises(grpc.RpcError) as err:
        stage.stub.Score(_req("word " * 20_000), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stage.samples_in("grpc") == 0


def test_requests_and_samples_are_counted_per_transport(start: Callable[..., Stage]) -> None:
    stage = start()
    resp = stage.stub.Score(_req(GOOD, "buy now $$$ ### click here"), timeout=10)
    assert [r.kept for r in resp.results] == [True, False]
    with pytest.raises(grpc.RpcError):
        stage.stub.Score(_req(""), timeout=10)
    _eventually(lambda: stage.requests("Score", "OK") == 1)
    _eventually(lambda: stage.requests("Score", "INVALID_ARGUMENT") == 1)
    reg = stage.metrics.registry
    assert stage.samples_in("grpc") == 2
    assert stage.samples_in("kafka") == 0
    kept = {"stage": "scoring", "transport": "grpc"}
    assert reg.get_sample_value("sluice_stage_samples_out_total", kept) == 1
    step = {**kept, "step": "heuristics", "outcome": "in"}
    assert reg.get_sample_value("sluice_step_samples_total", step) == 2
    # An unknown method is counted under one bounded label.
    unknown = stage.channel.unary_unary(f"/{SERVICE_NAME}/Nope")
    with pytest.raises(grpc.RpcError) as err:
        unknown(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert stage.requests("unknown", "UNIMPLEMENTED") == 1


def test_client_deadline_is_counted_as_deadline_exceeded(start: Callable[..., Stage]) -> None:
    stage = start(stream_idle_timeout_seconds=30)
    quiet = Silent()
    with pytest.raises(grpc.RpcError) as err:
        list(stage.stub.ScoreStream(iter(quiet), timeout=0.5))
    quiet.release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _eventually(lambda: stage.requests("ScoreStream", "DEADLINE_EXCEEDED") == 1)


def test_sluice_serve_logs_at_info() -> None:
    """``sluice serve`` configured WARNING before the service configured its own level, and
    logging kept the first: no INFO line ever showed."""
    env = {
        **os.environ,
        "SLUICE_SCORING_LOG_LEVEL": "INFO",
        "SLUICE_SCORING_STEPS": '["heuristics"]',
        "SLUICE_SCORING_GRPC__HOST": "127.0.0.1",
        "SLUICE_SCORING_GRPC__PORT": "0",
        "SLUICE_SCORING_METRICS__ENABLED": "false",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "scoring", "serve"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
    reader.start()
    try:
        _eventually(lambda: any("INFO" in ln and "gRPC serving" in ln for ln in lines), 60)
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(10)
    assert proc.returncode == 0, "".join(lines)
