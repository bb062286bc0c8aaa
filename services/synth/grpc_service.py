"""gRPC adapter of the synthesis core: protobuf -> domain -> core -> protobuf."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from services.gen.sluice.synth.v1 import synth_pb2, synth_pb2_grpc
from services.runtime.convert import sample_from_proto, sample_to_proto, validate_samples
from services.runtime.errors import InvalidArgument
from services.runtime.metrics import StageMetrics
from services.runtime.registry import Register, registration
from services.synth.core import SynthCore

SERVICE_NAME = synth_pb2.DESCRIPTOR.services_by_name["SynthService"].full_name


def limits_to_dict(limits: Any) -> dict[str, Any]:
    """The fields a GenerationLimits message sets (unset optional fields are absent)."""
    return {f.name: list(v) if f.name == "stop" else v for f, v in limits.ListFields()}


class SynthServicer(synth_pb2_grpc.SynthServiceServicer):
    def __init__(self, core: SynthCore, metrics: StageMetrics) -> None:
        self.core = core
        self.metrics = metrics

    def _synthesize(self, request: synth_pb2.SynthesizeRequest) -> synth_pb2.SynthesizeResponse:
        if not request.seeds and not request.from_settings_seeds:
            raise InvalidArgument("request has no seeds and asks for no settings seeds")
        limit = self.core.settings.max_request_samples
        if len(request.seeds) > limit:
            raise InvalidArgument(
                f"{len(request.seeds)} seeds in one request, limit {limit}; "
                "use SynthesizeStream for large jobs"
            )
        seeds = [sample_from_proto(m) for m in request.seeds]
        validate_samples(seeds)
        options = self.core.options(
            methods=list(request.methods),
            per_seed=request.per_seed,
            generation=limits_to_dict(request.generation),
            from_settings_seeds=request.from_settings_seeds,
        )
        outcomes = self.core.synthesize(seeds, options)
        self.metrics.observe_outcomes(outcomes, self.core.signals, self.core.steps)
        resp = synth_pb2.SynthesizeResponse(model_version=self.core.model_version)
        for o in outcomes:
            if o.kept or request.include_rejected:
                resp.results.add(
                    sample=sample_to_proto(o.sample), kept=o.kept, drop_reason=o.reason
                )
        return resp

    def Synthesize(
        self, request: synth_pb2.SynthesizeRequest, context: grpc.ServicerContext
    ) -> synth_pb2.SynthesizeResponse:
        return self._synthesize(request)

    def SynthesizeStream(
        self,
        request_iterator: Iterator[synth_pb2.SynthesizeRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[synth_pb2.SynthesizeResponse]:
        for request in request_iterator:
            yield self._synthesize(request)


def register(core: SynthCore, metrics: StageMetrics) -> Register:
    """The stage's servicer, for services.runtime.grpc_server.serve."""
    add = synth_pb2_grpc.add_SynthServiceServicer_to_server
    return registration(add, SynthServicer(core, metrics), SERVICE_NAME)
