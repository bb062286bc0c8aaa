"""Typed settings of the density service (env prefix ``SLUICE_DENSITY_``).

Nested blocks use ``__``: ``SLUICE_DENSITY_STORE__ENDPOINT=minio:9000``,
``SLUICE_DENSITY_SKETCH__WIDTH=0.8`` (default ``auto``).
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from services.runtime.backends.embeddings import EmbeddingSettings
from services.runtime.errors import ConfigError, FailedPrecondition
from services.runtime.objectstore import ObjectStoreSettings
from services.runtime.settings import StrictModel
from services.runtime.stage import StageSettings

if TYPE_CHECKING:  # the sketch imports torch; settings stay light (the operator reads them)
    from services.density.sketch import SketchParams

PSTABLE_HASHES = 8
"""K of a p-stable sketch when hashes_per_row is 'auto' (the measured sweet spot)."""

Mode = Literal["two_pass_build", "two_pass_sample", "online"]


class SketchSettings(StrictModel):
    """The RACE sketch's parameters (with ``seed``, its identity) and its name/version."""

    name: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Sketch name: the store folder and the gRPC name of the stage's sketch.",
    )
    version: int | None = Field(
        None,
        ge=1,
        description="Build version. two_pass_build: required (the version being built). "
        "two_pass_sample / merge: the version to load; unset = the latest merged version.",
    )
    dim: int = Field(
        0, ge=0, description="Embedding dimension; 0 = the embedding model's (384 for MiniLM)."
    )
    hash: Literal["pstable", "angular"] = Field(
        "angular",
        description="LSH family, so the kernel: 'pstable' = p-stable L2 hashes, kernel "
        "p(c / width)^K (a Laplace-like bump with a polynomial tail); 'angular' = sign random "
        "projections, kernel (1 - angle / pi)^K, whose log falls ever faster with distance "
        "(sharper topic boundaries: docs/density.md), B = 2^K buckets (buckets is ignored) "
        "and no width (K is its bandwidth).",
    )
    rows: int = Field(100, ge=1, description="R: independent hash rows; variance ~ 1/R, cost ~ R.")
    hashes_per_row: int | Literal["auto"] = Field(
        "auto",
        description="K: hashes per row (1 to 16). pstable: the kernel is p(c / width)^K, so "
        "a larger K cuts its heavy tail; K=8 with width auto ranks like exact KDE best at a "
        "given cost R*K (bench.density, docs/density.md); 'auto' = 8. angular: K is the "
        "bandwidth, kernel (1 - angle / pi)^K; 'auto' chooses it from the data by "
        "bandwidth_rule, like an auto width.",
    )
    buckets: int = Field(
        4096, ge=2, description="B: buckets per row; rehash collisions add ~n/B to every score."
    )
    width: float | Literal["auto"] = Field(
        "auto",
        description="p-stable bucket width (the bandwidth) in L2-normalised space, or 'auto': "
        "chosen from a uniform sample of the data by bandwidth_rule "
        "(services.density.bandwidth) and recorded in the sketch's params (so its "
        "fingerprint) and manifest. Pass 1 pins the chosen width once per sketch version in "
        "the store, so every partition hashes alike; a number pins it by hand.",
    )
    bandwidth_rule: Literal["spread", "nn_quantile"] = Field(
        "spread",
        description="auto width: 'spread' = the width that maximises the spread of "
        "log-density over the sample; 'nn_quantile' = the kernel equals bandwidth_kernel at "
        "the bandwidth_quantile of the sample's nearest-neighbour distances.",
    )
    bandwidth_quantile: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="nn_quantile rule: which quantile of nearest-neighbour distances.",
    )
    bandwidth_kernel: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="nn_quantile rule: the kernel's value p^K at that distance.",
    )
    device: str = Field(
        "",
        description="torch device the points are hashed on ('cpu', 'cuda', 'cuda:1'); "
        "'' = embedding.device. Not part of the identity: every device hashes alike.",
    )
    seed: int = Field(0, ge=0, description="Seed of the hash functions (part of the identity).")

    @model_validator(mode="after")
    def _family(self) -> SketchSettings:
        k = self.hashes_per_row
        if k != "auto" and not 1 <= k <= 16:
            raise ValueError(f"hashes_per_row must be 1 to 16 or 'auto', got {k}")
        if self.hash == "angular" and self.width != "auto":
            raise ValueError(
                "sketch.width applies to hash 'pstable'; an angular sketch's bandwidth is "
                "hashes_per_row (a number, or 'auto' to choose it from the data)"
            )
        return self

    @property
    def auto_bandwidth(self) -> bool:
        """Whether the kernel's bandwidth is chosen from the data: the width of a p-stable
        sketch (width 'auto'), K of an angular one (hashes_per_row 'auto')."""
        if self.hash == "angular":
            return self.hashes_per_row == "auto"
        return self.width == "auto"

    @property
    def pstable_hashes(self) -> int:
        """K of a p-stable sketch: hashes_per_row, 'auto' read as ``PSTABLE_HASHES``."""
        return PSTABLE_HASHES if self.hashes_per_row == "auto" else self.hashes_per_row

    def params(
        self, dim: int, width: float | None = None, hashes_per_row: int | None = None
    ) -> SketchParams:
        """The sketch parameters for embeddings of ``dim`` dimensions; ``width`` (p-stable)
        or ``hashes_per_row`` (angular) is the bandwidth chosen from the data when it is
        'auto' (ignored otherwise)."""
        from services.density.sketch import ANGULAR_WIDTH, SketchParams

        unchosen = FailedPrecondition(
            "the sketch's bandwidth is 'auto' and has not been chosen yet (it is chosen from "
            "the first points sketched, or read from the version's pin in the store)"
        )
        if self.hash == "angular":
            k = hashes_per_row if self.hashes_per_row == "auto" else self.hashes_per_row
            if k is None:
                raise unchosen
            return SketchParams(
                hash="angular",
                dim=dim,
                rows=self.rows,
                hashes_per_row=k,
                buckets=1 << k,
                width=ANGULAR_WIDTH,
                seed=self.seed,
            )
        chosen = width if self.width == "auto" else self.width
        if chosen is None:
            raise unchosen
        return SketchParams(
            dim=dim,
            rows=self.rows,
            hashes_per_row=self.pstable_hashes,
            buckets=self.buckets,
            width=chosen,
            seed=self.seed,
        )


