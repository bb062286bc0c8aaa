"""The synthesis gRPC service on a real server: generated samples carry new ids, the
method and a CREATED lineage event naming their seed; rejected ones come back only when
asked; bad requests get INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from services.gen.sluice.common.v1 import sample_pb2
from services.gen.sluice.synth.v1 import synth_pb2, synth_pb2_grpc
from services.runtime.grpc_server import RunningServer, serve
from services.runtime.metrics import StageMetrics
from services.runtime.settings import GrpcSettings
from services.synth.core import SynthCore
from services.synth.grpc_service import register
from services.synth.settings import SynthSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOC = (
    "The town council voted on Tuesday to build a new footbridge over the river, which "
    "will open next spring and cost four million pounds."
)


@pytest.fixture(scope="module")
def server(torch_backend) -> Iterator[RunningServer]:  # type: ignore[no-untyped-def]
    settings = SynthSettings()
    settings.generation.max_new_tokens = 16
    settings.reject_truncated = False
    settings.near_dup.enabled = False  # the embedder is covered by the unit tests
    metrics = StageMetrics("synth")
    core = SynthCore(settings, backend=torch_backend, metrics=metrics)
    running = serve(
        GrpcSettings(host="127.0.0.1", port=0, max_message_bytes=1 << 20),
        register(core, metrics),
        metrics=metrics,
    )
    yield running
    running.stop(grace=1)


@pytest.fixture
def stub(server: RunningServer) -> Iterator[synth_pb2_grpc.SynthServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield synth_pb2_grpc.SynthServiceStub(ch)


def test_grounded_qa_from_a_seed_document(stub: synth_pb2_grpc.SynthServiceStub) -> None:
    request = synth_pb2.SynthesizeRequest(
        seeds=[sample_pb2.Sample(id="doc-7", text=DOC, source="council")],
        methods=["grounded_qa"],
        per_seed=2,
        generation=synth_pb2.GenerationLimits(temperature=0.8, seed=11),
        include_rejected=True,
    )
    resp = stub.Synthesize(request, timeout=300)
    assert len(resp.results) == 2 and resp.model_version
    ids = {r.sample.id for r in resp.results}
    assert len(ids) == 2 and "doc-7" not in ids
    for r in resp.results:
        created = r.sample.lineage[0]
        assert created.action == sample_pb2.ACTION_CREATED and created.parent_id == "doc-7"
        assert r.sample.metadata["method"] == "grounded_qa" and r.sample.source == "council"
        if r.kept:
            assert r.sample.prompt and r.sample.response and not r.drop_reason
        else:
            assert r.drop_reason.startswith("filter:")
            assert r.sample.lineage[-1].action == sample_pb2.ACTION_DROPPED


@pytest.mark.parametrize(
    "request_",
    [
        synth_pb2.SynthesizeRequest(),
        synth_pb2.SynthesizeRequest(seeds=[sample_pb2.Sample(id="", text=DOC)]),
        synth_pb2.SynthesizeRequest(
            seeds=[sample_pb2.Sample(id="a", text=DOC), sample_pb2.Sample(id="a", text=DOC)]
        ),
        synth_pb2.SynthesizeRequest(
            seeds=[sample_pb2.Sample(id="a", text=DOC)], methods=["distill"]
        ),
        synth_pb2.SynthesizeRequest(seeds=[sample_pb2.Sample(id="a", text=DOC)], per_seed=65),
        synth_pb2.SynthesizeRequest(
            seeds=[sample_pb2.Sample(id="a", text=DOC)],
            generation=synth_pb2.GenerationLimits(max_new_tokens=17),
        ),
    ],
    ids=["empty", "no-id", "duplicate-id", "unknown-method", "per-seed", "over-token-cap"],
)
def test_bad_requests_are_invalid_argument(
    stub: synth_pb2_grpc.SynthServiceStub, request_: synth_pb2.SynthesizeRequest
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Synthesize(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details()
