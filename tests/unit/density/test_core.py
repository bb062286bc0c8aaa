"""The density core: two passes and online mode on synthetic clusters, calibration,
determinism, named sketches and input validation (no servers; precomputed embeddings)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from services.density.core import (
    REASON_BAD_EMBEDDING,
    REASON_SUBSAMPLED,
    SCORE_DENSITY,
    SCORE_WEIGHT,
    DensityCore,
    densities,
    densities_before_add,
)
from services.density.settings import DensitySettings, SketchSettings
from services.density.sketch import RaceSketch, SketchParams
from services.density.state import CalibrationSample, combine
from services.runtime.domain import Action, Outcome, Sample
from services.runtime.errors import (
    DecodeError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from tests.unit.density.mixture import Mixture, mixture

DIM = 384


def _settings(**kw: Any) -> DensitySettings:
    # A pinned width: these tests are about the passes, not the bandwidth (test_bandwidth).
    kw.setdefault("sketch", SketchSettings(hash="pstable", dim=DIM, rows=64, width=1.4))
    return DensitySettings(**kw)


def _two_pass(
    data: Mixture, rate: float, seed: int = 0, batch: int = 250
) -> tuple[list[Outcome], DensityCore]:
    core = DensityCore(_settings(target_rate=rate, seed=seed))
    samples = data.samples()
    chunks = [samples[i : i + batch] for i in range(0, len(samples), batch)]
    for chunk in chunks:
        core.build_batch(chunk, core.vectors(chunk))
    outcomes = [o for chunk in chunks for o in core.sample_batch(chunk, core.vectors(chunk))]
    return outcomes, core


RATE = 0.3
SEED = 7


@pytest.fixture(scope="module")
def data() -> Mixture:
    return mixture(seed=1)


@pytest.fixture(scope="module")
def two_pass(data: Mixture) -> tuple[list[Outcome], DensityCore]:
    return _two_pass(data, RATE, seed=SEED, batch=250)


def test_two_pass_keeps_the_target_fraction_and_favours_small_clusters(
    data: Mixture, two_pass: tuple[list[Outcome], DensityCore]
) -> None:
    rate = RATE
    outcomes, core = two_pass
    kept = np.array([o.kept for o in outcomes])
    n = len(kept)
    # The calibration sample holds the whole corpus here, so E[kept] = rate exactly;
    # 4 sigma of the Bernoulli sum.
    assert abs(kept.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    small_share_in = data.small.mean()
    small_share_kept = data.small[kept].mean()
    assert small_share_kept > 2 * small_share_in  # uniform sampling would keep ~1x
    # Small-cluster points are rarer, so denser points get lower keep probabilities.
    dens = np.array([o.sample.scores[SCORE_DENSITY] for o in outcomes])
    assert np.median(dens[data.small]) < np.median(dens[~data.small]) / 3
    assert core.state().n == n


def test_importance_weights_reweight_to_the_corpus(
    data: Mixture, two_pass: tuple[list[Outcome], DensityCore]
) -> None:
    outcomes, _ = two_pass
    for o in outcomes:
        assert o.sample.lineage[-1].stage == "density"
        if o.kept:
            w = o.sample.scores[SCORE_WEIGHT]
            assert w >= 1.0
            assert o.sample.lineage[-1].action == Action.KEPT
        else:
            assert SCORE_WEIGHT not in o.sample.scores
            assert o.reason == REASON_SUBSAMPLED
            assert o.sample.lineage[-1].action == Action.DROPPED
    # Horvitz-Thompson: the weighted count of kept samples per cluster estimates its size.
    for k in np.unique(data.labels):
        size = int((data.labels == k).sum())
        est = sum(
            o.sample.scores[SCORE_WEIGHT]
            for o, lab in zip(outcomes, data.labels, strict=True)
            if o.kept and lab == k
        )
        assert abs(est - size) < 0.25 * size


def test_decisions_are_deterministic_per_seed_and_independent_of_batching(
    data: Mixture, two_pass: tuple[list[Outcome], DensityCore]
) -> None:
    a, core = two_pass
    b, _ = _two_pass(data, RATE, seed=SEED, batch=397)
    keep = [o.kept for o in a]
    assert keep == [o.kept for o in b]
    wa = [o.sample.scores.get(SCORE_WEIGHT) for o in a]
    wb = [o.sample.scores.get(SCORE_WEIGHT) for o in b]
    np.testing.assert_allclose(np.array(wa, float), np.array(wb, float), rtol=1e-12)
    # The API decides alike for the same seed, differently for another one.
    samples = data.samples()
    same = core.sample("", samples, target_rate=RATE)
    assert same.kept.tolist() == keep
    other = core.sample("", samples, target_rate=RATE, seed=SEED + 1)
    assert other.kept.tolist() != keep
    assert abs(other.kept.mean() - same.kept.mean()) < 0.05


def test_partition_sketches_merge_into_the_single_worker_sketch(data: Mixture) -> None:
    samples = data.samples()
    whole = DensityCore(_settings())
    whole.build_batch(samples, whole.vectors(samples))
    parts = []
    for p in range(3):
        core = DensityCore(_settings(calibration_size=4096))
        part = samples[p::3]
        core.build_batch(part, core.vectors(part))
        parts.append(core.state())
    merged = combine(parts, ["w0", "w1", "w2"])
    np.testing.assert_array_equal(merged.sketch.counts, whole.state().sketch.counts)
    np.testing.assert_array_equal(merged.calibration.keys, whole.state().calibration.keys)
    np.testing.assert_array_equal(merged.calibration.vectors, whole.state().calibration.vectors)
    assert [p.n for p in merged.parts] == [len(samples[p::3]) for p in range(3)]


def test_calibration_sample_is_a_bounded_uniform_sample() -> None:
    data = mixture(seed=2, big=3000, small=(1000,))
    calib = CalibrationSample(size=500, dim=DIM, seed=0)
    ids = [f"id{i}" for i in range(len(data.vectors))]
    for start in range(0, len(ids), 333):
        calib.add(ids[start : start + 333], data.vectors[start : start + 333])
    calib.add(ids[:100], data.vectors[:100])  # redelivered: counted once
    assert len(calib) == 500 and len(np.unique(calib.keys)) == 500
    rows = {tuple(np.round(v, 5)) for v in data.vectors[data.small]}
    share = np.mean([tuple(np.round(v, 5)) in rows for v in calib.vectors])
    assert abs(share - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 500)
    again = CalibrationSample.from_bytes(calib.to_bytes())
    np.testing.assert_array_equal(again.keys, calib.keys)
    with pytest.raises(DecodeError):
        CalibrationSample.from_bytes(b"junk")
    with pytest.raises(FailedPrecondition):
        calib.merge(CalibrationSample(size=500, dim=DIM, seed=1))


def test_online_mode_warms_up_then_subsamples(data: Mixture) -> None:
    warmup = 400
    core = DensityCore(_settings(mode="online", target_rate=0.3, warmup=warmup))
    samples = data.samples()
    outcomes: list[Outcome] = []
    for start in range(0, len(samples), 100):
        outcomes.extend(core.process(samples[start : start + 100]))
    kept = np.array([o.kept for o in outcomes])
    assert kept[:warmup].all()  # nothing dropped before the sketch holds `warmup` points
    after = kept[warmup:]
    assert abs(after.mean() - 0.3) < 0.08  # approximate: c tracks the stream so far
    assert data.small[warmup:][after].mean() > 2 * data.small[warmup:].mean()
    assert core.state().n == len(samples)
    assert all(SCORE_DENSITY in o.sample.scores for o in outcomes)


def test_unusable_embeddings_are_dropped_in_streams_and_refused_by_the_api() -> None:
    core = DensityCore(_settings(mode="online", warmup=0))
    good = [float(v) for v in np.ones(DIM) / np.sqrt(DIM)]
    samples = [
        Sample(id="ok", embedding=good),
        Sample(id="short", embedding=[1.0, 2.0]),
        Sample(id="nan", embedding=[float("nan")] * DIM),
        Sample(id="zero", embedding=[0.0] * DIM),
    ]
    outcomes = core.process(samples)
    assert [o.kept for o in outcomes] == [True, False, False, False]
    assert {o.reason for o in outcomes[1:]} == {REASON_BAD_EMBEDDING}
    assert core.state().n == 1
    with pytest.raises(InvalidArgument, match="'short': embedding has 2 dims"):
        core.add("api", samples[:2])
    with pytest.raises(InvalidArgument, match="no samples"):
        core.score("api", [])


def test_named_sketches_and_errors(data: Mixture) -> None:
    core = DensityCore(_settings(target_rate=0.5))
    samples = data.samples()[:500]
    state = core.add("mine", samples)
    assert state.n == 500 and core.names() == ["mine"]
    dens, _ = core.score("mine", samples[:10])
    assert dens.shape == (10,) and np.all((dens > 0) & (dens <= 1))
    with pytest.raises(NotFound):
        core.score("other", samples[:1])
    with pytest.raises(InvalidArgument, match="bad sketch name"):
        core.state("../etc")
    decided = core.sample("mine", samples, target_rate=0.5)
    assert decided.calibration == "sketch"
    by_request = core.sample("mine", samples, target_rate=0.5, calibration="request")
    assert by_request.probability.mean() == pytest.approx(0.5, abs=1e-6)
    np.testing.assert_array_equal(by_request.weights[~by_request.kept], 0.0)


def test_merge_bytes_checks_identity_and_tracks_calibration(data: Mixture) -> None:
    core = DensityCore(_settings())
    samples = data.samples()[:300]
    core.add("a", samples[:200])
    other = DensityCore(_settings())
    other.add("b", samples[200:])
    blob = other.state("b").sketch.to_bytes()
    merged = core.merge_bytes("a", blob)
    assert merged.n == 300
    assert not merged.calibrated  # 100 points arrived without calibration points
    with pytest.raises(FailedPrecondition, match="no calibration sample"):
        core.sample("a", samples[:5], calibration="sketch")
    assert core.sample("a", samples[:5]).calibration == "request"
    fresh = core.merge_bytes("new", blob)
    assert fresh.n == 100
    foreign = RaceSketch(SketchParams(dim=DIM, rows=64, seed=99))
    with pytest.raises(FailedPrecondition):
        core.merge_bytes("a", foreign.to_bytes())
    with pytest.raises(DecodeError):
        core.merge_bytes("a", b"not a sketch")


def test_density_is_the_others_fraction_floored_at_one_neighbour_in_one_row() -> None:
    sketch = RaceSketch(SketchParams(dim=8))
    x = np.eye(8, dtype=np.float32)
    sketch.add(x)
    d = densities(sketch, x)
    floor = sketch.others_floor / 8
    assert np.all(d >= floor) and np.all(d <= 7 / 8)
    # far-apart points: most rows hold a point alone, so it reads (close to) the floor,
    # not the 1/n its own count would give
    assert np.median(d) < 0.5 / 8
    alone = RaceSketch(SketchParams(dim=8))
    alone.add(x[:1])
    np.testing.assert_allclose(densities(alone, x[:1]), alone.others_floor)
    np.testing.assert_array_equal(densities(RaceSketch(SketchParams(dim=8)), x), 1.0)


def test_the_stage_density_is_the_sketch_geometric_estimate_without_itself_over_n() -> None:
    """The stage samples by the geometric mean of row counts less the point's own count,
    not by their mean (which ranks worse against exact KDE where row counts are
    heavy-tailed: docs/density.md)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    sketch = RaceSketch(SketchParams(dim=8, rows=32, hashes_per_row=2, buckets=64, width=2.0))
    sketch.add(x)
    g = sketch.estimate_density(x[:50])
    np.testing.assert_allclose(densities(sketch, x[:50]), (g - 1.0) / 300)
    assert not np.allclose(densities(sketch, x[:50]), sketch.estimate_kde(x[:50]) / 300)
    np.testing.assert_allclose(
        densities_before_add(sketch, x[:50]),
        (sketch.estimate_density(x[:50], plus_one=True) - 1.0) / 301,
    )


def test_build_mode_needs_a_version() -> None:
    with pytest.raises(ValueError, match=r"sketch\.version"):
        DensitySettings(mode="two_pass_build")
    assert DensitySettings(mode="two_pass_build", sketch=SketchSettings(version=3)).sketch.version
