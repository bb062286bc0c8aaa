"""Choosing the sketch's kernel width from the data (``sketch.width: auto``).

A RACE sketch estimates the KDE of the collision kernel k(c) = p(c / width)^K (see
``services.density.exact``): the width and K are the bandwidth. Too wide a kernel and
every score is a flat background of the whole corpus, so densities barely differ and the
sampler degrades to uniform; too narrow and every point looks isolated and the sketch's
noise decides. Where "wide" begins depends on the embedding model and on the corpus (how
close neighbours are), so the width is read off the data, as KDE practice reads a
bandwidth off the sample's spacing.

**The rule** (``spread``, the default). Take a uniform sample (the stage's calibration
sample: bottom-k by hashed id, at most 2,048 points used), and for widths on a log grid
compute every sample point's density under the sketch's own kernel p^K, as the stage does
(itself included, so ``1 + sum_j k(x, y_j)``). Choose the width that maximises the spread
(standard deviation) of log-density: at the extremes every point gets the same density
(a too-narrow kernel sees only itself, a too-wide one the whole sample) and inverse-density
sampling degrades to uniform; in between, the spread is what the sampler acts on. On the
coverage benchmark's real text (``bench.coverage``) the width of maximal spread is also the
one whose exact-KDE sampling keeps the rare domains best, for every K tried.

The sample stands for the corpus: a corpus much larger than the sample has more close
neighbours per point, and its best kernel is somewhat narrower than the sample's. The
choice is made once and pinned, so that moves the choice, never breaks merging.

**The alternative** (``nn_quantile``): the width at which the kernel equals ``kernel`` at
the ``quantile`` of the sample's nearest-neighbour distances,

    p(d_q / width)^K = kernel   =>   width = d_q * t*,   p(1 / t*) = kernel^(1/K),

a classic spacing-based bandwidth, cheaper and sample-size sensitive (nearest neighbours
are closer in a bigger sample).

**Angular sketches** (``sketch.hash: angular``) have no width: their kernel
(1 - angle / pi)^K has K as its only bandwidth, so ``auto`` chooses K (1 to 14) by the same
rules: ``spread`` maximises the spread of log-density over K; ``nn_quantile`` takes the K
at which the kernel equals ``kernel`` at the ``quantile`` of nearest-neighbour distances.

The choice is recorded: ``BandwidthChoice`` goes into the pass-1 pin and the report, and
the width into the sketch's params (its fingerprint), so sketches with different widths
never merge.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from services.density.exact import angular_kernel_tensor, collision_probability, kernel_tensor
from services.density.sketch import ANGULAR_WIDTH
from services.runtime.errors import InvalidArgument

RULES = ("spread", "nn_quantile")
SPREAD_SAMPLE = 2048
"""At most this many sample points are used by the spread rule (O(m^2) per width)."""
_GRID = np.geomspace(0.5, 16.0, 21)
"""Widths tried by the spread rule, in units of the sample's median neighbour distance."""
FALLBACK_WIDTH = 1.0
"""Width used when a sample has no two distinct points (nothing to read a scale from)."""
FALLBACK_HASHES = 8
"""K of an angular sketch whose sample has no two distinct points."""
MAX_AUTO_HASHES = 14
"""The largest K an 'auto' rule picks for an angular sketch: its counts are R x 2^K int64
(13 MB at R=100, K=14; a pass-1 worker holds one sketch per partition it owns). A K up to
16 can be set by hand."""
_K_GRID = np.arange(1, MAX_AUTO_HASHES + 1)
"""K tried by the spread rule for an angular sketch."""
_BLOCK = 1024


