"""The distillation gRPC service on a real server, with the real teacher and real S3
(moto): Distill returns teacher pairs whose top-k payloads load back from the sample or
the bucket; per-request generation options apply; bad requests get INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.distill.codec import TOPK_KEY, TOPK_URI_KEY, load_topk
from services.distill.core import DistillCore
from services.distill.grpc_service import SERVICE_NAME, register
from services.distill.settings import DistillSettings
from services.distill.store import S3ObjectStore, parse_uri
from services.gen.sluice.common.v1 import sample_pb2
from services.gen.sluice.distill.v1 import distill_pb2, distill_pb2_grpc
from services.runtime.backends.torch_backend import TorchBackend
from services.runtime.convert import sample_from_proto
from services.runtime.grpc_server import RunningServer, serve
from services.runtime.metrics import StageMetrics
from services.runtime.settings import GrpcSettings
from tests.integration.kafka_util import unique
from tests.support.servers import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTIONS = ["What is the capital of France?", "Name three colours."]
INLINE_MAX = 200  # bytes: payloads of the 8-token default go inline, longer ones to S3


def s3_settings(s3_server: Server, bucket: str) -> dict[str, object]:
    return {
        "endpoint": s3_server.address,
        "bucket": bucket,
        "access_key": "test",
        "secret_key": "test",
        "secure": False,
    }


@pytest.fixture(scope="module")
def store(s3_server: Server) -> S3ObjectStore:
    bucket = unique("distill")
    settings = DistillSettings.model_validate(
        {"topk_store": {"s3": s3_settings(s3_server, bucket)}}
    )
    store = S3ObjectStore(settings.topk_store.s3)
    store.client.make_bucket(bucket)
    return store


@pytest.fixture(scope="module")
def server(torch_backend: TorchBackend, store: S3ObjectStore) -> Iterator[RunningServer]:
    settings = DistillSettings.model_validate(
        {
            "generation": {"max_new_tokens": 4, "top_logprobs": 4},
            "max_new_tokens_limit": 32,
            "topk_store": {"inline_max_bytes": INLINE_MAX, "s3": store.settings.model_dump()},
        }
    )
    core = DistillCore(settings, backend=torch_backend, store=store)
    metrics = StageMetrics("distill")
    running = serve(
        GrpcSettings(host="127.0.0.1", port=0, max_message_bytes=1 << 20),
        register(core, metrics),
        metrics=metrics,
    )
    yield running
    running.stop(grace=1)


@pytest.fixture
def stub(server: RunningServer) -> Iterator[distill_pb2_grpc.DistillServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield distill_pb2_grpc.DistillServiceStub(ch)


def _req(**options: object) -> distill_pb2.DistillRequest:
    return distill_pb2.DistillRequest(
        samples=[sample_pb2.Sample(id=f"q{i}", prompt=q) for i, q in enumerate(QUESTIONS)],
        generation=distill_pb2.GenerationOptions(**options),  # type: ignore[arg-type]
    )


def test_distill_returns_teacher_pairs_with_inline_top_k(
    stub: distill_pb2_grpc.DistillServiceStub,
) -> None:
    resp = stub.Distill(_req(), timeout=120)
    assert [r.sample.id for r in resp.results] == ["q0", "q1"]
    assert resp.model_version
    for r in resp.results:
        s = sample_from_proto(r.sample)
        assert r.kept and s.response and s.lineage[-1].stage == "distill"
        assert s.lineage[-1].model_version == resp.model_version
        assert TOPK_KEY in s.metadata and TOPK_URI_KEY not in s.metadata
        topk = load_topk(s)
        assert topk.k == 4 and 1 <= len(topk.tokens) <= 4
        assert int(s.metadata["distill.response_tokens"]) == len(topk.tokens)


def test_large_payloads_go_to_s3_and_load_back(
    stub: distill_pb2_grpc.DistillServiceStub, store: S3ObjectStore
) -> None:
    resp = stub.Distill(_req(max_new_tokens=24, top_k=16), timeout=120)
    long = [sample_from_proto(r.sample) for r in resp.results]
    long = [s for s in long if int(s.metadata["distill.response_tokens"]) > 8]
    assert long, "expected at least one response long enough for S3"
    for s in long:
        uri = s.metadata[TOPK_URI_KEY]
        assert TOPK_KEY not in s.metadata and uri.startswith(f"s3://{store.settings.bucket}/")
        bucket, key = parse_uri(uri)
        assert store.client.stat_object(bucket, key).size > INLINE_MAX
        topk = load_topk(s, store)
        assert topk.k == 16 and len(topk.tokens) == int(s.metadata["distill.response_tokens"])


def test_stop_strings_and_seed_apply_per_request(
    stub: distill_pb2_grpc.DistillServiceStub,
) -> None:
    first = stub.Distill(_req(max_new_tokens=16), timeout=120).results[0].sample.response
    word = first.split()[2]
    stopped = stub.Distill(
        _req(max_new_tokens=16, stop=distill_pb2.StopStrings(values=[word])), timeout=120
    )
    assert stopped.results[0].sample.response == first[: first.index(word)]
    sampled = [
        [
            r.sample.response
            for r in stub.Distill(_req(temperature=1.0, seed=7), timeout=120).results
        ]
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize(
    "request_",
    [
        distill_pb2.DistillRequest(),
        distill_pb2.DistillRequest(samples=[sample_pb2.Sample(id="a", response="orphan")]),
        distill_pb2.DistillRequest(
            samples=[sample_pb2.Sample(id="a", prompt="x"), sample_pb2.Sample(id="a", text="y")]
        ),
        _req(max_new_tokens=33),
        _req(top_k=0),
        _req(top_p=0.0),
        _req(stop=distill_pb2.StopStrings(values=[""])),
    ],
    ids=["empty", "no-prompt", "duplicate-id", "over-limit", "top-k-0", "top-p-0", "empty-stop"],
)
def test_bad_requests_are_invalid_argument(
    stub: distill_pb2_grpc.DistillServiceStub, request_: distill_pb2.DistillRequest
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Distill(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details()


def test_stream_answers_each_request_in_order(stub: distill_pb2_grpc.DistillServiceStub) -> None:
    reqs = [_req(max_new_tokens=2) for _ in range(3)]
    resps = list(stub.DistillStream(iter(reqs), timeout=120))
    assert len(resps) == 3
    for r in resps:
        assert [x.sample.id for x in r.results] == ["q0", "q1"]


def test_health_reports_serving(server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        resp = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
