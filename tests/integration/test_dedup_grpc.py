"""The dedup gRPC service on a real server with its state in real Redis: Check asks without
recording, Dedup records and drops, a second replica (another server on the same Redis)
sees the first one's samples, health and reflection, INVALID_ARGUMENT on bad input."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.dedup.grpc_service import SERVICE_NAME
from services.dedup.settings import DedupSettings
from services.gen.sluice.common.v1 import sample_pb2
from services.gen.sluice.dedup.v1 import dedup_pb2, dedup_pb2_grpc
from services.runtime.grpc_server import RunningServer, serve
from services.runtime.metrics import StageMetrics
from services.runtime.registry import stage
from tests.support.servers import Server
from tests.unit.dedup.test_minhash import real_texts

pytestmark = pytest.mark.integration


def start(redis_server: Server, prefix: str) -> tuple[RunningServer, StageMetrics]:
    settings = DedupSettings.model_validate(
        {
            "state": {
                "backend": "redis",
                "redis_url": f"redis://{redis_server.address}/0",
                "key_prefix": prefix,
            },
            "grpc": {"host": "127.0.0.1", "port": 0},
            "max_request_samples": 50,
        }
    )
    spec = stage("dedup")
    metrics = StageMetrics("dedup")
    core = spec.build_core(settings, metrics)
    return serve(settings.grpc, spec.make_register(core, metrics), metrics=metrics), metrics


@pytest.fixture(scope="module")
def replicas(redis_server: Server) -> Iterator[list[tuple[RunningServer, StageMetrics]]]:
    prefix = f"g{uuid.uuid4().hex[:8]}:"
    running = [start(redis_server, prefix), start(redis_server, prefix)]
    yield running
    for server, _ in running:
        server.stop(grace=1)


def stub(server: RunningServer) -> dedup_pb2_grpc.DedupServiceStub:
    return dedup_pb2_grpc.DedupServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))


def msgs(texts: list[str], prefix: str) -> list[sample_pb2.Sample]:
    return [sample_pb2.Sample(id=f"{prefix}{i}", text=t) for i, t in enumerate(texts)]


def test_check_then_dedup_across_replicas(
    replicas: list[tuple[RunningServer, StageMetrics]],
) -> None:
    (one, metrics), (two, _) = replicas
    a, b, c = real_texts(3)
    near_a = a.replace(a.split()[7], "quux", 1)
    check = stub(one).Check(dedup_pb2.CheckRequest(samples=msgs([a, a, near_a], "q")))
    assert [(v.duplicate, v.level, v.duplicate_of) for v in check.verdicts] == [
        (False, "", ""),
        (True, "exact", "q0"),
        (True, "near", "q0"),
    ]
    assert check.model_version.startswith("dedup-exact+near-")
    first = stub(one).Dedup(dedup_pb2.DedupRequest(samples=msgs([a, b], "p")))
    assert [r.kept for r in first.results] == [True, True]
    assert first.results[0].sample.lineage[-1].stage == "dedup"
    # the other replica shares the state: the same texts are duplicates of replica one's
    second = stub(two).Dedup(dedup_pb2.DedupRequest(samples=msgs([near_a, c, b], "r")))
    got = [(r.kept, r.drop_reason, r.verdict.duplicate_of) for r in second.results]
    assert got == [(False, "dedup:near", "p0"), (True, "", ""), (False, "dedup:exact", "p1")]
    assert second.results[0].sample.metadata["dedup_of"] == "p0"
    assert second.results[0].verdict.similarity >= 0.8
    # Check afterwards records nothing new but sees everything recorded
    again = stub(one).Check(dedup_pb2.CheckRequest(samples=msgs([c], "z")))
    assert again.verdicts[0].duplicate_of == "r1"
    dropped = metrics.registry.get_sample_value(
        "sluice_stage_samples_dropped_total",
        {"stage": "dedup", "reason": "dedup:exact", "transport": "grpc"},
    )
    assert dropped is None  # replica one dropped nothing itself


def test_health(replicas: list[tuple[RunningServer, StageMetrics]]) -> None:
    server, _ = replicas[0]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "samples",
    [
        [],
        [sample_pb2.Sample(id="", text="no id")],
        [sample_pb2.Sample(id="x", text="same id"), sample_pb2.Sample(id="x", text="again")],
        [sample_pb2.Sample(id="e", text="   ")],
        [sample_pb2.Sample(id="v", embedding=[1.0, 0.0])],  # semantic is off
        [sample_pb2.Sample(id=f"n{i}", text="many") for i in range(51)],
    ],
    ids=["empty", "no-id", "duplicate-id", "blank", "embedding-only", "too-many"],
)
def test_bad_requests_are_invalid_argument(
    replicas: list[tuple[RunningServer, StageMetrics]], samples: list[sample_pb2.Sample]
) -> None:
    server, _ = replicas[0]
    for call in (
        lambda: stub(server).Check(dedup_pb2.CheckRequest(samples=samples)),
        lambda: stub(server).Dedup(dedup_pb2.DedupRequest(samples=samples)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