@dataclass(frozen=True, slots=True)
class BandwidthChoice:
    """A chosen width and what it was chosen from."""

    width: float
    rule: str
    sample: int
    quantile: float
    kernel: float
    neighbour_distance: float
    """The sample's nearest-neighbour distance at ``quantile`` (0 for the fallback)."""
    hashes_per_row: int = 0
    """K, when it is what was chosen (an angular sketch, whose width is the constant
    ``ANGULAR_WIDTH``); 0 when K is configured and only the width was chosen."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> BandwidthChoice:
        try:
            return cls(
                float(doc["width"]),
                str(doc["rule"]),
                int(doc["sample"]),
                float(doc["quantile"]),
                float(doc["kernel"]),
                float(doc["neighbour_distance"]),
                int(doc.get("hashes_per_row", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"not a bandwidth choice: {exc}") from exc


def nearest_neighbour_distances(sample: np.ndarray) -> np.ndarray:
    """(N,) distance from each L2-normalised row to its nearest *distinct* other row (inf
    when there is none), in blocks so a 10,000-point sample needs ~80 MB, not 800."""
    arr = np.asarray(sample)
    if arr.ndim != 2 or len(arr) < 2:
        raise InvalidArgument("need at least two sample embeddings, shape (N, dim)")
    x = torch.from_numpy(np.array(arr, dtype=np.float64))
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        raise InvalidArgument("sample embeddings must be finite")
    x /= torch.where(norms > 0, norms, torch.ones_like(norms))
    sq_norms = (x * x).sum(dim=1)
    out = torch.empty(len(x), dtype=torch.float64)
    for start in range(0, len(x), _BLOCK):
        q = x[start : start + _BLOCK]
        sq = torch.addmm(sq_norms[None, :], q, x.t(), alpha=-2.0).add_(
            sq_norms[start:][: len(q), None]
        )
        sq.clamp_(min=0.0)
        sq[sq < 1e-12] = math.inf  # itself and exact duplicates carry no scale
        out[start : start + len(q)] = sq.min(dim=1).values
    return out.sqrt_().numpy()


def kernel_scale(kernel: float, hashes_per_row: int) -> float:
    """t* = width / distance at which p(distance / width)^K equals ``kernel``."""
    if not 0.0 < kernel < 1.0:
        raise InvalidArgument(f"kernel value must be in (0, 1), got {kernel}")
    if hashes_per_row < 1:
        raise InvalidArgument(f"hashes_per_row must be >= 1, got {hashes_per_row}")
    target = kernel ** (1.0 / hashes_per_row)  # per-hash collision probability
    lo, hi = 1e-6, 1e6  # p(1 / t) increases with t
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        p = float(collision_probability(np.array([1.0 / mid]), 1.0, 1)[0])
        lo, hi = (mid, hi) if p < target else (lo, mid)
    return math.sqrt(lo * hi)


def log_density_spread(sample: np.ndarray, widths: np.ndarray, hashes_per_row: int) -> np.ndarray:
    """std of log(sum_j p(d_ij / w)^K) over the sample (j = i included: k = 1), per width."""
    x = torch.from_numpy(np.array(sample, dtype=np.float32))
    x /= torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_(min=1e-30)
    out = np.empty(len(widths))
    sums = torch.empty(len(widths), len(x), dtype=torch.float64)
    sums.fill_(0.0)
    for start in range(0, len(x), _BLOCK):
        q = x[start : start + _BLOCK]
        dist = (2.0 - 2.0 * (q @ x.t())).clamp_(min=0.0).sqrt_()
        dist[torch.arange(len(q)), torch.arange(start, start + len(q))] = 0.0  # itself: k = 1
        for i, w in enumerate(widths):
            k = kernel_tensor(dist.clone(), float(w), hashes_per_row)
            sums[i, start : start + len(q)] = k.sum(dim=1, dtype=torch.float64)
    for i in range(len(widths)):
        out[i] = float(torch.log(sums[i]).std())
    return out


def _spacing(sample: np.ndarray, rule: str, quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """Check the rule's arguments; (the sample the rule reads, its finite nearest-neighbour
    distances): the spread rule reads at most ``SPREAD_SAMPLE`` points."""
    if rule not in RULES:
        raise InvalidArgument(f"unknown bandwidth rule {rule!r}; known: {', '.join(RULES)}")
    if not 0.0 < quantile < 1.0:
        raise InvalidArgument(f"quantile must be in (0, 1), got {quantile}")
    arr = np.asarray(sample)
    if rule == "spread" and len(arr) > SPREAD_SAMPLE:
        arr = arr[:SPREAD_SAMPLE]  # a bottom-k sample: any prefix is uniform too
    nn = nearest_neighbour_distances(arr) if len(arr) >= 2 else np.zeros(0)
    return arr, nn[np.isfinite(nn)]


def choose_width(
    sample: np.ndarray,
    hashes_per_row: int,
    *,
    rule: str = "spread",
    quantile: float = 0.5,
    kernel: float = 0.1,
) -> BandwidthChoice:
    """The width ``rule`` picks for this sample (the module doc), rounded to 4 significant
    digits so that it reads well in a fingerprint and a manifest."""
    arr, finite = _spacing(sample, rule, quantile)
    scale = kernel_scale(kernel, hashes_per_row)
    if finite.size == 0:
        return BandwidthChoice(FALLBACK_WIDTH, "fallback", len(arr), quantile, kernel, 0.0)
    if rule == "nn_quantile":
        distance = float(np.quantile(finite, quantile))
        width = float(f"{distance * scale:.4g}")
        return BandwidthChoice(width, "nn_quantile/v1", len(arr), quantile, kernel, distance)
    distance = float(np.median(finite))
    widths = distance * _GRID
    spread = log_density_spread(arr, widths, hashes_per_row)
    best = float(widths[int(np.argmax(spread))])
    return BandwidthChoice(float(f"{best:.4g}"), "spread/v1", len(arr), 0.5, 0.0, distance)


def angular_log_density_spread(sample: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """std of log(sum_j (1 - theta_ij / pi)^K) over the sample (j = i included), per K."""
    x = torch.from_numpy(np.array(sample, dtype=np.float64))
    x /= torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_(min=1e-30)
    sums = torch.zeros(len(ks), len(x), dtype=torch.float64)
    for start in range(0, len(x), _BLOCK):
        q = x[start : start + _BLOCK]
        dist = (2.0 - 2.0 * (q @ x.t())).clamp_(min=0.0).sqrt_()
        dist[torch.arange(len(q)), torch.arange(start, start + len(q))] = 0.0  # itself: k = 1
        base = angular_kernel_tensor(dist, 1)
        for i, k in enumerate(ks):
            sums[i, start : start + len(q)] = base.pow(int(k)).sum(dim=1)
    return np.array([float(torch.log(sums[i]).std()) for i in range(len(ks))])


def choose_hashes(
    sample: np.ndarray,
    *,
    rule: str = "spread",
    quantile: float = 0.5,
    kernel: float = 0.1,
) -> BandwidthChoice:
    """K (1 to ``MAX_AUTO_HASHES``) of an angular sketch, the kernel (1 - theta / pi)^K,
    as ``rule`` picks it for this sample (the module doc); the width is the constant
    ``ANGULAR_WIDTH``."""
    if not 0.0 < kernel < 1.0:
        raise InvalidArgument(f"kernel value must be in (0, 1), got {kernel}")
    arr, finite = _spacing(sample, rule, quantile)
    if finite.size == 0:
        return BandwidthChoice(
            ANGULAR_WIDTH, "fallback", len(arr), quantile, kernel, 0.0, FALLBACK_HASHES
        )
    if rule == "nn_quantile":
        distance = float(np.quantile(finite, quantile))
        per_hash = 1.0 - 2.0 * math.asin(min(distance / 2.0, 1.0)) / math.pi
        k = math.log(kernel) / math.log(per_hash) if 0.0 < per_hash < 1.0 else 1.0
        chosen = int(min(max(round(k), 1), MAX_AUTO_HASHES))
        return BandwidthChoice(
            ANGULAR_WIDTH, "nn_quantile/angular/v1", len(arr), quantile, kernel, distance, chosen
        )
    distance = float(np.median(finite))
    spread = angular_log_density_spread(arr, _K_GRID)
    chosen = int(_K_GRID[int(np.argmax(spread))])
    return BandwidthChoice(ANGULAR_WIDTH, "spread/angular/v1", len(arr), 0.5, 0.0, distance, chosen)
