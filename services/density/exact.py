"""The kernel a RACE sketch estimates, evaluated exactly: the reference for tests and bench.

**The kernel.** For one p-stable L2 hash h(x) = floor((w . x + b) / width) with
w ~ N(0, I), b ~ U[0, width), two points at distance c collide with probability
(Datar, Immorlica, Indyk & Mirrokni 2004)

    p(c) = 1 - 2 Phi(-t) - 2 / (sqrt(2 pi) t) * (1 - exp(-t^2 / 2)),   t = width / c,

with p(0) = 1. A sketch row concatenates K hashes, so its collision kernel is
k(c) = p(c)^K, and the sketch's score estimates KDE(q) = sum_y k(||q - y||)
(plus the rehash term (n - KDE) / B, see ``services.density.sketch``).

**How width and K set the bandwidth.** p depends on c only through c / width. Near 0,
p(c)^K ~ exp(-0.8 K c / width): a Laplacian bump of scale width / (0.8 K). Far away,
p(c) ~ 0.4 width / c: a heavy tail, which p^K cuts to (0.4 width / c)^K. So width / K sets
the kernel's scale and K how fast its tail falls: at the same scale, a larger K (with a
proportionally larger width) means less background from far-away points. A larger width
alone widens the kernel; a larger K alone sharpens it.

**Choosing them.** On L2-normalised embeddings every distance lies in [0, 2] and unrelated
texts sit near sqrt(2). The kernel should be high between near-duplicates and close
neighbours and small across topics; with a too-wide kernel (large width, small K) every
score is dominated by a flat background of the whole corpus, so densities barely differ
and the sampler degrades to uniform (and the sketch's noise decides the ranking). A too-
narrow one makes every point look isolated. Recipe:

1. K = 4..8: p^K of a larger K has a lighter tail, so less background.
2. width from data: the stage's ``sketch.width: auto`` (``services.density.bandwidth``,
   the width that maximises the spread of log-density) is the default; the older recipe
   ``suggest_width(sample, K)`` puts the kernel at
   ``kernel_at_median`` (default 0.05) at the median nearest-neighbour distance of a
   uniform sample of a few thousand embeddings. The kernel must have decayed well by that
   distance because the corpus is far denser than the sample. On 384-d clustered data
   (``bench.density``) this lands on the width with the best agreement between sketch and
   exact KDE for each K (K=4: 0.75, K=6: 1.1, K=8: 1.4).
3. R: the estimate's variance falls as 1/R; cost grows with R * K (one R*K-column matmul
   per point). At R * K = 400, R = 50 with K = 8 ranked best.
4. B: collisions add ~n/B to every score (nearly constant, removed by
   ``RaceSketch.estimate_kde``) plus ~sqrt(n/B) noise per row; a power of two, so the rehash
   is exactly universal. Memory is R * B * 8 bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from services.density.sketch import SketchParams
from services.runtime.errors import InvalidArgument

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_QUERY_CHUNK = 256
_POINT_CHUNK = 16384


def kernel_tensor(dist: torch.Tensor, width: float, hashes_per_row: int) -> torch.Tensor:
    """p(dist)^K, elementwise, in ``dist``'s dtype. Written as erf(t / sqrt 2) and expm1 so
    that neither term cancels for large distances (small t)."""
    t = torch.reciprocal(dist).mul_(width)  # dist = 0 -> t = inf -> p = 1
    tail = torch.mul(t, t).mul_(-0.5).expm1_().div_(t).mul_(_SQRT_2_OVER_PI)
    p = t.mul_(1.0 / math.sqrt(2.0)).erf_().add_(tail).clamp_(0.0, 1.0)
    return p if hashes_per_row == 1 else p.pow_(hashes_per_row)


def angular_kernel_tensor(dist: torch.Tensor, hashes_per_row: int) -> torch.Tensor:
    """(1 - theta / pi)^K elementwise for unit vectors at L2 distance ``dist`` (in place):
    the collision probability of K sign random projections (Charikar 2002), the kernel of
    an angular sketch. theta = 2 asin(dist / 2), accurate near 0 where acos is not."""
    theta = dist.mul_(0.5).clamp_(0.0, 1.0).asin_().mul_(2.0)
    k = theta.mul_(-1.0 / math.pi).add_(1.0).clamp_(0.0, 1.0)
    return k if hashes_per_row == 1 else k.pow_(hashes_per_row)


def sketch_kernel(dist: torch.Tensor, params: SketchParams) -> torch.Tensor:
    """The kernel ``params``' sketch estimates, at L2 distances ``dist`` (unit vectors)."""
    if params.hash == "angular":
        return angular_kernel_tensor(dist, params.hashes_per_row)
    return kernel_tensor(dist, params.width, params.hashes_per_row)


