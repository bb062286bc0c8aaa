"""Typed settings of the sink service (env prefix ``SLUICE_SINK_``).

Nested blocks use ``__``: ``SLUICE_SINK_STORE__ENDPOINT=minio:9000``,
``SLUICE_SINK_ROLL__MAX_BYTES=268435456``, ``SLUICE_SINK_PARTITION_BY=date``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.runtime.objectstore import ObjectStoreSettings
from services.runtime.settings import MiB, StrictModel
from services.runtime.stage import StageSettings


class SinkStoreSettings(ObjectStoreSettings):
    """Where shards and manifests go when ``endpoint`` is set (services.runtime.objectstore);
    only the defaults are the sink's."""

    bucket: str = Field("sluice-corpus", description="Bucket of the curated corpus.")
    prefix: str = Field("corpus", description="Key prefix: the dataset's root inside the bucket.")


class RollSettings(StrictModel):
    """When the open shards are written and committed (whichever comes first). One commit
    writes one file per partition value and one manifest covering every input offset read
    since the previous commit."""

    max_bytes: int = Field(
        128 * MiB,
        ge=1024,
        description="Commit once the rows held in memory reach this many bytes of text "
        "(roughly the size of the uncompressed shards).",
    )
    max_seconds: float = Field(
        300.0,
        gt=0,
        description="Commit at least this often while input arrives, so a slow stream still "
        "becomes readable; also how much a kill -9 makes the restarted sink re-read.",
    )


class SinkSettings(StageSettings):
    """Everything the sink service reads."""

    kind = "sink"
    dropped_topic: str = Field(
        "none", description="The sink drops nothing and has no output: no dropped topic."
    )
    directory: str = Field(
        "",
        description="Local directory (or mounted volume) that is the dataset's root; used "
        "when store.endpoint is empty.",
    )
    store: SinkStoreSettings = Field(default_factory=SinkStoreSettings)  # type: ignore[arg-type]
    roll: RollSettings = Field(default_factory=RollSettings)  # type: ignore[arg-type]
    partition_by: Literal["none", "source", "date"] = Field(
        "source",
        description="Folder per value of: the sample's source, the UTC day it was written, "
        "or none (every shard in the root).",
    )
    writer_id: str = Field(
        "",
        description="Stable name of this writer (its manifests' folder and its shards' "
        "names): must survive a restart, so the restarted sink finds its own last commit and "
        "removes its uncommitted files; '' = 'w<replica_index>'.",
    )
    replicas: int = Field(
        1, ge=1, description="Sink replicas sharing the input: each owns partition % replicas."
    )
    replica_index: int = Field(0, ge=0, description="This replica's index (0 .. replicas-1).")
    score_columns: list[str] = Field(
        default_factory=list,
        description="Scores written as columns (score_<name>), in this order; [] = every score "
        "seen so far (the set grows; list them to fix the schema of every shard).",
    )
    weight_score: str = Field(
        "density_weight",
        description="The score copied into importance_weight (1.0 where a sample has none): "
        "the density stage's inverse-probability weight for weighted sampling.",
    )
    count_topics: list[str] = Field(
        default_factory=list,
        description="Dropped-sample topics of upstream stages (e.g. sluice.scored.dropped): "
        "read and counted, never written, so each manifest carries per-stage retention.",
    )
    compression_level: int = Field(3, ge=1, le=22, description="zstd level of the shards.")
    max_request_samples: int = Field(
        4096, ge=1, description="Most samples one read API response carries."
    )

    @model_validator(mode="after")
    def _where(self) -> SinkSettings:
        if self.replica_index >= self.replicas:
            raise ValueError(f"replica_index {self.replica_index} >= replicas {self.replicas}")
        return self

    @property
    def writer(self) -> str:
        return self.writer_id or f"w{self.replica_index}"
