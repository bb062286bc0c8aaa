"""The density core: embed samples, sketch them, and subsample by inverse density.

Pure logic on domain objects (no grpc, kafka or S3 imports); the gRPC servicer, the Kafka
stage worker and the local runner all call it. What each mode does with a batch:

- ``two_pass_build`` (pass 1): add every sample's embedding to the stage's sketch and to its
  calibration sample. Nothing goes downstream: the outcomes say "kept" (accepted into the
  sketch) and the worker runs without an output topic. The worker publishes the sketch as a
  part when its input is drained; the parts are merged offline.
- ``two_pass_sample`` (pass 2): score each sample against the merged sketch of the whole
  corpus and keep it with p = min(1, c / density). c is calibrated *before* the stream is
  seen, from the merged calibration sample (a uniform sample of the corpus kept in pass 1)
  scored against the same merged sketch, so that mean(p) over the corpus = target rate.
- ``online``: score against the sketch built so far, then add the batch. Keeps everything
  until the sketch holds ``warmup`` points; c comes from the calibration sample of the
  stream so far, re-scored whenever the sketch has grown by 5%. Approximate: early samples
  are judged against a partial picture of the corpus, and a batch does not see itself.

**Density.** density(x) = (G(x) - 1) / n, where G(x) is the geometric mean over the
sketch's R rows of x's bucket counts, each floored at 1 (``RaceSketch.estimate_density``):
like the KDE sum_y k(x, y) that the rows' mean estimates (``RaceSketch.estimate_kde``), the
share of the corpus "near" x, but with the heavy-tailed row errors damped, so it ranks
points like the exact KDE far better at the same cost (the method's doc). A point counts
itself once in every row; the 1 subtracted is that self-count, so the density is that of
the *other* points (leave-one-out), floored at 2^(1/R) - 1 (one other point in one row) to
keep keep probabilities finite for points far from everything. Left in, the self-count
would pull every density ratio towards 1, most for the sparse points the sampler exists to
keep. Online mode scores a point before it is added, so it uses the counts + 1 and n + 1:
the density the point will have once added.

**Decisions** are deterministic per (seed, sample id) (``sampler.decide``): the same
sample gets the same decision whatever batch, partition or replay it arrives in. A kept
sample carries ``scores['density']`` and ``scores['density_weight']`` = 1 / p (its
importance weight: weighted sums over kept samples estimate sums over the corpus); a
dropped one carries its density and the reason ``density:subsampled``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from services.density import sampler
from services.density.bandwidth import BandwidthChoice, choose_hashes, choose_width
from services.density.settings import DensitySettings
from services.density.sketch import ANGULAR_WIDTH, RaceSketch, SketchParams
from services.density.state import CalibrationSample, SketchState
from services.runtime.backends.base import Lazy
from services.runtime.backends.embeddings import Embedder, create_embedder, known_dim
from services.runtime.domain import Action, LineageEvent, Outcome, Sample
from services.runtime.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.runtime.stage import StageObserver

log = logging.getLogger(__name__)

STAGE = "density"
REASON_SUBSAMPLED = "density:subsampled"
REASON_BAD_EMBEDDING = "density:bad_embedding"
SCORE_DENSITY = "density"
SCORE_WEIGHT = "density_weight"
ONLINE_RECALIBRATE_GROWTH = 1.05
"""Online mode re-scores its calibration sample when the sketch has grown by 5%."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

CalibrationSource = Literal["sketch", "request"]
Loader = Callable[[str, SketchParams | None], SketchState]
"""Fetches a named sketch with these params (None: width 'auto', whatever was pinned)."""


@dataclass(frozen=True, slots=True)
class Vectors:
    """Unit-norm embeddings of a batch; ``errors[i]`` says why row i is unusable ('' = ok)."""

    matrix: np.ndarray
    errors: list[str]

    @property
    def ok(self) -> np.ndarray:
        return np.array([not e for e in self.errors], dtype=bool)


@dataclass(frozen=True, slots=True)
class Decisions:
    """Inverse-density sampling of a batch, row-aligned with its samples."""

    density: np.ndarray
    probability: np.ndarray
    kept: np.ndarray
    c: float
    calibration: CalibrationSource
    n: int
    fingerprint: str

    @property
    def weights(self) -> np.ndarray:
        """1 / p for kept samples, 0 for dropped ones."""
        return np.where(self.kept, sampler.importance_weights(self.probability), 0.0)


