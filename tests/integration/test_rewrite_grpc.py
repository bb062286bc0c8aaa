"""The rewriting gRPC service on a real server: rewrites keep ids and link the original
in lineage, toxic samples are dropped with the reason, per-request limits apply, bad
requests get INVALID_ARGUMENT, a stream answers in order."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from services.gen.sluice.common.v1 import sample_pb2
from services.gen.sluice.rewrite.v1 import rewrite_pb2, rewrite_pb2_grpc
from services.rewrite.core import RewriteCore
from services.rewrite.grpc_service import SERVICE_NAME, register
from services.rewrite.settings import RewriteSettings
from services.runtime.grpc_server import RunningServer, serve
from services.runtime.metrics import StageMetrics
from services.runtime.settings import GrpcSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FACT = (
    "The train from Leeds was delayed by two hours on Monday because of heavy snow on the "
    "tracks near York."
)
TOXIC = "Shut up, you absolute bastard, nobody asked you."


@pytest.fixture(scope="module")
def metrics() -> StageMetrics:
    return StageMetrics("rewrite")


@pytest.fixture(scope="module")
def server(torch_backend, metrics: StageMetrics) -> Iterator[RunningServer]:  # type: ignore[no-untyped-def]
    settings = RewriteSettings()
    settings.generation.max_new_tokens = 16
    settings.toxicity.judge = False
    settings.drift.similarity = False  # the embedder is covered by the unit tests
    settings.drift.reject_truncated = False
    core = RewriteCore(settings, backend=torch_backend, metrics=metrics)
    running = serve(
        GrpcSettings(host="127.0.0.1", port=0, max_message_bytes=1 << 20),
        register(core, metrics),
        metrics=metrics,
    )
    yield running
    running.stop(grace=1)


@pytest.fixture
def stub(server: RunningServer) -> Iterator[rewrite_pb2_grpc.RewriteServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield rewrite_pb2_grpc.RewriteServiceStub(ch)


def _req(*texts: str, **kw) -> rewrite_pb2.RewriteRequest:  # type: ignore[no-untyped-def]
    samples = [sample_pb2.Sample(id=f"x{i}", text=t) for i, t in enumerate(texts)]
    return rewrite_pb2.RewriteRequest(samples=samples, **kw)


def test_rewrite_links_lineage_and_drops_toxic(
    stub: rewrite_pb2_grpc.RewriteServiceStub, metrics: StageMetrics
) -> None:
    request = _req(FACT, TOXIC, preset="paraphrase")
    resp = stub.Rewrite(request, timeout=300)
    assert SERVICE_NAME == "sluice.rewrite.v1.RewriteService"
    assert [r.sample.id for r in resp.results] == ["x0", "x1"] and resp.model_version
    fact, toxic = resp.results
    event = fact.sample.lineage[-1]
    assert fact.kept and event.stage == "rewrite" and event.model_version == resp.model_version
    if fact.changed:
        assert event.action == sample_pb2.ACTION_CHANGED and event.parent_id == "x0"
        assert fact.sample.metadata["original_text"] == FACT and fact.sample.text != FACT
        assert not fact.reject_reason
    else:
        assert event.action == sample_pb2.ACTION_KEPT and fact.sample.text == FACT
        assert fact.reject_reason == event.reason and event.reason.startswith("rewrite:")
    assert not toxic.kept and toxic.drop_reason == "toxicity:lexical"
    assert toxic.sample.lineage[-1].action == sample_pb2.ACTION_DROPPED
    assert metrics.registry.get_sample_value(
        "sluice_stage_samples_dropped_total",
        {"stage": "rewrite", "reason": "toxicity:lexical", "transport": "grpc"},
    )
    assert (
        metrics.registry.get_sample_value(
            "sluice_stage_generated_tokens_total", {"stage": "rewrite"}
        )
        or 0
    ) > 0


def test_per_request_limits_apply(stub: rewrite_pb2_grpc.RewriteServiceStub) -> None:
    limits = rewrite_pb2.GenerationLimits(max_new_tokens=2)
    resp = stub.Rewrite(_req(FACT, preset="simplify", generation=limits), timeout=120)
    (result,) = resp.results
    assert result.kept and not result.changed and result.reject_reason == "rewrite:too_short"
    assert result.sample.text == FACT


@pytest.mark.parametrize(
    "request_",
    [
        rewrite_pb2.RewriteRequest(),
        rewrite_pb2.RewriteRequest(samples=[sample_pb2.Sample(id="", text="no id")]),
        rewrite_pb2.RewriteRequest(
            samples=[sample_pb2.Sample(id="a", text="x"), sample_pb2.Sample(id="a", text="y")]
        ),
        _req(FACT, preset="poetry"),
        _req(FACT, toxicity_policy="ignore"),
        _req(FACT, generation=rewrite_pb2.GenerationLimits(max_new_tokens=17)),
        _req(FACT, generation=rewrite_pb2.GenerationLimits(temperature=-1.0)),
        _req(FACT, generation=rewrite_pb2.GenerationLimits(stop=[""])),
    ],
    ids=[
        "empty",
        "no-id",
        "duplicate-id",
        "unknown-preset",
        "unknown-policy",
        "over-token-cap",
        "negative-temperature",
        "empty-stop",
    ],
)
def test_bad_requests_are_invalid_argument(
    stub: rewrite_pb2_grpc.RewriteServiceStub, request_: rewrite_pb2.RewriteRequest
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Rewrite(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details()


def test_stream_answers_each_request_in_order(stub: rewrite_pb2_grpc.RewriteServiceStub) -> None:
    # preset 'none': toxicity control only, no generation
    reqs = [_req(FACT, TOXIC, preset="none"), _req(TOXIC, FACT, preset="none")]
    resps = list(stub.RewriteStream(iter(reqs), timeout=60))
    assert [[r.kept for r in resp.results] for resp in resps] == [[True, False], [False, True]]
    assert all(not r.changed for resp in resps for r in resp.results)
