"""Protobuf <-> domain conversion: the only place that knows both shapes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from services.gen.sluice.common.v1 import sample_pb2
from services.runtime.domain import Action, LineageEvent, Sample
from services.runtime.errors import InvalidArgument, TooLarge

RESULT_GROWTH_BYTES = 16
"""The least a result adds to the sample it returns: its framing and one lineage event
(stage, action, timestamp). A lower bound, so ``check_response_room`` never refuses a
request that could have been answered."""


def sample_from_proto(msg: sample_pb2.Sample) -> Sample:
    return Sample(
        id=msg.id,
        text=msg.text,
        prompt=msg.prompt,
        response=msg.response,
        source=msg.source,
        metadata=dict(msg.metadata),
        scores=dict(msg.scores),
        lineage=[
            LineageEvent(
                stage=e.stage,
                action=Action(e.action) if e.action in Action._value2member_map_ else Action.KEPT,
                reason=e.reason,
                model_version=e.model_version,
                timestamp_ms=e.timestamp_ms,
                parent_id=e.parent_id,
            )
            for e in msg.lineage
        ],
        embedding=list(msg.embedding) or None,
    )


def sample_to_proto(sample: Sample) -> sample_pb2.Sample:
    msg = sample_pb2.Sample(
        id=sample.id,
        text=sample.text,
        prompt=sample.prompt,
        response=sample.response,
        source=sample.source,
    )
    msg.metadata.update(sample.metadata)
    msg.scores.update(sample.scores)
    if sample.embedding:
        msg.embedding.extend(sample.embedding)
    for e in sample.lineage:
        msg.lineage.add(
            stage=e.stage,
            action=int(e.action),  # type: ignore[arg-type]
            reason=e.reason,
            model_version=e.model_version,
            timestamp_ms=e.timestamp_ms,
            parent_id=e.parent_id,
        )
    return msg


def validate_samples(samples: Iterable[Sample]) -> None:
    """Reject what no stage can process: missing ids, duplicate ids, no content (a sample
    carrying only a precomputed embedding is content for the stages that read it)."""
    seen: set[str] = set()
    for i, s in enumerate(samples):
        if not s.id:
            raise InvalidArgument(f"sample #{i} has no id")
        if s.id in seen:
            raise InvalidArgument(f"duplicate sample id {s.id!r} in one batch")
        seen.add(s.id)
        if not s.content.strip() and not s.embedding:
            raise InvalidArgument(
                f"sample {s.id!r} has no text (nor prompt/response, nor an embedding)"
            )


def check_response_room(samples: Sequence[sample_pb2.Sample], limit: int) -> None:
    """Refuse, before any work, a request whose samples cannot come back in one response:
    each returns with at least ``RESULT_GROWTH_BYTES`` more, and a response over ``limit``
    (the server's message limit) would be refused only after the work was done."""
    need = sum(m.ByteSize() for m in samples) + RESULT_GROWTH_BYTES * len(samples)
    if need > limit:
        raise TooLarge(
            f"the response would need at least {need} bytes for these {len(samples)} samples, "
            f"over the {limit}-byte message limit; send fewer samples per request"
        )
