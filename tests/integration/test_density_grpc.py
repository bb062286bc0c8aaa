"""The density gRPC service on a real server with the real packaged embedding model:
Embed, AddToSketch, Score, Sample, GetSketch/MergeSketch, and the status codes of bad
requests (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.density.core import DensityCore
from services.density.grpc_service import SERVICE_NAME, register
from services.density.settings import DensitySettings
from services.density.sketch import RaceSketch, SketchParams
from services.gen.sluice.common.v1 import sample_pb2
from services.gen.sluice.density.v1 import density_pb2, density_pb2_grpc
from services.runtime.backends.embeddings import EmbeddingSettings, SentenceTransformerEmbedder
from services.runtime.grpc_server import RunningServer, serve
from services.runtime.metrics import StageMetrics
from services.runtime.settings import GrpcSettings
from tests.unit.density.mixture import mixture

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    embedder = SentenceTransformerEmbedder(EmbeddingSettings())
    core = DensityCore(DensitySettings(target_rate=0.4), embedder=embedder)
    metrics = StageMetrics("density")
    running = serve(
        GrpcSettings(host="127.0.0.1", port=0, max_message_bytes=16 << 20),
        register(core, metrics),
        metrics=metrics,
    )
    yield running
    running.stop(grace=1)


@pytest.fixture
def stub(server: RunningServer) -> Iterator[density_pb2_grpc.DensityServiceStub]:
    with grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_receive_message_length", 16 << 20)]
    ) as ch:
        yield density_pb2_grpc.DensityServiceStub(ch)


def _vec_samples(prefix: str, seed: int = 3) -> list[sample_pb2.Sample]:
    data = mixture(seed=seed, big=400, small=(40, 40))
    return [
        sample_pb2.Sample(id=f"{prefix}{i}", embedding=row.tolist())
        for i, row in enumerate(data.vectors)
    ]


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    return err.value.code()  # type: ignore[no-any-return]


def test_health_reports_the_service(server: RunningServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_embed(stub: density_pb2_grpc.DensityServiceStub) -> None:
    resp = stub.Embed(
        density_pb2.EmbedRequest(
            texts=["A dog runs in the park.", "A puppy is running on the grass.", "Tax law."]
        )
    )
    assert resp.dim == 384 and resp.model_version == "all-minilm-l6-v2@fp32"
    vecs = np.array([list(e.values) for e in resp.embeddings])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]


def test_sketch_score_sample_round_trip(stub: density_pb2_grpc.DensityServiceStub) -> None:
    samples = _vec_samples("a")
    text = sample_pb2.Sample(id="text-1", text="An unusual sentence about glaciers and bees.")
    added = stub.AddToSketch(density_pb2.AddToSketchRequest(sketch="rt", samples=[*samples, text]))
    assert added.n == len(samples) + 1 and added.added == len(samples) + 1

    scored = stub.Score(density_pb2.ScoreRequest(sketch="rt", samples=samples[:50]))
    assert [r.id for r in scored.results] == [s.id for s in samples[:50]]
    assert all(0 < r.density <= 1 for r in scored.results)
    assert scored.n == added.n and scored.fingerprint == added.fingerprint

    resp = stub.Sample(density_pb2.SampleRequest(sketch="rt", samples=samples, target_rate=0.25))
    assert resp.calibration == density_pb2.CALIBRATION_SKETCH and resp.c > 0
    kept = [r for r in resp.results if r.kept]
    assert abs(len(kept) / len(samples) - 0.25) < 0.1
    assert all(r.importance_weight == pytest.approx(1 / r.keep_probability) for r in kept)
    assert all(r.importance_weight == 0 for r in resp.results if not r.kept)
    again = stub.Sample(density_pb2.SampleRequest(sketch="rt", samples=samples, target_rate=0.25))
    assert [r.kept for r in again.results] == [r.kept for r in resp.results]
    reseeded = stub.Sample(
        density_pb2.SampleRequest(sketch="rt", samples=samples, target_rate=0.25, seed=5)
    )
    assert [r.kept for r in reseeded.results] != [r.kept for r in resp.results]

    by_request = stub.Sample(
        density_pb2.SampleRequest(
            sketch="rt",
            samples=samples[:100],
            target_rate=0.5,
            calibration=density_pb2.CALIBRATION_REQUEST,
        )
    )
    probs = [r.keep_probability for r in by_request.results]
    assert np.mean(probs) == pytest.approx(0.5, abs=1e-6)

    got = stub.GetSketch(density_pb2.GetSketchRequest(sketch="rt"))
    sketch = RaceSketch.from_bytes(got.data)
    assert sketch.n == got.n == added.n and got.fingerprint == sketch.fingerprint
    assert got.params.dim == 384 and got.params.rows == sketch.params.rows
    merged = stub.MergeSketch(density_pb2.MergeSketchRequest(sketch="copy", data=got.data))
    assert merged.n == added.n
    twice = stub.MergeSketch(density_pb2.MergeSketchRequest(sketch="copy", data=got.data))
    assert twice.n == 2 * added.n


def test_bad_requests_get_precise_status_codes(stub: density_pb2_grpc.DensityServiceStub) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    good = _vec_samples("b")[:5]
    stub.AddToSketch(density_pb2.AddToSketchRequest(sketch="errs", samples=good))
    short = sample_pb2.Sample(id="short", embedding=[0.1, 0.2, 0.3])
    assert (
        _code(lambda: stub.Score(density_pb2.ScoreRequest(sketch="errs", samples=[short])))
        == invalid
    )
    assert _code(lambda: stub.Score(density_pb2.ScoreRequest(sketch="errs"))) == invalid
    assert _code(lambda: stub.Embed(density_pb2.EmbedRequest())) == invalid
    assert _code(lambda: stub.Embed(density_pb2.EmbedRequest(texts=["ok", " "]))) == invalid
    dup = [good[0], good[0]]
    assert _code(lambda: stub.AddToSketch(density_pb2.AddToSketchRequest(samples=dup))) == invalid
    assert (
        _code(
            lambda: stub.Sample(
                density_pb2.SampleRequest(sketch="errs", samples=good, target_rate=2)
            )
        )
        == invalid
    )
    assert (
        _code(lambda: stub.Score(density_pb2.ScoreRequest(sketch="nope", samples=good)))
        == grpc.StatusCode.NOT_FOUND
    )
    assert _code(lambda: stub.GetSketch(density_pb2.GetSketchRequest(sketch="bad/name"))) == invalid
    foreign = RaceSketch(SketchParams(dim=384, seed=123)).to_bytes()
    assert (
        _code(lambda: stub.MergeSketch(density_pb2.MergeSketchRequest(sketch="errs", data=foreign)))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        _code(lambda: stub.MergeSketch(density_pb2.MergeSketchRequest(sketch="errs", data=b"xx")))
        == invalid
    )
