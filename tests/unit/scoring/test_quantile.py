"""P² streaming quantile and the top-fraction filter."""

from __future__ import annotations

import numpy as np
import pytest

from services.scoring.quantile import P2Quantile, TopFractionFilter


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dist", ["uniform", "normal", "lognormal"])
def test_p2_tracks_the_exact_quantile(p: float, dist: str) -> None:
    rng = np.random.default_rng(7)
    xs = {
        "uniform": rng.uniform(0, 1, 20000),
        "normal": rng.normal(0, 1, 20000),
        "lognormal": rng.lognormal(0, 1, 20000),
    }[dist]
    est = P2Quantile(p)
    for x in xs:
        est.add(float(x))
    exact = float(np.quantile(xs, p))
    # within 1.5% of the distribution's spread (central 98%)
    spread = float(np.quantile(xs, 0.99) - np.quantile(xs, 0.01))
    assert abs(est.value() - exact) < 0.015 * spread


def test_p2_exact_for_few_values_and_ignores_nan() -> None:
    est = P2Quantile(0.5)
    assert np.isnan(est.value())
    for x in (3.0, float("nan"), 1.0, 2.0):
        est.add(x)
    assert est.value() == 2.0
    assert est.count == 3


def test_p2_rejects_bad_quantile() -> None:
    with pytest.raises(ValueError):
        P2Quantile(1.0)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.75])
@pytest.mark.parametrize("higher", [True, False])
def test_top_fraction_keeps_about_the_fraction(fraction: float, higher: bool) -> None:
    rng = np.random.default_rng(3)
    f = TopFractionFilter(fraction, higher_is_better=higher)
    kept = total = 0
    for _ in range(200):
        batch = rng.beta(2, 5, size=50).tolist()
        decisions = f.decide(batch)
        kept += sum(decisions)
        total += len(batch)
    assert abs(kept / total - fraction) < 0.03


def test_top_fraction_keeps_the_best_not_a_random_share() -> None:
    f = TopFractionFilter(0.2, higher_is_better=True)
    rng = np.random.default_rng(0)
    for _ in range(50):
        f.decide(rng.uniform(0, 1, 100).tolist())
    assert f.decide([0.95, 0.05]) == [True, False]
    low = TopFractionFilter(0.2, higher_is_better=False)
    for _ in range(50):
        low.decide(rng.uniform(0, 1, 100).tolist())
    assert low.decide([0.95, 0.05]) == [False, True]


def test_top_fraction_one_keeps_everything_and_nan_is_dropped() -> None:
    assert TopFractionFilter(1.0).decide([0.1, float("nan")]) == [True, True]
    f = TopFractionFilter(0.5)
    assert f.decide([0.2, 0.8, float("nan")])[2] is False
