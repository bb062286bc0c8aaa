"""The scoring gRPC service on a real server: a client that knows nothing but
reflection calls Score; bad requests get INVALID_ARGUMENT; health reports
SERVING and then NOT_SERVING on graceful stop."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from services.gen.sluice.common.v1 import sample_pb2
from services.gen.sluice.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from services.runtime.grpc_server import RunningServer, serve
from services.runtime.metrics import StageMetrics
from services.runtime.settings import GrpcSettings
from services.scoring.core import ScoringCore
from services.scoring.grpc_service import SERVICE_NAME, register
from services.scoring.settings import ScoringSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOOD = (
    "The central bank raised interest rates by a quarter of a percentage point on Tuesday, "
    "citing persistent inflation in services and a tight labour market across the country. "
    "Officials said the decision was unanimous and that further increases remain possible if "
    "wage growth does not slow in the coming months. Economists had expected the move, and "
    "markets reacted calmly, with the currency little changed against the dollar by the close."
)
JUNK = "click here click here $$$ ### ### buy now"


@pytest.fixture(scope="module")
def server(torch_backend) -> Iterator[RunningServer]:  # type: ignore[no-untyped-def]
    settings = ScoringSettings()
    settings.model.max_tokens = 64
    core = ScoringCore(settings, backend=torch_backend)
    metrics = StageMetrics("scoring")
    running = serve(
        GrpcSettings(host="127.0.0.1", port=0, max_message_bytes=1 << 20),
        register(core, metrics),
        metrics=metrics,
    )
    yield running
    running.stop(grace=1)


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def test_reflection_only_client_can_call_score(channel: grpc.Channel) -> None:
    # Discover everything through the reflection service: no generated code used.
    db = ProtoReflectionDescriptorDatabase(channel)
    assert SERVICE_NAME in db.get_services()
    pool = descriptor_pool.DescriptorPool(db)
    svc = pool.FindServiceByName(SERVICE_NAME)
    method = svc.methods_by_name["Score"]
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    request = req_cls()
    for i, text in enumerate((GOOD, JUNK)):
        s = request.samples.add()
        s.id, s.text = f"r{i}", text
    request.signals.extend(["heuristics", "ask_llm"])
    request.apply_policy = True
    call = channel.unary_unary(
        f"/{SERVICE_NAME}/Score",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=resp_cls.FromString,
    )
    resp = call(request, timeout=120)
    assert [r.sample.id for r in resp.results] == ["r0", "r1"]
    good, junk = resp.results
    assert good.kept and 0.0 <= good.sample.scores["ask_llm"] <= 1.0
    assert not junk.kept and junk.drop_reason.startswith("heuristics:")
    assert "ask_llm" not in junk.sample.scores  # junk never reached the model
    assert resp.model_version


def _stub(channel: grpc.Channel) -> scoring_pb2_grpc.ScoringServiceStub:
    return scoring_pb2_grpc.ScoringServiceStub(channel)


def _req(*texts: str, signals: tuple[str, ...] = ("ask_llm",)) -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(
        samples=[sample_pb2.Sample(id=f"x{i}", text=t) for i, t in enumerate(texts)],
        signals=list(signals),
    )


@pytest.mark.parametrize(
    "request_",
    [
        scoring_pb2.ScoreRequest(),
        scoring_pb2.ScoreRequest(samples=[sample_pb2.Sample(id="", text="no id")]),
        scoring_pb2.ScoreRequest(samples=[sample_pb2.Sample(id="a", text="   ")]),
        scoring_pb2.ScoreRequest(
            samples=[sample_pb2.Sample(id="a", text="x"), sample_pb2.Sample(id="a", text="y")]
        ),
        _req(GOOD, signals=("ask_llm", "vibes")),
    ],
    ids=["empty", "no-id", "no-text", "duplicate-id", "unknown-signal"],
)
def test_bad_requests_are_invalid_argument(
    channel: grpc.Channel, request_: scoring_pb2.ScoreRequest
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _stub(channel).Score(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details()


def test_oversized_request_is_refused(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _stub(channel).Score(_req("word " * 300_000), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stream_answers_each_request_in_order(channel: grpc.Channel) -> None:
    reqs = [_req(GOOD, f"{GOOD} Number {i}.", signals=("perplexity",)) for i in range(3)]
    resps = list(_stub(channel).ScoreStream(iter(reqs), timeout=120))
    assert len(resps) == 3
    for r in resps:
        assert [x.sample.id for x in r.results] == ["x0", "x1"]
        assert all(x.sample.scores["perplexity"] > 1.0 for x in r.results)


def test_health_serving_then_not_serving_on_stop(torch_backend) -> None:  # type: ignore[no-untyped-def]
    core = ScoringCore(ScoringSettings(steps=["heuristics"]))
    running = serve(GrpcSettings(host="127.0.0.1", port=0), register(core, StageMetrics("s")))
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        running.health.enter_graceful_shutdown()
        resp = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    running.stop(grace=0.5)