def checked_name(name: str) -> str:
    """A sketch name is a path segment in the store: letters, digits, '.', '_', '-'."""
    if not _NAME.match(name):
        raise InvalidArgument(
            f"bad sketch name {name!r}: use 1-128 letters, digits, '.', '_' or '-'"
        )
    return name


def densities(sketch: RaceSketch, x: np.ndarray) -> np.ndarray:
    """(G(x) - 1) / n for points in (or judged as if in) the sketch (the module doc)."""
    if sketch.n == 0 or len(x) == 0:
        return np.ones(len(x), dtype=np.float64)
    return sketch.estimate_density(x, exclude_self=True) / sketch.n


def densities_before_add(sketch: RaceSketch, x: np.ndarray) -> np.ndarray:
    """(G+1(x) - 1) / (n + 1): the density of points not yet added (online mode)."""
    if sketch.n == 0 or len(x) == 0:
        return np.ones(len(x), dtype=np.float64)
    return sketch.estimate_density(x, plus_one=True, exclude_self=True) / (sketch.n + 1)


class DensityCore:
    """Named sketches, embeddings and the three stream modes.

    The embedder is created on first use, so a stream of precomputed embeddings never
    loads a model. ``loader`` (optional) fetches a named sketch that is not in memory,
    e.g. the latest merged version from the object store.
    """

    def __init__(
        self,
        settings: DensitySettings,
        embedder: Embedder | Callable[[], Embedder] | None = None,
        loader: Loader | None = None,
        metrics: StageObserver | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        """Unused by density: every decision shows in its outcomes, which the adapters count."""
        self._embedder = Lazy(embedder, "embed", lambda: create_embedder(settings.embedding))
        self.loader = loader
        self._lock = threading.RLock()
        self._sketches: dict[str, SketchState] = {}
        self._calibration_cache: dict[str, tuple[int, np.ndarray]] = {}
        self._bandwidth: BandwidthChoice | None = None
        self._pending: list[tuple[list[str], np.ndarray]] = []
        """online with width 'auto': the warm-up points, held until the width is chosen."""
        self.seconds = 0.0
        """Cumulative processing time (for run reports, not for decisions)."""

    # -- configuration -------------------------------------------------------
    @property
    def name(self) -> str:
        """The stage's own sketch (what the stream modes build, load or grow)."""
        return self.settings.sketch.name

    @property
    def signals(self) -> list[str]:
        return [] if self.settings.mode == "two_pass_build" else [SCORE_DENSITY, SCORE_WEIGHT]

    @property
    def steps(self) -> list[str]:
        return ["density"]

    @property
    def embedder(self) -> Embedder:
        return self._embedder.get()

    @property
    def dim(self) -> int:
        """Sketch dimension: configured, known for packaged models, else the model's."""
        configured = self.settings.sketch.dim or known_dim(self.settings.embedding.model)
        return configured or self.embedder.dim

    def params(self) -> SketchParams:
        """The stage sketch's params; FailedPrecondition while an 'auto' bandwidth is
        unchosen."""
        chosen_k = self._bandwidth.hashes_per_row if self._bandwidth is not None else None
        return self.settings.sketch.params(self.dim, self.width, chosen_k or None)

    @property
    def width(self) -> float | None:
        """The sketch width: configured, or chosen from the data (None: not yet). An
        angular sketch's is the constant ``ANGULAR_WIDTH`` once its K is known."""
        sk = self.settings.sketch
        if not sk.auto_bandwidth:
            return ANGULAR_WIDTH if sk.hash == "angular" else float(sk.width)
        return self._bandwidth.width if self._bandwidth is not None else None

    @property
    def bandwidth(self) -> BandwidthChoice | None:
        """How an 'auto' width was chosen (None for a configured width or before)."""
        return self._bandwidth

    @property
    def device(self) -> str:
        """Where points are hashed: sketch.device, else the embedding device."""
        return self.settings.sketch.device or self.settings.embedding.device

    def choose_bandwidth(self, ids: Sequence[str], matrix: np.ndarray) -> BandwidthChoice:
        """Choose an 'auto' width from these points (a bottom-k uniform sample of them, the
        calibration sample's rule and size) and keep it. A configured width is not
        changed; a chosen one is never replaced (sketches of two widths do not merge)."""
        if self._bandwidth is not None:
            return self._bandwidth
        return self.set_bandwidth(self.propose_bandwidth(ids, matrix))

    def propose_bandwidth(self, ids: Sequence[str], matrix: np.ndarray) -> BandwidthChoice:
        """The width these points suggest (``choose_bandwidth`` without keeping it)."""
        s = self.settings
        sample = CalibrationSample(s.calibration_size, self.dim, s.seed)
        sample.add(list(ids), matrix)
        if s.sketch.hash == "angular":
            return choose_hashes(
                sample.vectors,
                rule=s.sketch.bandwidth_rule,
                quantile=s.sketch.bandwidth_quantile,
                kernel=s.sketch.bandwidth_kernel,
            )
        return choose_width(
            sample.vectors,
            s.sketch.pstable_hashes,
            rule=s.sketch.bandwidth_rule,
            quantile=s.sketch.bandwidth_quantile,
            kernel=s.sketch.bandwidth_kernel,
        )

    def params_family(self) -> dict[str, int | str]:
        """The sketch params other than the bandwidth (what an 'auto' one is chosen for):
        of a p-stable sketch all but the width; of an angular one, the family, dim, rows
        and seed (K and B = 2^K are chosen)."""
        sk = self.settings.sketch
        if sk.hash == "angular":
            return {"hash": "angular", "dim": self.dim, "rows": sk.rows, "seed": sk.seed}
        return {
            "dim": self.dim,
            "rows": sk.rows,
            "hashes_per_row": sk.pstable_hashes,
            "buckets": sk.buckets,
            "seed": sk.seed,
        }

    def set_bandwidth(self, choice: BandwidthChoice) -> BandwidthChoice:
        """Adopt a bandwidth chosen elsewhere (pass 1's pin in the store)."""
        sk = self.settings.sketch
        if not sk.auto_bandwidth:
            return choice
        if (sk.hash == "angular") != (choice.hashes_per_row > 0):
            raise FailedPrecondition(
                f"a bandwidth chosen for another hash family ({_describe(choice)}) cannot be "
                f"used by a {sk.hash} sketch"
            )
        with self._lock:
            held = self._bandwidth
            if held is not None and (held.width, held.hashes_per_row) != (
                choice.width,
                choice.hashes_per_row,
            ):
                raise FailedPrecondition(
                    f"sketch bandwidth already chosen as {_describe(held)}, cannot switch to "
                    f"{_describe(choice)}: sketches of different bandwidths do not merge"
                )
            self._bandwidth = choice
        log.info("sketch %s (%s, %d points)", _describe(choice), choice.rule, choice.sample)
        return choice

    @property
    def embedding_model(self) -> str:
        """The configured embedding model: what a sketch's points must be embedded with."""
        return self.settings.embedding.model

    @property
    def model_version(self) -> str:
        """What decides now: the embedding model and the stage's own sketch, when held."""
        with self._lock:
            return self.version_of(self._sketches.get(self.name))

    def version_of(self, state: SketchState | None) -> str:
        """Lineage identifier: embedding model + sketch fingerprint (+ version)."""
        parts = [self.embedding_model]
        if state is not None:
            # "-gmx": densities are the rows' geometric mean with x itself excluded
            # (estimate_density), so a release that changes the reduction changes the
            # version, and with it the batch ids.
            p = state.sketch.params
            bandwidth = f"a{p.hashes_per_row}" if p.hash == "angular" else f"w{p.width:g}"
            parts.append(f"race-{state.fingerprint[:12]}-{bandwidth}-gmx")
            if state.version is not None:
                parts.append(f"v{state.version}")
        return "/".join(parts)

    # -- embeddings ----------------------------------------------------------
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """The Embed API: vectors as the model returns them (normalised per settings)."""
        if not texts:
            raise InvalidArgument("no texts to embed")
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise InvalidArgument(f"text #{empty[0]} is empty")
        return self.embedder.embed(list(texts))

    def vectors(self, samples: Sequence[Sample]) -> Vectors:
        """Unit-norm (N, dim) float32 rows: precomputed embeddings where samples carry
        one, the embedder's vectors of their text otherwise, one batch for all texts."""
        dim = self.dim
        out = np.zeros((len(samples), dim), dtype=np.float32)
        errors = [""] * len(samples)
        texts: list[int] = []
        given: list[int] = []
        for i, s in enumerate(samples):
            if s.embedding:
                if len(s.embedding) == dim:
                    given.append(i)
                else:
                    errors[i] = f"embedding has {len(s.embedding)} dims, the sketch takes {dim}"
            elif s.content.strip():
                texts.append(i)
            else:
                errors[i] = "no text and no embedding"
        if given:
            out[given] = [samples[i].embedding for i in given]
            for i, why in zip(given, _unusable_rows(out[given]), strict=True):
                errors[i] = why
        if texts:
            out[texts] = self._embed_checked([samples[i].content for i in texts], dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return Vectors(out, errors)

    def strict_vectors(self, samples: Sequence[Sample]) -> np.ndarray:
        """``vectors`` for API calls: any unusable sample fails the request."""
        if not samples:
            raise InvalidArgument("request has no samples")
        if len(samples) > self.settings.max_request_samples:
            raise InvalidArgument(
                f"{len(samples)} samples in one request, limit {self.settings.max_request_samples}"
            )
        vecs = self.vectors(samples)
        bad = [(s.id, e) for s, e in zip(samples, vecs.errors, strict=True) if e]
        if bad:
            sid, why = bad[0]
            raise InvalidArgument(f"sample {sid!r}: {why} ({len(bad)} unusable sample(s))")
        return vecs.matrix

    def _embed_checked(self, texts: list[str], dim: int) -> np.ndarray:
        emb = self.embedder.embed(texts)
        if emb.shape != (len(texts), dim):
            raise ConfigError(
                f"embedding model {self.embedding_model} returns {emb.shape[1:]} vectors, "
                f"the sketch takes {dim} dims (sketch.dim)"
            )
        return emb

    # -- named sketches --------------------------------------------------------
    def new_state(self, name: str, version: int | None = None) -> SketchState:
        """An empty sketch with this core's params and calibration settings."""
        params = self.params()
        calib = CalibrationSample(self.settings.calibration_size, params.dim, self.settings.seed)
        sketch = RaceSketch(params, device=self.device)
        return SketchState(name, sketch, calib, self.embedding_model, version)

    def state(self, name: str = "") -> SketchState:
        """A named sketch: in memory, else from the loader, else NotFound."""
        name = checked_name(name or self.name)
        with self._lock:
            found = self._sketches.get(name)
        if found is not None:
            return found
        if self.loader is None:
            raise NotFound(f"no sketch named {name!r}")
        auto = self.settings.sketch.auto_bandwidth
        loaded = self.loader(name, None if auto else self.params())
        return self.install(loaded)

    def ensure_state(self, name: str = "", version: int | None = None) -> SketchState:
        """A named sketch, created empty if missing (never loaded)."""
        name = checked_name(name or self.name)
        with self._lock:
            if name not in self._sketches:
                self._sketches[name] = self.new_state(name, version)
            return self._sketches[name]

    def install(self, state: SketchState) -> SketchState:
        """Hold ``state`` under its name (replacing any sketch of that name)."""
        if state.embedding_model and state.embedding_model != self.embedding_model:
            raise FailedPrecondition(
                f"sketch {state.name!r} was built with embedding model "
                f"{state.embedding_model!r}; this service embeds with {self.embedding_model!r}"
            )
        cfg, p = self.settings.sketch, state.sketch.params
        if state.name == self.name and p.hash != cfg.hash:
            raise FailedPrecondition(
                f"sketch {state.name!r} is a {p.hash} sketch; this service is configured "
                f"for sketch.hash {cfg.hash!r}"
            )
        if state.name == self.name and cfg.auto_bandwidth:
            # the loaded sketch's bandwidth is the stage's
            k = p.hashes_per_row if p.hash == "angular" else 0
            held = self._bandwidth
            if held is None or (held.width, held.hashes_per_row) != (p.width, k):
                self._bandwidth = BandwidthChoice(p.width, "loaded", 0, 0.0, 0.0, 0.0, k)
        if state.sketch.device != RaceSketch(state.sketch.params, device=self.device).device:
            sk = state.sketch
            state.sketch = RaceSketch(sk.params, sk.counts, sk.n, device=self.device)
        with self._lock:
            self._sketches[state.name] = state
            self._calibration_cache.pop(state.name, None)
        log.info("sketch %s v%s installed: n=%d", state.name, state.version, state.n)
        return state

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._sketches)

    # -- API operations ---------------------------------------------------------
    def add(self, name: str, samples: Sequence[Sample]) -> SketchState:
        """Add samples to a named sketch (created if new)."""
        vecs = self.strict_vectors(samples)
        ids = [s.id for s in samples]
        if self.width is None:  # 'auto': the first points sketched choose it
            self.choose_bandwidth(ids, vecs)
        state = self.ensure_state(name)
        self._add(state, ids, vecs)
        return state

    def merge_bytes(self, name: str, data: bytes) -> SketchState:
        """Merge a serialized sketch into a named one (created from it if new)."""
        name = checked_name(name or self.name)
        incoming = RaceSketch.from_bytes(data)
        with self._lock:
            state = self._sketches.get(name)
            if state is None:
                calib = CalibrationSample(
                    self.settings.calibration_size, incoming.params.dim, self.settings.seed
                )
                # No calibration points arrive with raw counts.
                state = SketchState(name, incoming, calib, "", calibrated=incoming.n == 0)
                self._sketches[name] = state
                return state
        with state.lock:
            state.sketch.merge_into(incoming)
            state.calibrated = state.calibrated and incoming.n == 0
        return state

    def score(self, name: str, samples: Sequence[Sample]) -> tuple[np.ndarray, SketchState]:
        """Density of each sample under a named sketch."""
        vecs = self.strict_vectors(samples)
        state = self.state(name)
        with state.lock:
            return densities(state.sketch, vecs), state

    def sample(
        self,
        name: str,
        samples: Sequence[Sample],
        target_rate: float | None = None,
        calibration: CalibrationSource | None = None,
        seed: int | None = None,
    ) -> Decisions:
        """Inverse-density keep decisions for an API request."""
        rate = self._rate(target_rate)
        vecs = self.strict_vectors(samples)
        state = self.state(name)
        source = calibration or ("sketch" if self._has_calibration(state) else "request")
        with state.lock:
            dens = densities(state.sketch, vecs)
        c = self._sketch_c(state, rate) if source == "sketch" else sampler.calibrate(dens, rate)
        return self._decide(state, [s.id for s in samples], dens, c, source, seed)

    # -- stream modes ------------------------------------------------------------
    def process(self, samples: list[Sample]) -> list[Outcome]:
        """The Kafka/local entry point: the configured mode on one batch."""
        t0 = time.perf_counter()
        vecs = self.vectors(samples)
        mode = self.settings.mode
        if mode == "two_pass_build":
            outcomes = self.build_batch(samples, vecs)
        elif mode == "two_pass_sample":
            outcomes = self.sample_batch(samples, vecs)
        else:
            outcomes = self.online_batch(samples, vecs)
        self.seconds += time.perf_counter() - t0
        return outcomes

    def build_batch(
        self, samples: Sequence[Sample], vecs: Vectors, into: SketchState | None = None
    ) -> list[Outcome]:
        """Pass 1: sketch the usable samples, into the stage's sketch or ``into`` (the Kafka
        worker keeps one sketch per input partition). Accepted samples are 'kept' (into the
        sketch), unusable ones dropped with a reason; nothing is annotated."""
        version = self.settings.sketch.version
        ok = vecs.ok
        ids = [s.id for s, good in zip(samples, ok, strict=True) if good]
        if into is None and self.width is None:  # 'auto': the first batch chooses it
            self.choose_bandwidth(ids, vecs.matrix[ok])
        state = into if into is not None else self.ensure_state(self.name, version)
        self._add(state, ids, vecs.matrix[ok])
        return [
            Outcome(s, kept=not err, reason=f"{REASON_BAD_EMBEDDING}" if err else "")
            for s, err in zip(samples, vecs.errors, strict=True)
        ]

    def sample_batch(self, samples: Sequence[Sample], vecs: Vectors) -> list[Outcome]:
        """Pass 2: decide against the installed merged sketch."""
        state = self.state(self.name)
        ok = vecs.ok
        with state.lock:
            dens = densities(state.sketch, vecs.matrix[ok])
        c = self._sketch_c(state, self.settings.target_rate)
        ids = [s.id for s, good in zip(samples, ok, strict=True) if good]
        decisions = self._decide(state, ids, dens, c, "sketch", None)
        return self._outcomes(state, samples, vecs, decisions)

    def online_batch(self, samples: Sequence[Sample], vecs: Vectors) -> list[Outcome]:
        """One pass: decide against the sketch so far, then add the batch."""
        ok = vecs.ok
        ids = [s.id for s, good in zip(samples, ok, strict=True) if good]
        matrix = vecs.matrix[ok]
        if self.width is None:  # 'auto': hold the warm-up, then choose the width from it
            return self._online_unchosen(samples, vecs, ids, matrix)
        state = self.ensure_state(self.name)
        with state.lock:
            dens = densities_before_add(state.sketch, matrix)
            warming = state.n < self.settings.warmup or len(state.calibration) == 0
        c = np.inf if warming else self._online_c(state)
        decisions = self._decide(state, ids, dens, c, "sketch", None)
        self._add(state, ids, matrix)
        return self._outcomes(state, samples, vecs, decisions)

    def _online_unchosen(
        self, samples: Sequence[Sample], vecs: Vectors, ids: list[str], matrix: np.ndarray
    ) -> list[Outcome]:
        """Online with an unchosen 'auto' width: keep everything (it is warm-up) and hold
        the points; once ``warmup`` points (at least 2) are held, choose the width from
        them, create the sketch and add them. Densities read as an empty sketch's."""
        self._pending.append((ids, matrix))
        held = sum(len(i) for i, _ in self._pending)
        if held >= max(self.settings.warmup, 2):
            all_ids = [i for chunk, _ in self._pending for i in chunk]
            all_vecs = np.concatenate([m for _, m in self._pending])
            self.choose_bandwidth(all_ids, all_vecs)
            self._pending = []
            state = self.ensure_state(self.name)
            self._add(state, all_ids, all_vecs)
        else:
            state = self.new_unsized_state()
        dens = np.ones(len(ids), dtype=np.float64)
        decisions = self._decide(state, ids, dens, np.inf, "sketch", None)
        return self._outcomes(state, samples, vecs, decisions)

    def new_unsized_state(self) -> SketchState:
        """A placeholder for outcomes before an 'auto' bandwidth is chosen (never stored):
        width 1 or K = 1, the smallest sketch of the configured family."""
        params = self.settings.sketch.params(self.dim, 1.0, 1)
        calib = CalibrationSample(self.settings.calibration_size, params.dim, self.settings.seed)
        return SketchState(self.name, RaceSketch(params), calib, self.embedding_model)

    # -- internals -------------------------------------------------------------------
    def add_points(self, state: SketchState, ids: list[str], matrix: np.ndarray) -> None:
        """Add unit vectors with their ids to a sketch and its calibration sample."""
        self._add(state, ids, matrix)

    def _add(self, state: SketchState, ids: list[str], matrix: np.ndarray) -> None:
        if not ids:
            return
        with state.lock:
            state.sketch.add(matrix)
            state.calibration.add(ids, matrix)

    def _rate(self, target_rate: float | None) -> float:
        rate = target_rate or self.settings.target_rate
        if not 0 < rate <= 1:
            raise InvalidArgument(f"target rate must be in (0, 1], got {rate}")
        return rate

    @staticmethod
    def _has_calibration(state: SketchState) -> bool:
        return state.calibrated and len(state.calibration) > 0

    def _calibration_densities(self, state: SketchState, online: bool = False) -> np.ndarray:
        """Densities of the calibration sample under the sketch, cached per sketch size
        (two-pass sketches are frozen; online ones are re-scored on 5% growth)."""
        with self._lock:
            cached = self._calibration_cache.get(state.name)
        if cached is not None:
            n_then, dens = cached
            fresh = n_then == state.n or (online and state.n < n_then * ONLINE_RECALIBRATE_GROWTH)
            if fresh:
                return dens
        with state.lock:
            dens = densities(state.sketch, state.calibration.vectors)
            n_now = state.n
        with self._lock:
            self._calibration_cache[state.name] = (n_now, dens)
        return dens

    def _sketch_c(self, state: SketchState, rate: float) -> float:
        if not self._has_calibration(state):
            raise FailedPrecondition(
                f"sketch {state.name!r} has no calibration sample (it was built from merged "
                "raw counts); calibrate on the request instead"
            )
        return sampler.calibrate(self._calibration_densities(state), rate)

    def _online_c(self, state: SketchState) -> float:
        dens = self._calibration_densities(state, online=True)
        return sampler.calibrate(dens, self.settings.target_rate)

    def _decide(
        self,
        state: SketchState,
        ids: list[str],
        dens: np.ndarray,
        c: float,
        source: CalibrationSource,
        seed: int | None,
    ) -> Decisions:
        probs = np.ones(len(dens)) if not np.isfinite(c) else sampler.keep_probabilities(dens, c)
        kept = sampler.decide(ids, probs, self.settings.seed if seed is None else seed)
        return Decisions(
            dens, probs, np.asarray(kept, bool), float(c), source, state.n, state.fingerprint
        )

    def _outcomes(
        self, state: SketchState, samples: Sequence[Sample], vecs: Vectors, decisions: Decisions
    ) -> list[Outcome]:
        """Annotate and record lineage; ``decisions`` rows follow the usable samples."""
        version = self.version_of(state)
        weights = decisions.weights
        outcomes: list[Outcome] = []
        row = 0
        for s, err in zip(samples, vecs.errors, strict=True):
            if err:
                reason = REASON_BAD_EMBEDDING
            else:
                s.scores[SCORE_DENSITY] = float(decisions.density[row])
                kept = bool(decisions.kept[row])
                if kept:
                    s.scores[SCORE_WEIGHT] = float(weights[row])
                reason = "" if kept else REASON_SUBSAMPLED
                row += 1
            action = Action.DROPPED if reason else Action.KEPT
            s.lineage.append(LineageEvent(STAGE, action, reason, version))
            outcomes.append(Outcome(s, kept=not reason, reason=reason))
        return outcomes


def run_bounded(core: DensityCore, batches: list[list[Sample]]) -> list[list[Outcome]]:
    """The registry's bounded runner (a local run, where the stage sees its whole input):
    one online pass when so configured, else both passes in process, sketch everything
    then subsample it, embedding each sample once. No store: pass 1's sketch is the
    merged one."""
    if core.settings.mode == "online":
        return [core.online_batch(b, core.vectors(b)) for b in batches]
    vectors = [core.vectors(b) for b in batches]
    if core.width is None:  # 'auto': chosen from a uniform sample of the whole input
        ids = [
            s.id
            for b, v in zip(batches, vectors, strict=True)
            for s, ok in zip(b, v.ok, strict=True)
            if ok
        ]
        usable = [v.matrix[v.ok] for v in vectors]
        core.choose_bandwidth(ids, np.concatenate(usable) if usable else np.zeros((0, core.dim)))
    for b, v in zip(batches, vectors, strict=True):  # pass 1
        core.build_batch(b, v)
    return [core.sample_batch(b, v) for b, v in zip(batches, vectors, strict=True)]


def _unusable_rows(matrix: np.ndarray) -> list[str]:
    """Why each precomputed embedding row cannot be hashed ('' = usable)."""
    finite = np.isfinite(matrix).all(axis=1)
    nonzero = np.any(matrix != 0, axis=1)
    return [
        "" if f and z else ("embedding is not finite" if not f else "embedding is all zeros")
        for f, z in zip(finite.tolist(), nonzero.tolist(), strict=True)
    ]


def _describe(choice: BandwidthChoice) -> str:
    """'width 2.03' or 'K=10 (angular)'."""
    if choice.hashes_per_row:
        return f"K={choice.hashes_per_row} (angular)"
    return f"width {choice.width:g}"
