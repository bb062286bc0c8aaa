"""The state of a named sketch: its counts, a mergeable calibration sample, provenance.

The calibration sample is a uniform sample of the points in the sketch, to calibrate the
sampling constant.

Pass 2 must know c (keep probability min(1, c / density)) before it has seen the stream,
yet c depends on the distribution of densities over the whole corpus. That distribution is
estimated from a uniform sample of the corpus's points scored against the final merged
sketch. The sample is a *bottom-k* sample: each point gets the key blake2b(seed, id) and
the k points with the smallest keys are kept. That makes it

- uniform (keys are independent uniform hashes of distinct ids),
- exactly mergeable: the bottom-k of a union is the bottom-k of the parts' bottom-ks, so
  partition samples combine into the same sample one worker would have drawn,
- deterministic given the seed, and independent of partitioning and arrival order,
- immune to redelivered samples (same id, same key: kept once).
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from services.density.sketch import RaceSketch
from services.runtime.errors import DecodeError, FailedPrecondition, InvalidArgument

_PERSON = b"sluice-calib"


def id_keys(ids: Sequence[str], seed: int) -> np.ndarray:
    """uint64 key per id: blake2b(seed, id), the sample's random priority."""
    salt = seed.to_bytes(8, "little", signed=False)
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(i.encode(), digest_size=8, salt=salt, person=_PERSON).digest(),
                "little",
            )
            for i in ids
        ),
        dtype=np.uint64,
        count=len(ids),
    )


class CalibrationSample:
    """The ``size`` points with the smallest keys among all points added."""

    def __init__(
        self,
        size: int,
        dim: int,
        seed: int,
        keys: np.ndarray | None = None,
        vectors: np.ndarray | None = None,
    ) -> None:
        if size < 1 or dim < 1:
            raise InvalidArgument(f"calibration sample needs size >= 1 and dim >= 1, got {size}")
        self.size, self.dim, self.seed = size, dim, seed
        self.keys = np.zeros(0, np.uint64) if keys is None else np.asarray(keys, np.uint64)
        self.vectors = (
            np.zeros((0, dim), np.float32) if vectors is None else np.asarray(vectors, np.float32)
        )
        if self.vectors.shape != (len(self.keys), dim):
            raise InvalidArgument(
                f"calibration vectors of shape {self.vectors.shape} for {len(self.keys)} keys"
            )

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Offer points; keeps the bottom-``size`` by key."""
        if len(ids) != len(vectors):
            raise InvalidArgument(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids):
            self._keep(id_keys(ids, self.seed), np.asarray(vectors, np.float32))

    def merge(self, other: CalibrationSample) -> CalibrationSample:
        """The sample of the union (a new object)."""
        self._check_compatible(other)
        out = CalibrationSample(self.size, self.dim, self.seed, self.keys, self.vectors)
        out._keep(other.keys, other.vectors)
        return out

    def _keep(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        all_keys = np.concatenate([self.keys, keys])
        all_vecs = np.concatenate([self.vectors, vectors.reshape(-1, self.dim)])
        # np.unique sorts and drops repeated keys (a redelivered id counts once).
        uniq, first = np.unique(all_keys, return_index=True)
        take = first[: self.size]
        self.keys, self.vectors = uniq[: self.size], all_vecs[take]

    def _check_compatible(self, other: CalibrationSample) -> None:
        if (self.size, self.dim, self.seed) != (other.size, other.dim, other.seed):
            raise FailedPrecondition(
                "calibration samples differ in size/dim/seed: "
                f"{(self.size, self.dim, self.seed)} vs {(other.size, other.dim, other.seed)}"
            )

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            meta=np.array([self.size, self.dim, self.seed], np.int64),
            keys=self.keys,
            vectors=self.vectors,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CalibrationSample:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                size, dim, seed = (int(v) for v in z["meta"])
                return cls(size, dim, seed, z["keys"], z["vectors"])
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise DecodeError(f"not a calibration sample: {exc}") from exc


@dataclass(frozen=True, slots=True)
class PartInfo:
    """One part of a merged sketch: an input partition's last pass-1 checkpoint (which
    worker wrote it, the points it holds, the offset it covers)."""

    worker_id: str
    n: int
    partition: str = ""
    offset: int | None = None


@dataclass
class SketchState:
    """A named sketch with what it takes to use it: its calibration sample and provenance."""

    name: str
    sketch: RaceSketch
    calibration: CalibrationSample
    embedding_model: str
    """The configured embedding model the points were embedded with ('' = unknown)."""
    version: int | None = None
    parts: list[PartInfo] = field(default_factory=list)
    calibrated: bool = True
    """False once counts without calibration points were merged in (MergeSketch of raw
    bytes): the sample then no longer represents the sketch's points."""
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        return self.sketch.params.fingerprint()

    @property
    def n(self) -> int:
        return int(self.sketch.n)

    def copy(self) -> SketchState:
        """A snapshot that later additions do not change (for publishing)."""
        with self.lock:
            sketch = RaceSketch(self.sketch.params, self.sketch.counts, self.sketch.n)
            calib = CalibrationSample(
                self.calibration.size,
                self.calibration.dim,
                self.calibration.seed,
                self.calibration.keys.copy(),
                self.calibration.vectors.copy(),
            )
            return SketchState(
                self.name,
                sketch,
                calib,
                self.embedding_model,
                self.version,
                list(self.parts),
                self.calibrated,
            )

    def manifest(self) -> dict[str, Any]:
        """The JSON-ready description stored next to the sketch."""
        return {
            "name": self.name,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "params": self.sketch.params.model_dump(mode="json"),
            "n": self.n,
            "embedding_model": self.embedding_model,
            "calibration_points": len(self.calibration),
            "parts": [
                {"worker_id": p.worker_id, "n": p.n, "partition": p.partition, "offset": p.offset}
                for p in self.parts
            ],
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def combine(parts: Sequence[SketchState], workers: Sequence[str]) -> SketchState:
    """Merge partition sketches and their calibration samples (same params and model)."""
    if not parts:
        raise InvalidArgument("nothing to combine")
    first = parts[0]
    models = {p.embedding_model for p in parts}
    if len(models) > 1:
        raise FailedPrecondition(f"parts were embedded with different models: {sorted(models)}")
    sketch = RaceSketch.empty_like(first.sketch)
    calib = CalibrationSample(first.calibration.size, first.calibration.dim, first.calibration.seed)
    for part in parts:
        sketch.merge_into(part.sketch)
        calib = calib.merge(part.calibration)
    infos = [PartInfo(w, p.n) for w, p in zip(workers, parts, strict=True)]
    return SketchState(
        first.name,
        sketch,
        calib,
        first.embedding_model,
        first.version,
        infos,
        all(p.calibrated for p in parts),
    )