class StoreSettings(ObjectStoreSettings):
    """Where sketches live (services.runtime.objectstore); only the defaults are density's."""

    bucket: str = Field("sluice-sketches", description="Bucket holding the sketches.")
    prefix: str = Field("density", description="Key prefix inside the bucket.")


def default_worker_id() -> str:
    """Host (pod name) + pid + random suffix: unique per process start, so a restarted
    pass-1 worker publishes a new part instead of overwriting the one it published before."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class DensitySettings(StageSettings):
    """Everything the density service reads."""

    kind = "density"
    mode: Mode = Field(
        "two_pass_sample",
        description="'two_pass_build': pass 1, sketch the input and publish a part to the "
        "store (emits nothing downstream); 'two_pass_sample': pass 2, load the merged sketch "
        "and subsample by inverse density; 'online': one pass, score against the sketch so far "
        "then add (approximate, for unbounded streams).",
    )
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)  # type: ignore[arg-type]
    sketch: SketchSettings = Field(default_factory=SketchSettings)  # type: ignore[arg-type]
    store: StoreSettings = Field(default_factory=StoreSettings)  # type: ignore[arg-type]
    target_rate: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Expected kept fraction of the stream (two_pass_sample, online).",
    )
    seed: int = Field(
        0,
        ge=0,
        lt=1 << 64,
        description="Seed of the keep decisions and of the calibration sample.",
    )
    calibration_size: int = Field(
        4096,
        ge=16,
        description="Size of the uniform sample of sketched points (bottom-k by hashed id) "
        "kept with each sketch to calibrate c; the kept fraction's error is ~0.5/sqrt(size).",
    )
    warmup: int = Field(
        1000,
        ge=0,
        description="online: keep every sample until the sketch holds this many points.",
    )
    worker_id: str = Field(
        default_factory=default_worker_id,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Name of this pass-1 worker's part in the store; unique per process.",
    )
    build_idle_timeout_s: float = Field(
        60.0,
        gt=0,
        description="two_pass_build: publish the part and exit after this long without input "
        "(the topic is drained). Counted from start, so it must exceed the consumer group "
        "join time (about session_timeout_ms / 2 on some brokers).",
    )
    sketch_wait_s: float = Field(
        240.0,
        ge=0,
        description="two_pass_sample: how long to wait for the merged sketch at start (the "
        "build Job may still be running), looking every 10 s; then fail. Nothing is served "
        "meanwhile: keep it below the pod's startup probe budget (the chart's: 300 s).",
    )
    max_request_samples: int = Field(4096, ge=1, description="Most samples per gRPC request.")

    @model_validator(mode="after")
    def _build_needs_version(self) -> DensitySettings:
        if self.mode == "two_pass_build" and self.sketch.version is None:
            raise ValueError("mode 'two_pass_build' needs sketch.version (the version to build)")
        return self


def consumer_group(settings: DensitySettings) -> str:
    """The group a density worker commits (registered as the stage's ``group`` rule, so the
    worker and the operator name it alike): ``kafka.group_id`` online; per pass and sketch
    version otherwise (``<group>.build.<name>.v<N>``, ``<group>.sample.<name>.v<N>``), so a
    new version starts from the beginning of the topic and pass 2 never starts where pass 1
    committed. Pass 2 with ``sketch.version`` unset samples against the latest merged
    version, which only the store knows: the worker resolves it into the settings first;
    anyone else (the operator) needs the version pinned."""
    kafka = settings.kafka
    if settings.mode == "online":
        return kafka.group_id
    version = settings.sketch.version
    if version is None:
        raise ConfigError(
            f"density mode {settings.mode!r} commits a group per sketch version: set "
            "sketch.version (pass 2 resolves 'latest' from the store only when it starts)"
        )
    passname = settings.mode.removeprefix("two_pass_")
    return f"{kafka.group_id}.{passname}.{settings.sketch.name}.v{version}"
