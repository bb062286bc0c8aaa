"""The p-stable collision kernel, exact KDE and the bandwidth helper."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.density.exact import (
    accumulate_kde,
    collision_probability,
    exact_kde,
    nearest_neighbour_distances,
    suggest_width,
)
from services.density.sketch import SketchParams
from services.runtime.errors import InvalidArgument


@pytest.mark.parametrize("width", [0.3, 1.0])
def test_kernel_matches_a_simulation_of_the_hash(width: float) -> None:
    """Draw the hash family itself (w ~ N(0, I), b ~ U[0, width)) and count collisions."""
    rng = np.random.default_rng(0)
    trials = 100_000
    w = rng.standard_normal((trials, 4))
    b = rng.uniform(0, width, trials)
    for dist in (0.05, 0.3, 0.9, 2.0):
        y = np.array([dist, 0.0, 0.0, 0.0])
        same = np.floor(b / width) == np.floor((w @ y + b) / width)
        p = float(collision_probability(np.array(dist), width, 1))
        assert abs(same.mean() - p) < 4 * np.sqrt(p * (1 - p) / trials)


def test_kernel_shape() -> None:
    d = np.linspace(0, 2, 201)
    p1 = collision_probability(d, 0.5, 1)
    assert p1[0] == 1.0
    assert np.all(np.diff(p1) < 0)  # falls with distance
    assert np.allclose(collision_probability(d, 0.5, 3), p1**3)  # K hashes: p^K
    assert np.all(collision_probability(d[1:], 1.0, 1) > p1[1:])  # wider bucket, wider kernel
    # only c / width matters
    assert np.allclose(collision_probability(2 * d, 1.0, 2), collision_probability(d, 0.5, 2))
    # far tail ~ sqrt(2/pi) / 2 * width / c, computed without cancellation
    far = collision_probability(np.array([1e6]), 1.0, 1)[0]
    assert far == pytest.approx(np.sqrt(2 / np.pi) / 2 * 1e-6, rel=1e-6)


def test_kernel_rejects_nonsense() -> None:
    with pytest.raises(InvalidArgument):
        collision_probability(np.array([-0.1]), 1.0, 1)
    with pytest.raises(InvalidArgument):
        collision_probability(np.array([0.1]), 0.0, 1)
    with pytest.raises(InvalidArgument):
        collision_probability(np.array([0.1]), 1.0, 0)


def test_exact_kde_is_the_kernel_sum_over_normalised_points() -> None:
    rng = np.random.default_rng(1)
    params = SketchParams(dim=6, hashes_per_row=3, width=0.7)
    queries = rng.standard_normal((7, 6)) * 3.0  # not unit: exact_kde normalises
    points = rng.standard_normal((40, 6))
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    pn = points / np.linalg.norm(points, axis=1, keepdims=True)
    dist = np.linalg.norm(qn[:, None, :] - pn[None, :, :], axis=2)
    expected = collision_probability(dist, 0.7, 3).sum(axis=1)
    assert np.allclose(exact_kde(queries, points, params), expected, rtol=1e-5)
    same = exact_kde(points[:5], points, params, exclude_self=True)
    assert np.allclose(same, exact_kde(points[:5], points, params) - 1.0)


def test_streaming_accumulation_equals_one_call() -> None:
    rng = np.random.default_rng(2)
    params = SketchParams(dim=5, width=0.4)
    q = rng.standard_normal((3, 5))
    x = rng.standard_normal((100, 5))
    unit = lambda a: torch.from_numpy(a / np.linalg.norm(a, axis=1, keepdims=True))  # noqa: E731
    out = torch.zeros(3, dtype=torch.float64)
    for start in range(0, 100, 30):
        accumulate_kde(out, unit(q), unit(x[start : start + 30]), params)
    assert np.allclose(out.numpy(), exact_kde(q, x, params), rtol=1e-12)


def test_suggest_width_puts_the_median_neighbour_at_the_target() -> None:
    rng = np.random.default_rng(3)
    sample = rng.standard_normal((300, 16))
    median = float(np.median(nearest_neighbour_distances(sample)))
    for k in (1, 4):
        width = suggest_width(sample, k, kernel_at_median=0.4)
        assert collision_probability(np.array([median]), width, k)[0] == pytest.approx(0.4)
    assert suggest_width(sample, 4) > suggest_width(sample, 1)  # larger K needs more width
    with pytest.raises(InvalidArgument):
        suggest_width(sample[:1], 2)
    with pytest.raises(InvalidArgument):
        suggest_width(np.ones((5, 16)), 2)  # all duplicates: no scale to read


def test_nearest_neighbour_distances() -> None:
    pts = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    d = nearest_neighbour_distances(pts)
    unit = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    assert d[0] == pytest.approx(np.linalg.norm(unit[0] - unit[2]))
    assert d[1] == pytest.approx(np.linalg.norm(unit[1] - unit[2]))
