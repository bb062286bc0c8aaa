"""Inverse-density sampling: exact calibration, binomial kept fractions, deterministic
decisions, unbiased weights, and more coverage of rare clusters than uniform sampling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.density.sampler import (
    calibrate,
    decide,
    importance_weights,
    keep_probabilities,
    uniforms,
)
from services.density.sketch import RaceSketch, SketchParams
from services.runtime.errors import InvalidArgument


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.floats(0.0, 1e6, allow_subnormal=False), min_size=1, max_size=60),
    rate=st.floats(0.01, 1.0),
)
def test_calibration_hits_the_rate_exactly(scores: list[float], rate: float) -> None:
    s = np.array(scores)
    c = calibrate(s, rate)
    probs = keep_probabilities(s, c)
    always = float(np.mean(s <= 0))
    # exact unless the never-seen points (score 0, always kept) alone exceed the rate
    assert probs.mean() == pytest.approx(max(rate, always), rel=1e-9, abs=1e-12)
    assert np.all((probs >= 0) & (probs <= 1))


def test_calibration_with_ties_and_rate_one() -> None:
    s = np.array([5.0, 5.0, 5.0, 1.0, 1.0, 20.0])
    assert keep_probabilities(s, calibrate(s, 0.5)).mean() == pytest.approx(0.5)
    assert np.all(keep_probabilities(s, calibrate(s, 1.0)) == 1.0)
    # the lowest densities are kept with certainty before anything else rises
    probs = keep_probabilities(s, calibrate(s, 0.5))
    assert np.all(probs[3:5] == 1.0) and probs[5] < probs[0]


def test_calibration_rejects_nonsense() -> None:
    for rate in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(InvalidArgument):
            calibrate(np.ones(3), rate)
    with pytest.raises(InvalidArgument):
        calibrate(np.array([]), 0.5)
    with pytest.raises(InvalidArgument):
        calibrate(np.array([1.0, np.nan]), 0.5)


def test_kept_fraction_is_binomial_around_the_target() -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    scores = rng.lognormal(3.0, 1.5, n)
    for rate in (0.05, 0.3):
        probs = keep_probabilities(scores, calibrate(scores, rate))
        kept = decide([f"doc-{i}" for i in range(n)], probs, seed=7)
        sigma = np.sqrt(np.sum(probs * (1 - probs)))
        assert abs(kept.sum() - rate * n) < 4 * sigma


def test_decisions_depend_only_on_seed_and_id() -> None:
    n = 3000
    ids = [f"sample/{i}" for i in range(n)]
    probs = np.random.default_rng(1).uniform(0, 1, n)
    whole = decide(ids, probs, seed=42)
    order = np.random.default_rng(2).permutation(n)
    pieces = np.empty(n, dtype=bool)
    for part in np.array_split(order, 7):  # other batches, other order
        pieces[part] = decide([ids[i] for i in part], probs[part], seed=42)
    assert np.array_equal(whole, pieces)
    other_seed = decide(ids, probs, seed=43)
    assert 0.2 * n < np.sum(whole != other_seed) < 0.6 * n  # independent draws
    u = uniforms(ids, seed=42)
    assert np.all((u >= 0) & (u < 1)) and abs(u.mean() - 0.5) < 0.03
    assert decide(ids[:2], np.array([0.0, 1.0]), seed=1).tolist() == [False, True]


def test_decide_rejects_bad_probabilities() -> None:
    with pytest.raises(InvalidArgument):
        decide(["a", "b"], np.array([0.5]), seed=0)
    with pytest.raises(InvalidArgument):
        decide(["a"], np.array([1.5]), seed=0)
    with pytest.raises(InvalidArgument):
        uniforms(["a"], seed=-1)


def test_importance_weights_give_unbiased_totals() -> None:
    rng = np.random.default_rng(3)
    n = 20_000
    probs = keep_probabilities(rng.lognormal(2.0, 1.0, n), calibrate(rng.lognormal(2, 1, n), 0.2))
    kept = decide([str(i) for i in range(n)], probs, seed=5)
    weights = importance_weights(probs)
    assert np.all(weights >= 1.0)
    # Horvitz-Thompson: sum of 1/p over kept estimates N; sd = sqrt(sum (1-p)/p)
    sd = np.sqrt(np.sum((1 - probs) / probs))
    assert abs(weights[kept].sum() - n) < 4 * sd
    assert importance_weights(np.array([0.0, 0.5])).tolist() == [np.inf, 2.0]


def big_and_small_clusters(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4,000 points: one cluster of 3,200 and eight of 100, in 32 dims, shuffled."""
    rng = np.random.default_rng(seed)
    sizes = [3200] + [100] * 8
    centres = rng.standard_normal((len(sizes), 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[labels] + 0.3 * rng.standard_normal((len(labels), 32)) / np.sqrt(32)
    order = rng.permutation(len(labels))
    return x[order].astype(np.float32), labels[order]


def test_inverse_density_sampling_keeps_more_of_the_small_clusters() -> None:
    x, labels = big_and_small_clusters(seed=0)
    small = labels > 0
    params = SketchParams(dim=32, rows=100, hashes_per_row=4, buckets=4096, width=0.7, seed=9)
    sketch = RaceSketch(params)
    sketch.add(x)
    scores = sketch.score(x, exclude_self=True)
    rate = 0.1
    probs = keep_probabilities(scores, calibrate(scores, rate))
    kept = decide([f"p{i}" for i in range(len(x))], probs, seed=11)

    ips_share = small[kept].mean()  # share of the kept set from small clusters
    uniform_share = small.mean()  # what uniform sampling keeps in expectation: 0.2
    assert ips_share > 2.5 * uniform_share
    # every small cluster is represented, and the big one is thinned, not erased
    assert all(np.sum(kept & (labels == k)) >= 10 for k in range(1, 9))
    assert np.sum(kept & (labels == 0)) >= 20
