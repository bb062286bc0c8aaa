"""gRPC adapter of the density core: protobuf -> domain -> core -> protobuf."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from services.density.core import CalibrationSource, DensityCore
from services.density.state import SketchState
from services.gen.sluice.common.v1 import sample_pb2
from services.gen.sluice.density.v1 import density_pb2, density_pb2_grpc
from services.runtime.convert import sample_from_proto, validate_samples
from services.runtime.domain import Sample
from services.runtime.errors import InvalidArgument
from services.runtime.metrics import StageMetrics
from services.runtime.registry import Register, registration

SERVICE_NAME = density_pb2.DESCRIPTOR.services_by_name["DensityService"].full_name

_CALIBRATION: dict[int, CalibrationSource | None] = {
    density_pb2.CALIBRATION_UNSPECIFIED: None,
    density_pb2.CALIBRATION_SKETCH: "sketch",
    density_pb2.CALIBRATION_REQUEST: "request",
}
_CALIBRATION_PB = {
    "sketch": density_pb2.CALIBRATION_SKETCH,
    "request": density_pb2.CALIBRATION_REQUEST,
}


def _samples(msgs: Sequence[sample_pb2.Sample]) -> list[Sample]:
    if not msgs:
        raise InvalidArgument("request has no samples")
    samples = [sample_from_proto(m) for m in msgs]
    validate_samples(samples)
    return samples


def _params(state: SketchState) -> density_pb2.SketchParams:
    p = state.sketch.params
    return density_pb2.SketchParams(
        dim=p.dim,
        rows=p.rows,
        hashes_per_row=p.hashes_per_row,
        buckets=p.buckets,
        width=p.width,
        seed=p.seed,
        hash=p.hash,
    )


class DensityServicer(density_pb2_grpc.DensityServiceServicer):
    def __init__(self, core: DensityCore, metrics: StageMetrics) -> None:
        self.core = core
        self.metrics = metrics

    def Embed(
        self, request: density_pb2.EmbedRequest, context: grpc.ServicerContext
    ) -> density_pb2.EmbedResponse:
        limit = self.core.settings.max_request_samples
        if len(request.texts) > limit:
            raise InvalidArgument(f"{len(request.texts)} texts in one request, limit {limit}")
        vecs = self.core.embed_texts(list(request.texts))
        resp = density_pb2.EmbedResponse(
            dim=int(vecs.shape[1]), model_version=self.core.embedder.model_version
        )
        for row in vecs:
            resp.embeddings.add().values.extend(row.tolist())
        return resp

    def AddToSketch(
        self, request: density_pb2.AddToSketchRequest, context: grpc.ServicerContext
    ) -> density_pb2.AddToSketchResponse:
        samples = _samples(request.samples)
        state = self.core.add(request.sketch, samples)
        return density_pb2.AddToSketchResponse(
            n=state.n, added=len(samples), fingerprint=state.fingerprint
        )

    def GetSketch(
        self, request: density_pb2.GetSketchRequest, context: grpc.ServicerContext
    ) -> density_pb2.GetSketchResponse:
        state = self.core.state(request.sketch)
        with state.lock:
            data = state.sketch.to_bytes()
            n = state.n
        return density_pb2.GetSketchResponse(
            data=data, params=_params(state), fingerprint=state.fingerprint, n=n
        )

    def MergeSketch(
        self, request: density_pb2.MergeSketchRequest, context: grpc.ServicerContext
    ) -> density_pb2.MergeSketchResponse:
        if not request.data:
            raise InvalidArgument("request has no sketch data")
        state = self.core.merge_bytes(request.sketch, request.data)
        return density_pb2.MergeSketchResponse(n=state.n, fingerprint=state.fingerprint)

    def Score(
        self, request: density_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> density_pb2.ScoreResponse:
        samples = _samples(request.samples)
        dens, state = self.core.score(request.sketch, samples)
        resp = density_pb2.ScoreResponse(n=state.n, fingerprint=state.fingerprint)
        for s, d in zip(samples, dens, strict=True):
            resp.results.add(id=s.id, density=float(d))
        return resp

    def Sample(
        self, request: density_pb2.SampleRequest, context: grpc.ServicerContext
    ) -> density_pb2.SampleResponse:
        samples = _samples(request.samples)
        if request.calibration not in _CALIBRATION:
            raise InvalidArgument(f"unknown calibration {request.calibration}")
        if request.target_rate < 0 or request.target_rate > 1:
            raise InvalidArgument(f"target_rate must be in (0, 1], got {request.target_rate}")
        d = self.core.sample(
            request.sketch,
            samples,
            target_rate=request.target_rate or None,
            calibration=_CALIBRATION[request.calibration],
            seed=request.seed if request.HasField("seed") else None,
        )
        resp = density_pb2.SampleResponse(
            c=d.c, calibration=_CALIBRATION_PB[d.calibration], n=d.n, fingerprint=d.fingerprint
        )
        weights = d.weights
        for i, s in enumerate(samples):
            resp.results.add(
                id=s.id,
                density=float(d.density[i]),
                keep_probability=float(d.probability[i]),
                kept=bool(d.kept[i]),
                importance_weight=float(weights[i]),
            )
        return resp


def register(core: DensityCore, metrics: StageMetrics) -> Register:
    """The stage's servicer, for services.runtime.grpc_server.serve."""
    add = density_pb2_grpc.add_DensityServiceServicer_to_server
    return registration(add, DensityServicer(core, metrics), SERVICE_NAME)