def collision_probability(dist: np.ndarray, width: float, hashes_per_row: int) -> np.ndarray:
    """Probability that points at L2 distance ``dist`` share a row's K concatenated p-stable
    hashes of bucket width ``width``: p(dist)^K (float64, same shape as ``dist``)."""
    d = np.asarray(dist, dtype=np.float64)
    if width <= 0 or not math.isfinite(width):
        raise InvalidArgument(f"width must be a positive number, got {width}")
    if hashes_per_row < 1:
        raise InvalidArgument(f"hashes_per_row must be >= 1, got {hashes_per_row}")
    if np.any(np.isnan(d)) or np.any(d < 0):
        raise InvalidArgument("distances must be non-negative numbers")
    return kernel_tensor(torch.from_numpy(d.copy()), width, hashes_per_row).numpy()


def _unit(x: np.ndarray, dim: int) -> torch.Tensor:
    """Rows L2-normalised in float64 (zero rows stay zero), like the sketch hashes them."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InvalidArgument(f"expected embeddings of shape (N, {dim}), got {arr.shape}")
    t = torch.from_numpy(np.array(arr, dtype=np.float64))
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        raise InvalidArgument("embeddings must be finite")
    return t / torch.where(norms > 0, norms, torch.ones_like(norms))


def exact_kde(
    queries: np.ndarray, points: np.ndarray, params: SketchParams, *, exclude_self: bool = False
) -> np.ndarray:
    """(Q,) float64: sum over ``points`` of k(||q - y||) for every query, with the sketch's
    kernel (``sketch_kernel``: p^K, or (1 - theta / pi)^K for an angular sketch), on
    L2-normalised vectors, in float64. O(Q * N * dim): for small sets and
    references (``accumulate_kde`` streams large ones).

    ``exclude_self=True`` subtracts k(0) = 1, for queries that are among the points.
    """
    q = _unit(queries, params.dim)
    out = torch.zeros(len(q), dtype=torch.float64)
    for start in range(0, len(points), _POINT_CHUNK):
        accumulate_kde(out, q, _unit(points[start : start + _POINT_CHUNK], params.dim), params)
    result = out.numpy()
    if exclude_self:
        result -= 1.0
    return result


def accumulate_kde(
    out: torch.Tensor, queries: torch.Tensor, points: torch.Tensor, params: SketchParams
) -> None:
    """out[i] += sum_j k(||q_i - y_j||) for unit-norm tensors, computed in their dtype (float32
    is ~2x faster; its distances carry ~3e-4 of rounding near 0): the streaming form of
    ``exact_kde``, for a benchmark adding one chunk of a large stream at a time."""
    sq_p = (points * points).sum(dim=1)
    for p_start in range(0, len(points), _POINT_CHUNK):
        pts = points[p_start : p_start + _POINT_CHUNK]
        sq_pts = sq_p[p_start : p_start + _POINT_CHUNK]
        for start in range(0, len(queries), _QUERY_CHUNK):
            q = queries[start : start + _QUERY_CHUNK]
            sq = torch.addmm(sq_pts, q, pts.t(), alpha=-2.0)
            sq += (q * q).sum(dim=1, keepdim=True)
            k = sketch_kernel(sq.clamp_(min=0.0).sqrt_(), params)
            out[start : start + len(q)] += k.sum(dim=1)  # chunk sums in k's dtype


def nearest_neighbour_distances(sample: np.ndarray) -> np.ndarray:
    """(N,) distance from each L2-normalised row of ``sample`` to its nearest other row."""
    arr = np.asarray(sample)
    if arr.ndim != 2 or len(arr) < 2:
        raise InvalidArgument("need at least two sample embeddings, shape (N, dim)")
    x = torch.from_numpy(np.array(arr, dtype=np.float64))
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    x /= torch.where(norms > 0, norms, torch.ones_like(norms))
    sq_norms = (x * x).sum(dim=1)
    sq = torch.addmm(sq_norms[:, None] + sq_norms[None, :], x, x.t(), alpha=-2.0).clamp_(min=0)
    sq.fill_diagonal_(math.inf)
    return sq.min(dim=1).values.sqrt_().numpy()


def suggest_width(
    sample: np.ndarray, hashes_per_row: int, *, kernel_at_median: float = 0.05
) -> float:
    """A bucket width such that the kernel p^K at the sample's median nearest-neighbour
    distance equals ``kernel_at_median``: a data-driven bandwidth (see the module doc).

    Use a uniform sample of 1,000-10,000 embeddings; the suggestion moves by ~10% over
    that range (nearest neighbours are closer in a larger sample).
    """
    if not 0.0 < kernel_at_median < 1.0:
        raise InvalidArgument(f"kernel_at_median must be in (0, 1), got {kernel_at_median}")
    median = float(np.median(nearest_neighbour_distances(sample)))
    if median <= 0.0:
        raise InvalidArgument("the sample's median nearest-neighbour distance is 0 (duplicates)")
    target = kernel_at_median ** (1.0 / hashes_per_row)  # per-hash collision probability
    lo, hi = 1e-6, 1e6  # t = width / c; p is increasing in t
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        p = float(collision_probability(np.array([1.0]), mid, 1)[0])
        lo, hi = (mid, hi) if p < target else (lo, mid)
    return math.sqrt(lo * hi) * median
