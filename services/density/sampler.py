"""Inverse-density importance sampling: keep a point with probability min(1, c / density).

Dense regions (near-duplicates, over-represented topics) are thinned, sparse ones kept, so
the kept set covers the space more evenly than a uniform sample of the same size. The
constant c is chosen so the *expected* kept fraction equals the target rate; a kept point
carries the importance weight 1 / p, so weighted sums over the kept set are unbiased
estimates of sums over the whole stream (Horvitz-Thompson).

Decisions are deterministic per (seed, sample id): the uniform draw is a keyed hash of the
id, so a sample gets the same verdict whichever worker, batch or redelivery sees it, and
the whole run replays exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from services.runtime.errors import InvalidArgument

_PERSON = b"sluice-density"
_TO_UNIT = 2.0**-53


def _scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not np.all(np.isfinite(s)):
        raise InvalidArgument("density scores must be finite")
    return s


def calibrate(scores: np.ndarray, target_rate: float) -> float:
    """The c with mean(min(1, c / score)) == target_rate, solved exactly by sorting.

    f(c) = sum_i min(1, c / s_i) is continuous, non-decreasing and piecewise linear in c,
    with breakpoints at the sorted scores, so it is evaluated at every breakpoint, the
    segment holding target_rate * N is found by binary search, and c is solved on it.
    Scores <= 0 (a point the sketch has never seen) are always kept. If those alone
    exceed the target, 0 is returned (the least that can be kept). O(N log N).
    """
    s = _scores(scores)
    if s.size == 0:
        raise InvalidArgument("cannot calibrate on no scores")
    if not 0.0 < target_rate <= 1.0:
        raise InvalidArgument(f"target rate must be in (0, 1], got {target_rate}")
    target = target_rate * s.size
    pos = np.sort(s[s > 0])
    always = s.size - pos.size  # kept whatever c is
    if pos.size == 0 or always >= target:
        return 0.0
    if target_rate == 1.0:
        return float(pos[-1])  # keep everything
    log_pos = np.log(pos)
    # log_suffix[j] = log sum_{i >= j} 1 / pos[i], in log space so that scores spanning any
    # range (1e-308 .. 1e308) neither overflow nor underflow.
    log_suffix = np.append(np.logaddexp.accumulate(-log_pos[::-1])[::-1], -np.inf)
    # f(pos[j]) = always + (j + 1) + pos[j] * suffix[j + 1]
    at_breaks = always + np.arange(1, pos.size + 1) + np.exp(log_pos + log_suffix[1:])
    j = int(np.searchsorted(at_breaks, target))  # first breakpoint with f >= target
    if j >= pos.size:
        return float(pos[-1])  # rate ~1 (up to rounding): keep everything
    # on [pos[j-1], pos[j]]: the j smallest are kept surely, the rest with c / s
    c = np.exp(np.log(target - always - j) - log_suffix[j])
    lower = pos[j - 1] if j > 0 else 0.0
    return float(min(max(c, lower), pos[j]))


def keep_probabilities(scores: np.ndarray, c: float) -> np.ndarray:
    """min(1, c / score) per point (1 where score <= 0 or score <= c)."""
    s = _scores(scores)
    if not c >= 0.0:
        raise InvalidArgument(f"sampling constant c must be >= 0, got {c}")
    out = np.ones_like(s)
    below = s > c  # c >= 0, so never a score <= 0; c = inf keeps everything
    out[below] = c / s[below]  # < 1; c / tiny s is never computed, so cannot overflow
    return out


def uniforms(sample_ids: Sequence[str], seed: int) -> np.ndarray:
    """A uniform [0, 1) draw per id: blake2b keyed by the seed, 53 bits of it."""
    if not 0 <= seed < 1 << 64:
        raise InvalidArgument(f"seed must be in [0, 2^64), got {seed}")
    key = seed.to_bytes(8, "little")
    digests = b"".join(
        hashlib.blake2b(i.encode(), digest_size=8, key=key, person=_PERSON).digest()
        for i in sample_ids
    )
    bits = np.frombuffer(digests, dtype="<u8") >> np.uint64(11)
    return bits.astype(np.float64) * _TO_UNIT


def decide(sample_ids: Sequence[str], probs: np.ndarray, seed: int) -> np.ndarray:
    """Keep (True) each sample with its probability, deterministically per (seed, id)."""
    p = np.asarray(probs, dtype=np.float64).ravel()
    if len(sample_ids) != p.size:
        raise InvalidArgument(f"{len(sample_ids)} sample ids for {p.size} probabilities")
    if np.any(np.isnan(p)) or np.any(p < 0) or np.any(p > 1):
        raise InvalidArgument("keep probabilities must lie in [0, 1]")
    return uniforms(sample_ids, seed) < p


def importance_weights(probs: np.ndarray) -> np.ndarray:
    """1 / p: the weight a kept sample carries (inf where p == 0; such are never kept)."""
    p = np.asarray(probs, dtype=np.float64)
    out = np.full_like(p, np.inf)
    np.divide(1.0, p, out=out, where=p > 0)
    return out
