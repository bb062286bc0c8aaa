"""RACE: a mergeable kernel-density sketch of a stream of embeddings.

The estimator (Coleman & Shrivastava, "Sub-linear RACE Sketches for Approximate Kernel
Density Estimation on Streaming Data", WWW 2020) keeps an R x B array of counts. Row r has
its own locality-sensitive hash g_r: K concatenated p-stable L2 hashes (Datar et al. 2004)

    h_j(x) = floor((w_j . x + b_j) / width),   w_j ~ N(0, I_dim),  b_j ~ U[0, width)

rehashed into one of B buckets. Adding x increments counts[r, g_r(x)] in every row, so each
row sums to n, the number of points added. The score of a query q is the mean over rows of
counts[r, g_r(q)].

**Why it estimates a kernel density.** count_r(q) = sum_y 1[g_r(y) = g_r(q)], and
P(g_r(y) = g_r(q)) over the random hash is exactly the collision probability of the LSH
family, k(q, y) = p(||q - y||)^K (``services.density.exact.collision_probability``). So
E[count_r(q)] = sum_y k(q, y): with no rehash collisions (B -> inf, see below) every row is
an unbiased estimate of the kernel density KDE(q) = sum_y k(q, y), and the mean of R
independent rows has variance ~1/R. The kernel is fixed by the hash family (and positive
semi-definite, being a collision probability); it is never evaluated.

**The B-bucket bias.** Two points in different LSH cells still share a bucket when the
rehash collides, with probability 1/B under the universal rehash below. So
E[score(q)] = KDE(q) + (n - KDE(q)) / B: a bias of at most n/B that is nearly the same for
every query (it does not change the ranking). ``estimate_kde`` removes it; B should exceed
the number of occupied cells per row so the collision noise stays small.

**Bandwidth.** width and K set the kernel's scale: p(c) decreases from 1 at c = 0 to 0.5
at c ~ 0.68 width, and a larger K raises it to a higher power (a sharper kernel, fewer
far-away collisions). See ``services.density.exact`` for how to choose them.

**The angular family** (``SketchParams.hash = "angular"``, the stage's default). Row r's
hash is instead the K sign bits of w_j . x, w_j ~ N(0, I) (sign random projections,
Charikar 2002), read as a K-bit number: the bucket itself, B = 2^K, no rehash. Two points
at angle theta share it with probability (1 - theta / pi)^K, so the score is an unbiased
estimate of that kernel's density with no n/B background. Its log falls ever faster with
the angle (the p-stable kernel's only linearly near 0, then flattens), which separates
topics better; K alone is its bandwidth (no width). See ``_AngularHasher``.

**Geometry.** Embeddings are L2-normalised before hashing, so distances are those of cosine
geometry (||x - y||^2 = 2 - 2 cos); a zero vector is hashed as the origin.

**Merging.** Counts of sketches with the same params and seed add up exactly:
merge(sketch(A), sketch(B)) == sketch(A u B). The params and seed (``fingerprint``) are the
sketch's identity; merging different ones is refused.

**Determinism.** The projection w . x is computed in float32 (one matmul per chunk, the
cost that matters), whose last bits depend on the BLAS kernel (batch size, CPU). Every
projection within a rounding margin of a cell boundary is recomputed in float64, so a point
lands in the same buckets whichever batch it arrives in and on whichever machine (barring
a projection within ~1e-15 of a boundary); the rest is exact integer arithmetic.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, ValidationError, model_validator

from services.runtime.errors import DecodeError, FailedPrecondition, InvalidArgument
from services.runtime.settings import StrictModel

#: Names the hash construction (draw order, rehash, geometry); part of every fingerprint,
#: so a change to how points are hashed can never be merged with sketches built before it.
HASH_SCHEME = "race/pstable-l2/normalised/multiply-shift38/v1"
#: The angular family's construction: K sign bits of Gaussian projections, the K-bit code
#: is the bucket (B = 2^K, no rehash).
ANGULAR_SCHEME = "race/angular-simhash/normalised/direct/v1"
HASH_SCHEMES = {"pstable": HASH_SCHEME, "angular": ANGULAR_SCHEME}
#: An angular sketch has no width (K alone sets its kernel); its params carry this constant.
ANGULAR_WIDTH = 1.0
HashFamily = Literal["pstable", "angular"]
#: Version of the byte format written by ``RaceSketch.to_bytes``.
FORMAT_VERSION = 1
MAX_HASHES_PER_ROW = 16
MAX_BUCKETS = 1 << 18
MAX_COUNTS = 1 << 27
MAX_PROJECTION_ENTRIES = 1 << 24

_MAGIC = b"SLUICE-RACE\x00"
_MAX_HEADER_BYTES = 1 << 16
# Every p-stable hash value is kept inside (-2^20, 2^20) (checked on the width), so the
# rehash below is exact int64 arithmetic: |a * h| < 2^58 and K <= 16 terms add to < 2^62.
_HASH_ABS_LIMIT = float(1 << 20)
# Rehash: vector multiply-shift (Dietzfelbinger 1996; Thorup 2015) with 38-bit words:
# bucket = floor(((sum_k a_k h_k + c) mod 2^38) * B / 2^38), a_k, c ~ U[0, 2^38). For
# power-of-two B <= 2^18 that is the top log2(B) bits: strongly universal for 21-bit inputs
# (38 >= 21 + 18 - 1), so distinct cells share a bucket with probability exactly 1/B. For
# other B the bucket follows the top 18 bits up to boundary effects: 1/B + O(2^-18).
_WORD_BITS = 38
_WORD_MASK = (1 << _WORD_BITS) - 1
_CHUNK_ROWS = 8192
_DEVICE_CHUNK_ROWS = 65536
_F32_EPS = float(np.finfo(np.float32).eps)
_LOG_GROUP = 8


class SketchParams(StrictModel):
    """Parameters and seed of a RACE sketch: together they are its identity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hash: HashFamily = Field(
        "pstable",
        description="LSH family: 'pstable' (p-stable L2, kernel p(c / width)^K) or 'angular' "
        "(sign random projections, kernel (1 - angle / pi)^K, B = 2^K buckets, no width).",
    )
    dim: int = Field(..., ge=1, le=1 << 16, description="Embedding dimension (e.g. 384).")
    rows: int = Field(200, ge=1, le=1 << 12, description="R independent rows; variance ~1/R.")
    hashes_per_row: int = Field(
        2,
        ge=1,
        le=MAX_HASHES_PER_ROW,
        description="K concatenated p-stable hashes per row: the kernel is p(c)^K, so a "
        "larger K gives a sharper kernel.",
    )
    buckets: int = Field(
        4096,
        ge=2,
        le=MAX_BUCKETS,
        description="B buckets per row; rehash collisions add ~n/B to every score.",
    )
    width: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="p-stable bucket width (bandwidth) in the L2-normalised embedding space.",
    )
    seed: int = Field(0, ge=0, lt=1 << 63, description="Seed of the hash functions.")

    @model_validator(mode="after")
    def _bounded(self) -> SketchParams:
        """Keep counts (R x B int64) and projections (R*K x dim) within a sane memory size;
        params also arrive from decoded bytes."""
        if self.rows * self.buckets > MAX_COUNTS:
            raise ValueError(f"rows * buckets must be <= {MAX_COUNTS} (1 GiB of counts)")
        if self.rows * self.hashes_per_row * self.dim > MAX_PROJECTION_ENTRIES:
            raise ValueError(f"rows * hashes_per_row * dim must be <= {MAX_PROJECTION_ENTRIES}")
        if self.hash == "angular":
            if self.buckets != 1 << self.hashes_per_row:
                raise ValueError(
                    "an angular sketch has one bucket per K-bit sign pattern: buckets must be "
                    f"2^{self.hashes_per_row} = {1 << self.hashes_per_row}, got {self.buckets}"
                )
            if self.width != ANGULAR_WIDTH:
                raise ValueError(
                    f"an angular sketch has no width (K is its bandwidth): width must be "
                    f"{ANGULAR_WIDTH}, got {self.width}"
                )
        return self

    @property
    def scheme(self) -> str:
        """The hash construction these params are hashed with (``HASH_SCHEMES``)."""
        return HASH_SCHEMES[self.hash]

    def fingerprint(self) -> str:
        """Stable hex digest of every parameter, the seed and the hash scheme (the family
        is in the scheme, so p-stable fingerprints are those of the releases before it)."""
        doc = json.dumps(
            {"scheme": self.scheme, **self.model_dump(exclude={"hash"})},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.blake2b(doc.encode(), digest_size=16).hexdigest()


class _Hasher:
    """The R x K p-stable projections and the rehash, drawn from the seed.

    Projection j = k * R + r is the k-th hash of row r. Everything is laid out hash-major,
    (R*K, n), so that the K blocks combined by the rehash are contiguous.
    """

    def __init__(self, params: SketchParams, device: torch.device | None = None) -> None:
        r, k, b = params.rows, params.hashes_per_row, params.buckets
        dev = torch.device("cpu") if device is None else device
        # The draw order is part of HASH_SCHEME: never reorder these lines.
        rng = np.random.default_rng(params.seed)
        w = rng.standard_normal((r * k, params.dim)) / params.width
        offset = rng.uniform(0.0, 1.0, r * k)  # b / width ~ U[0, 1)
        mult = rng.integers(0, 1 << _WORD_BITS, size=(k, r, 1), dtype=np.int64)
        add = rng.integers(0, 1 << _WORD_BITS, size=(r, 1), dtype=np.int64)

        bound = float(np.linalg.norm(w, axis=1).max()) + 1.0  # >= |projection| of a unit x
        if bound >= _HASH_ABS_LIMIT - 1:
            raise InvalidArgument(
                f"sketch width {params.width} is too small for dim {params.dim}: hash values "
                f"would reach {bound:.3g} (limit {_HASH_ABS_LIMIT:.0f})"
            )
        self.params = params
        self.device = dev
        self._w32 = torch.from_numpy(w.astype(np.float32)).to(dev)
        self._w64 = torch.from_numpy(w).to(dev)
        self._b32 = torch.from_numpy(offset.astype(np.float32)[:, None]).to(dev)
        self._b64 = torch.from_numpy(offset).to(dev)
        self._mult = torch.from_numpy(mult).to(dev)
        self._add = torch.from_numpy(add).to(dev)
        self._row_base = torch.arange(r, dtype=torch.int64, device=dev)[:, None] * b
        # The float32 error of a projection, in units of eps32 * bound, measured at most 2
        # on CPU (dims 8 to 1024, inputs scaled 0.01 to 100, batches of 1 (gemv) and 20,000
        # (gemm)). Projections within 16 units of a cell boundary are recomputed; on a GPU
        # (other kernels, other summation orders, never TF32: see _project) 64 units.
        units = 16.0 if dev.type == "cpu" else 64.0
        self._margin = units * _F32_EPS * bound
        shift = _WORD_BITS - (b.bit_length() - 1)
        self._pow2_shift = shift if b & (b - 1) == 0 else None

    def flat_ids(self, x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """(n, dim) float32 and their norms -> (R, n) int64 index into the flat R x B counts."""
        p = self.params
        h = self._cells(x, norms).to(torch.int64)  # (K*R, n), exact: |h| < 2^20
        acc = h[: p.rows] * self._mult[0]  # int64 products: exact, |a * h| < 2^58
        for k in range(1, p.hashes_per_row):  # fused multiply-add, no temporary
            acc.addcmul_(h[k * p.rows : (k + 1) * p.rows], self._mult[k])
        acc += self._add
        if self._pow2_shift is not None:  # same function as below, cheaper for B = 2^l
            acc >>= self._pow2_shift
            acc &= p.buckets - 1
        else:  # fast range: floor((v mod 2^38) * B / 2^38)
            acc &= _WORD_MASK
            acc *= p.buckets
            acc >>= _WORD_BITS
        acc += self._row_base
        return acc

    def _cells(self, x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """floor(w . x/|x| + b) per (hash, point), as integer-valued float32 (R*K, n)."""
        inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
        # Normalising the (n, dim) points is cheaper than scaling the (R*K, n) projections,
        # and the offset rides along in the matmul: w . (x/|x|) + b in one product. Its
        # float32 error stays within a few units of the margin below (see _near_boundary).
        proj = self._project(x * inv[:, None])
        cells = torch.floor(proj)
        frac = proj.sub_(cells)
        cols, pts = self._near_boundary(frac)
        if pts.numel():
            cells[cols, pts] = self._exact_cells(x, norms, cols, pts)
        return cells

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """w . x + b in float32 (``_float32_product``)."""
        return _float32_product(self._w32, x, self._b32)

    def _near_boundary(self, frac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hash, point) indices whose fractional part is within the margin of 0 or 1. One
        min/max pass finds the few points concerned; only their columns are searched."""
        lo, hi = frac.amin(dim=0), frac.amax(dim=0)  # (aminmax is 8x slower here)
        (points,) = torch.logical_or(lo < self._margin, hi > 1.0 - self._margin).nonzero(
            as_tuple=True
        )
        sub = frac.index_select(1, points)
        cols, j = torch.logical_or(sub < self._margin, sub > 1.0 - self._margin).nonzero(
            as_tuple=True
        )
        return cols, points.index_select(0, j)

    def _exact_cells(
        self, x: torch.Tensor, norms: torch.Tensor, cols: torch.Tensor, pts: torch.Tensor
    ) -> torch.Tensor:
        """The cells of the given (hash, point) pairs, computed in float64."""
        xs = x.index_select(0, pts).to(torch.float64)
        dots = (xs * self._w64.index_select(0, cols)).sum(dim=1)
        n64 = torch.linalg.vector_norm(xs, dim=1)
        zero = norms.index_select(0, pts) == 0  # the float32 norm decides, as in _cells
        scaled = torch.where(zero, torch.zeros_like(dots), dots / torch.where(zero, 1.0, n64))
        return torch.floor(scaled + self._b64.index_select(0, cols)).to(torch.float32)


class _AngularHasher:
    """R x K Gaussian directions drawn from the seed (sign random projections, Charikar
    2002). Row r's bucket is the K-bit code of the signs of w_{k,r} . x, so two points at
    angle theta share it with probability (1 - theta / pi)^K exactly: B = 2^K buckets, one
    per code, and no rehash (no collisions between codes, no n/B background).

    Projection j = k * R + r is the k-th direction of row r, as in ``_Hasher``. A sign is
    decided in float32 unless the projection is within the rounding margin of 0, where it
    is recomputed in float64 (the same batch- and machine-independence argument).
    """

    def __init__(self, params: SketchParams, device: torch.device | None = None) -> None:
        r, k = params.rows, params.hashes_per_row
        dev = torch.device("cpu") if device is None else device
        # The draw order is part of ANGULAR_SCHEME: never reorder these lines.
        rng = np.random.default_rng(params.seed)
        w = rng.standard_normal((r * k, params.dim))
        bound = float(np.linalg.norm(w, axis=1).max())  # >= |projection| of a unit x
        self.params = params
        self.device = dev
        self._w32 = torch.from_numpy(w.astype(np.float32)).to(dev)
        self._w64 = torch.from_numpy(w).to(dev)
        self._row_base = torch.arange(r, dtype=torch.int64, device=dev)[:, None] * params.buckets
        units = 16.0 if dev.type == "cpu" else 64.0  # see _Hasher
        self._margin = units * _F32_EPS * bound

    def flat_ids(self, x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """(n, dim) float32 and their norms -> (R, n) int64 index into the flat R x B counts."""
        p = self.params
        inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
        proj = _float32_product(self._w32, x * inv[:, None])  # (K*R, n); the origin: all 0
        signs = proj >= 0
        mag = proj.abs_()
        # one min pass finds the few points with a projection within the margin of 0;
        # only their columns are searched
        (points,) = (mag.amin(dim=0) < self._margin).nonzero(as_tuple=True)
        if points.numel():
            cols, j = (mag.index_select(1, points) < self._margin).nonzero(as_tuple=True)
            pts = points.index_select(0, j)
            xs = x.index_select(0, pts).to(torch.float64)  # the sign ignores |x|
            signs[cols, pts] = (xs * self._w64.index_select(0, cols)).sum(dim=1) >= 0
        bits = signs.view(p.hashes_per_row, p.rows, -1)
        code = bits[0].to(torch.int32)  # (R, n): bit k of row r's code is sign k
        for k in range(1, p.hashes_per_row):
            code.add_(bits[k].to(torch.int32), alpha=1 << k)
        return code.to(torch.int64).add_(self._row_base)


def _float32_product(
    w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """w . x (+ bias) in float32. On CUDA, full float32 precision is forced for the product:
    TF32 (10-bit mantissa) would move far more projections across cell boundaries (or
    signs) than the float64 recomputation margin covers."""

    def product() -> torch.Tensor:
        return torch.mm(w, x.t()) if bias is None else torch.addmm(bias, w, x.t())

    if w.device.type != "cuda" or torch.get_float32_matmul_precision() == "highest":
        return product()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return product()
    finally:
        torch.set_float32_matmul_precision(previous)


@functools.lru_cache(maxsize=16)
def _hasher_for(params: SketchParams, device: str = "cpu") -> _Hasher | _AngularHasher:
    """Hash functions are a pure function of the params: build them once per process and
    device."""
    if params.hash == "angular":
        return _AngularHasher(params, torch.device(device))
    return _Hasher(params, torch.device(device))


def resolve_device(device: str) -> torch.device:
    """A torch device for hashing; 'cuda' without a visible GPU is a configuration error,
    never a silent fall-back to the CPU."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as exc:
        raise InvalidArgument(f"bad sketch device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"sketch device {device!r} requested but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"sketch device must be cpu or cuda, got {device!r}")
    return dev


def _as_points(x: np.ndarray, dim: int) -> np.ndarray:
    """Validate shape and return a C-contiguous, writable float32 (N, dim) array."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InvalidArgument(f"expected embeddings of shape (N, {dim}), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"embeddings must be numeric, got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    return out if out.flags.writeable else out.copy()


class RaceSketch:
    """R x B int64 counts of the points added, with their ``SketchParams``.

    Counts are int64: a row sums to n, and a hot bucket of a 10^10-point corpus would
    overflow int32. The arrays stay small (200 x 4096 x 8 B = 6.5 MB).
    """

    def __init__(
        self,
        params: SketchParams,
        counts: np.ndarray | None = None,
        n: int | None = None,
        *,
        device: str = "cpu",
        tensor_counts: bool | None = None,
    ) -> None:
        self.params = params
        dev = resolve_device(device)
        self._hasher = _hasher_for(params, str(dev))
        #: Count and look up on the hashing device with torch (bincount, gather) instead of
        #: in place on the host array: the GPU path (default there). The counts array stays
        #: the truth; ``tensor_counts=True`` on the CPU runs the same code, for tests.
        self.tensor_counts = dev.type != "cpu" if tensor_counts is None else tensor_counts
        shape = (params.rows, params.buckets)
        if counts is None:
            self.counts = np.zeros(shape, dtype=np.int64)
        else:
            self.counts = _checked_counts(counts, shape)
        totals = self.counts.sum(axis=1)
        inferred = int(totals[0])
        if not np.all(totals == inferred):
            raise InvalidArgument("every row of a sketch must count the same points")
        if n is not None and n != inferred:
            raise InvalidArgument(f"n={n} but the rows count {inferred} points")
        #: Points added: every row sums to n (``n=None`` takes it from the counts).
        self.n = inferred

    @classmethod
    def empty_like(cls, template: RaceSketch | SketchParams) -> RaceSketch:
        """An empty sketch with the same identity as ``template`` (a sketch or params)."""
        if isinstance(template, RaceSketch):
            return cls(template.params, device=str(template.device))
        return cls(template)

    @property
    def fingerprint(self) -> str:
        return self.params.fingerprint()

    @property
    def device(self) -> torch.device:
        """Where points are hashed (not part of the identity: every device hashes alike)."""
        return self._hasher.device

    def bucket_ids(self, x: np.ndarray) -> np.ndarray:
        """(N, dim) embeddings -> (N, rows) int64 bucket index (0..B-1) per row."""
        row_base = np.arange(self.params.rows, dtype=np.int64) * self.params.buckets
        out = np.empty((len(x), self.params.rows), dtype=np.int64)
        for start, ids in self._chunk_ids(x):
            out[start : start + ids.shape[1]] = ids.cpu().numpy().T - row_base
        return out

    def add(self, x: np.ndarray) -> None:
        """Count every point: one bucket per row. All or nothing: a bad batch raises
        before anything is counted."""
        flat = torch.from_numpy(self.counts).view(-1)
        added = 0
        if self.tensor_counts:  # on the device: one histogram, copied back once
            delta = torch.zeros(flat.numel(), dtype=torch.int64, device=self.device)
            for _, ids in self._chunk_ids(x):
                delta += torch.bincount(ids.view(-1), minlength=flat.numel())
                added += ids.shape[1]
            flat += delta.cpu()
        else:
            ones = torch.ones(self.params.rows * self._chunk, dtype=torch.int64)
            for _, ids in self._chunk_ids(x):
                flat.scatter_add_(0, ids.view(-1), ones[: ids.numel()])
                added += ids.shape[1]
        self.n += added

    def score(self, x: np.ndarray, *, exclude_self: bool = False) -> np.ndarray:
        """(N,) float64: mean over rows of the counts in x's buckets.

        A point that was added counts itself once in every row, so its score is >= 1;
        ``exclude_self=True`` subtracts that 1, for scoring points known to be in the
        sketch (pass 2 of a two-pass run) as if against all the *other* points.
        """
        flat = torch.from_numpy(self.counts).view(-1)
        if self.tensor_counts:
            flat = flat.to(self.device)
        out = np.empty(len(x), dtype=np.float64)
        for start, ids in self._chunk_ids(x):
            out[start : start + ids.shape[1]] = flat.take(ids).sum(dim=0).cpu().numpy()
        out /= self.params.rows
        if exclude_self:
            out -= 1.0
        return out

    def estimate_density(
        self, x: np.ndarray, *, plus_one: bool = False, exclude_self: bool = False
    ) -> np.ndarray:
        """(N,) float64: the geometric mean G over rows of x's bucket counts, each floored at
        1 (``plus_one=True``: of count + 1, as if x were added first). ``exclude_self=True``
        gives G - 1, floored at ``others_floor``: the *other* points near x, for a point that
        is in the sketch (or, with ``plus_one``, about to be). The density stage ranks and
        samples by this, not by the mean.

        Why: a row's count is a product-like quantity (x's cell must catch its neighbours
        in all K projections at once), so its error is multiplicative and heavy-tailed: a
        few rows whose cell happens to hold a whole dense region dominate the mean. The mean
        of logs damps them. It is not an unbiased KDE (it sits below ``estimate_kde`` by a
        factor that depends on the row dispersion, ~0.6 on ``bench.density``'s data), but
        density sampling only uses ratios of densities (c is calibrated on the same
        estimates), and those it tracks better: on 1M points with R=100, rank correlation
        with the exact KDE 0.95 against the mean's 0.90, at the same hashing cost (the
        counts are the same; only the reduction over R differs). The rehash background n/B
        stays in (subtracting it before the log amplifies the noise of sparse points).

        Why exclude x itself: every point counts itself once in every row, a constant 1 that
        compresses every ratio of densities towards 1 (a point with 0.2 others' worth of
        kernel mass and one with 2 read 1.2 and 3, not 0.2 and 2), most for the sparse
        points inverse-density sampling exists to keep. On ``bench.coverage``'s two-domain
        corpus it lifts the rare domain's kept share from 1.47x to ~1.64x the random rate.
        """
        flat = torch.from_numpy(self.counts).view(-1)
        if self.tensor_counts:
            flat = flat.to(self.device)
        rows = self.params.rows
        out = np.empty(len(x), dtype=np.float64)
        for start, ids in self._chunk_ids(x):
            counts = flat.take(ids)
            if plus_one:
                counts += 1
            c = counts.clamp_(min=1).to(torch.float64)
            # log of products of up to 8 rows (< 2^504 for int64 counts: no overflow), so 8x
            # fewer logs; elementwise products in a fixed order keep a point's value
            # independent of its batch
            prod = c[0::_LOG_GROUP].clone()
            for j in range(1, _LOG_GROUP):
                part = c[j::_LOG_GROUP]
                prod[: len(part)] *= part
            logs = prod.log_().sum(dim=0)
            out[start : start + ids.shape[1]] = logs.div_(rows).exp_().cpu().numpy()
        if exclude_self:
            np.maximum(out - 1.0, self.others_floor, out=out)
        return out

    @property
    def others_floor(self) -> float:
        """2^(1/R) - 1: the least positive value of G - 1 (one other point in one row), the
        floor of ``estimate_density(exclude_self=True)``: a point alone in every row reads
        as if it had that much company, so 1 / density stays finite."""
        return float(2.0 ** (1.0 / self.params.rows) - 1.0)

    def estimate_kde(self, x: np.ndarray, *, exclude_self: bool = False) -> np.ndarray:
        """``score`` with the rehash bias removed: an unbiased estimate of sum_y k(x, y).

        E[score] = KDE + (n - KDE) / B, so KDE = (score - n / B) * B / (B - 1). Can be
        slightly negative for an isolated query (it is an estimate). An angular sketch has
        no rehash: its score is already unbiased.
        """
        b = float(self.params.buckets)
        raw = self.score(x, exclude_self=exclude_self)
        if self.params.hash == "angular":
            return raw
        others = self.n - 1 if exclude_self else self.n
        return (raw - others / b) * (b / (b - 1.0))

    def merge(self, other: RaceSketch) -> RaceSketch:
        """A new sketch counting the points of both (exact: counts add)."""
        self._check_compatible(other)
        return RaceSketch(
            self.params, self.counts + other.counts, self.n + other.n, device=str(self.device)
        )

    def merge_into(self, other: RaceSketch) -> None:
        """Add ``other``'s counts to this sketch in place."""
        self._check_compatible(other)
        self.counts += other.counts
        self.n += other.n

    def _check_compatible(self, other: RaceSketch) -> None:
        if not isinstance(other, RaceSketch):
            raise InvalidArgument(f"can only merge a RaceSketch, not {type(other).__name__}")
        if other.params != self.params:
            mine, theirs = self.params.model_dump(), other.params.model_dump()
            diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
            if set(diff) == {"width"}:
                raise FailedPrecondition(
                    f"cannot merge sketches with different bandwidths: width {self.params.width} "
                    f"vs {other.params.width} (their kernels differ, so their counts do not "
                    "add up). Parts of one sketch must share one width: pin sketch.width, or "
                    "let pass 1 pin 'auto' once per version"
                )
            raise FailedPrecondition(
                f"cannot merge sketches with different params/seed "
                f"({self.fingerprint} vs {other.fingerprint}; differing: {diff})"
            )

    def _chunk_ids(self, x: np.ndarray) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, (R, n) flat ids) per chunk; validates the whole batch before the first."""
        pts = torch.from_numpy(_as_points(x, self.params.dim))
        norms = torch.linalg.vector_norm(pts, dim=1)
        if not bool(torch.isfinite(norms).all()):
            raise InvalidArgument("embeddings must be finite (a NaN, inf or overflow was found)")
        dev = self.device
        for start in range(0, len(pts), self._chunk):
            stop = start + self._chunk
            chunk, chunk_norms = pts[start:stop], norms[start:stop]
            if dev.type != "cpu":
                chunk, chunk_norms = chunk.to(dev, non_blocking=True), chunk_norms.to(dev)
            yield start, self._hasher.flat_ids(chunk, chunk_norms)

    @property
    def _chunk(self) -> int:
        """Points hashed per matmul: cache-sized on a CPU, large on a GPU."""
        return _CHUNK_ROWS if self.device.type == "cpu" else _DEVICE_CHUNK_ROWS

    def to_bytes(self) -> bytes:
        """Self-describing bytes: magic, a JSON header (format, params, fingerprint, n,
        dtype, shape, CRC-32), then the zlib-compressed little-endian counts."""
        payload = zlib.compress(self.counts.astype("<i8", copy=False).tobytes(), level=1)
        header = {
            "format": FORMAT_VERSION,
            "hash_scheme": self.params.scheme,
            "params": self.params.model_dump(),
            "fingerprint": self.fingerprint,
            "n": self.n,
            "dtype": "<i8",
            "shape": [self.params.rows, self.params.buckets],
            "compression": "zlib",
            "payload_bytes": len(payload),
            "crc32": zlib.crc32(payload),
        }
        head = json.dumps(header, sort_keys=True).encode()
        return _MAGIC + struct.pack("<I", len(head)) + head + payload

    @classmethod
    def from_bytes(cls, data: bytes) -> RaceSketch:
        """Decode ``to_bytes`` output; anything else raises DecodeError saying why."""
        header, payload = _split(bytes(data))
        params = _header_params(header)
        counts = _decode_counts(header, payload, params)
        try:
            return cls(params, counts, int(header["n"]))
        except InvalidArgument as exc:
            raise DecodeError(f"inconsistent sketch: {exc.message}") from exc


def _checked_counts(counts: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(counts)
    if arr.shape != shape:
        raise InvalidArgument(f"sketch counts must have shape {shape}, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"sketch counts must be integers, got {arr.dtype}")
    if arr.size and int(arr.min()) < 0:
        raise InvalidArgument("sketch counts must be non-negative")
    return np.array(arr, dtype=np.int64, order="C")  # a private, writable copy


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Magic and header length, then the JSON header and the payload behind it."""
    fixed = len(_MAGIC) + 4
    if len(data) < fixed or not data.startswith(_MAGIC):
        raise DecodeError("not a RACE sketch (missing the SLUICE-RACE magic)")
    (head_len,) = struct.unpack_from("<I", data, len(_MAGIC))
    if head_len > _MAX_HEADER_BYTES or fixed + head_len > len(data):
        raise DecodeError(f"truncated or corrupt sketch header ({head_len} bytes declared)")
    try:
        header = json.loads(data[fixed : fixed + head_len].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"corrupt sketch header: {exc}") from exc
    if not isinstance(header, dict):
        raise DecodeError("corrupt sketch header: not a JSON object")
    return header, data[fixed + head_len :]


def _header_params(header: dict[str, Any]) -> SketchParams:
    if header.get("format") != FORMAT_VERSION:
        raise DecodeError(
            f"unsupported sketch format {header.get('format')!r} (this build reads "
            f"{FORMAT_VERSION})"
        )
    if header.get("hash_scheme") not in HASH_SCHEMES.values():
        raise DecodeError(
            f"sketch was hashed with {header.get('hash_scheme')!r}, this build hashes with "
            f"{' or '.join(repr(v) for v in HASH_SCHEMES.values())}: its counts cannot be used"
        )
    try:
        params = SketchParams.model_validate(header.get("params"))
    except ValidationError as exc:
        raise DecodeError(f"invalid sketch params in header: {exc}") from exc
    if header["hash_scheme"] != params.scheme:
        raise DecodeError(
            f"sketch header says it was hashed with {header['hash_scheme']!r} but its params "
            f"are of the {params.hash!r} family (corrupt header)"
        )
    if header.get("fingerprint") != params.fingerprint():
        raise DecodeError("sketch fingerprint does not match its params (corrupt header)")
    return params


def _decode_counts(header: dict[str, Any], payload: bytes, params: SketchParams) -> np.ndarray:
    shape = [params.rows, params.buckets]
    if header.get("dtype") != "<i8" or header.get("shape") != shape:
        raise DecodeError(
            f"sketch counts must be <i8 {shape}, header says "
            f"{header.get('dtype')} {header.get('shape')}"
        )
    if header.get("compression") != "zlib":
        raise DecodeError(f"unknown sketch compression {header.get('compression')!r}")
    if not isinstance(header.get("n"), int) or header["n"] < 0:
        raise DecodeError(f"invalid point count n={header.get('n')!r}")
    if len(payload) != header.get("payload_bytes"):
        raise DecodeError(
            f"truncated sketch: {len(payload)} payload bytes, header says "
            f"{header.get('payload_bytes')}"
        )
    if zlib.crc32(payload) != header.get("crc32"):
        raise DecodeError("corrupt sketch: payload CRC-32 mismatch")
    expected = params.rows * params.buckets * 8
    try:
        raw = zlib.decompressobj().decompress(payload, expected + 1)
    except zlib.error as exc:
        raise DecodeError(f"corrupt sketch payload: {exc}") from exc
    if len(raw) != expected:
        raise DecodeError(f"corrupt sketch payload: {len(raw)} bytes, expected {expected}")
    counts = np.frombuffer(raw, dtype="<i8").reshape(params.rows, params.buckets)
    if int(counts.min()) < 0:
        raise DecodeError("corrupt sketch: negative counts")
    return counts
