"""Choosing the kernel width from the data (sketch.width: auto): the rules, and where the
core chooses it (a bounded run, online warm-up, the first API add)."""

from __future__ import annotations

import numpy as np
import pytest

from services.density import sampler
from services.density.bandwidth import (
    FALLBACK_HASHES,
    FALLBACK_WIDTH,
    BandwidthChoice,
    angular_log_density_spread,
    choose_hashes,
    choose_width,
    log_density_spread,
    nearest_neighbour_distances,
)
from services.density.core import SCORE_DENSITY, DensityCore, run_bounded
from services.density.exact import collision_probability, exact_kde
from services.density.settings import DensitySettings, SketchSettings
from services.density.sketch import ANGULAR_WIDTH, SketchParams
from services.runtime.errors import FailedPrecondition, InvalidArgument
from tests.unit.density.mixture import mixture

DIM = 384


def _small_cluster_gain(width: float, k: int, rate: float = 0.2) -> float:
    """Kept share of the small clusters over their share in, for exact-KDE sampling."""
    data = mixture(seed=4, big=300, small=(20, 20))
    params = SketchParams(dim=DIM, hashes_per_row=k, width=width)
    dens = np.maximum(exact_kde(data.vectors, data.vectors, params), 1.0)
    probs = sampler.keep_probabilities(dens, sampler.calibrate(dens, rate))
    return float(probs[data.small].mean() / rate)


def test_the_spread_rule_picks_a_width_that_favours_rare_points_more_than_far_off_ones() -> None:
    data = mixture(seed=4, big=300, small=(20, 20))
    k = 4
    choice = choose_width(data.vectors, k)
    assert choice.rule == "spread/v1" and choice.sample == len(data.vectors)
    # The chosen width maximises the spread among widths around it ...
    widths = np.array([choice.width / 4, choice.width, choice.width * 4])
    spread = log_density_spread(data.vectors, widths, k)
    assert spread[1] > spread[0] and spread[1] > spread[2]
    # ... and inverse-density sampling with it keeps the small clusters better than with
    # a 4x narrower (everything isolated) or 4x wider (everything one blob) kernel.
    chosen = _small_cluster_gain(choice.width, k)
    assert chosen > 1.5
    assert chosen > _small_cluster_gain(choice.width / 4, k) + 0.2
    assert chosen > _small_cluster_gain(choice.width * 4, k) + 0.2


def test_the_nn_quantile_rule_puts_the_kernel_value_at_the_quantile() -> None:
    sample = np.random.default_rng(0).standard_normal((300, 16))
    nn = nearest_neighbour_distances(sample)
    for k in (1, 4):
        choice = choose_width(sample, k, rule="nn_quantile", quantile=0.25, kernel=0.3)
        d = float(np.quantile(nn, 0.25))
        assert choice.neighbour_distance == pytest.approx(d)
        assert collision_probability(np.array([d]), choice.width, k)[0] == pytest.approx(
            0.3, rel=1e-3
        )  # width rounded to 4 digits


def test_no_scale_in_the_sample_falls_back_and_bad_arguments_are_refused() -> None:
    dupes = np.ones((5, 8))
    assert choose_width(dupes, 2).width == FALLBACK_WIDTH
    assert choose_width(dupes[:1], 2).rule == "fallback"
    with pytest.raises(InvalidArgument, match="unknown bandwidth rule"):
        choose_width(dupes, 2, rule="silverman")
    with pytest.raises(InvalidArgument, match="quantile"):
        choose_width(dupes, 2, quantile=1.0)
    doc = choose_width(np.eye(4), 2).to_dict()
    assert BandwidthChoice.from_dict(doc).to_dict() == doc
    with pytest.raises(InvalidArgument):
        BandwidthChoice.from_dict({"width": 1.0})


def _core(**kw: object) -> DensityCore:
    sketch = SketchSettings(hash="pstable", dim=DIM, rows=32)  # width: auto (the default)
    return DensityCore(DensitySettings(sketch=sketch, **kw))  # type: ignore[arg-type]


def test_a_bounded_run_chooses_the_width_from_all_its_input_and_records_it() -> None:
    data = mixture(seed=5, big=240, small=(30,))
    samples = data.samples()
    core = _core(target_rate=0.3)
    assert core.width is None
    with pytest.raises(FailedPrecondition, match="auto"):
        core.params()
    outcomes = [o for b in run_bounded(core, [samples[:100], samples[100:]]) for o in b]
    chosen = core.bandwidth
    assert chosen is not None and chosen.rule == "spread/v1"
    assert core.params().width == chosen.width == core.width
    assert f"-w{chosen.width:g}" in core.model_version  # the report's model_version
    assert f"-w{chosen.width:g}" in outcomes[0].sample.lineage[-1].model_version
    # chosen from the whole input, so another batching decides alike
    again = _core(target_rate=0.3)
    fresh = data.samples()
    other = [o for b in run_bounded(again, [fresh[:17], fresh[17:]]) for o in b]
    assert again.width == core.width
    assert [o.kept for o in other] == [o.kept for o in outcomes]
    # and the rare cluster is kept well above its share
    kept = np.array([o.kept for o in outcomes])
    assert data.small[kept].mean() > 1.5 * data.small.mean()


def test_online_holds_the_warm_up_then_chooses_the_width_from_it() -> None:
    data = mixture(seed=6, big=150, small=(30,)).samples()
    core = _core(mode="online", warmup=100, target_rate=0.5)
    first = core.online_batch(data[:60], core.vectors(data[:60]))
    assert core.width is None and all(o.kept for o in first)  # warm-up: kept, held
    assert all(o.sample.scores[SCORE_DENSITY] == 1.0 for o in first)
    core.online_batch(data[60:120], core.vectors(data[60:120]))
    assert core.width is not None and core.state().n == 120  # the held 60 were added
    core.online_batch(data[120:], core.vectors(data[120:]))
    assert core.state().n == len(data)
    with pytest.raises(FailedPrecondition, match="already chosen"):
        core.set_bandwidth(BandwidthChoice(core.width * 2, "x", 0, 0.5, 0.1, 0.0))


def test_the_first_api_add_chooses_the_width_and_a_pinned_width_is_kept() -> None:
    samples = mixture(seed=7, big=40, small=(10,)).samples()
    core = _core()
    core.add("api", samples)
    assert core.width is not None and core.state("api").sketch.params.width == core.width
    pinned = DensityCore(
        DensitySettings(sketch=SketchSettings(hash="pstable", dim=DIM, rows=32, width=0.9))
    )
    pinned.add("api", samples)
    assert pinned.width == 0.9 and pinned.bandwidth is None


# -- angular sketches: K is the bandwidth ---------------------------------------------------


def _angular_gain(k: int, rate: float = 0.2) -> float:
    data = mixture(seed=4, big=300, small=(20, 20))
    params = SketchParams(hash="angular", dim=DIM, hashes_per_row=k, buckets=1 << k)
    dens = np.maximum(exact_kde(data.vectors, data.vectors, params, exclude_self=True), 1e-3)
    probs = sampler.keep_probabilities(dens, sampler.calibrate(dens, rate))
    return float(probs[data.small].mean() / rate)


def test_the_angular_spread_rule_picks_the_k_that_spreads_log_density_most() -> None:
    data = mixture(seed=4, big=300, small=(20, 20))
    choice = choose_hashes(data.vectors)
    k = choice.hashes_per_row
    assert choice.rule == "spread/angular/v1" and choice.width == ANGULAR_WIDTH
    ks = np.arange(1, 15)
    assert k == int(ks[np.argmax(angular_log_density_spread(data.vectors, ks))])
    assert 1 < k < 14  # an interior maximum: neither the flattest nor the sharpest kernel
    # inverse-density sampling with it keeps the small clusters better than the flattest
    # kernel (K=1: every density alike) does
    assert _angular_gain(k) > 1.5 and _angular_gain(k) > _angular_gain(1) + 0.2


def test_the_angular_nn_quantile_rule_and_fallback() -> None:
    sample = np.random.default_rng(0).standard_normal((300, 16))
    nn = nearest_neighbour_distances(sample)
    choice = choose_hashes(sample, rule="nn_quantile", quantile=0.25, kernel=0.05)
    d = float(np.quantile(nn, 0.25))
    per_hash = 1.0 - 2.0 * np.arcsin(d / 2.0) / np.pi
    k = choice.hashes_per_row
    # K is the integer nearest to log(kernel) / log(per-hash probability)
    assert per_hash ** (k + 0.5) <= 0.05 <= per_hash ** (k - 0.5)
    assert choose_hashes(np.ones((5, 8))).hashes_per_row == FALLBACK_HASHES
    with pytest.raises(InvalidArgument, match="unknown bandwidth rule"):
        choose_hashes(sample, rule="silverman")
    doc = choice.to_dict()
    assert BandwidthChoice.from_dict(doc) == choice
    # a pin written before K could be chosen reads as "K configured"
    old = {k: v for k, v in doc.items() if k != "hashes_per_row"}
    assert BandwidthChoice.from_dict(old).hashes_per_row == 0


def test_angular_settings_choose_k_in_a_bounded_run_and_record_it() -> None:
    with pytest.raises(ValueError, match="width applies to hash 'pstable'"):
        SketchSettings(hash="angular", width=0.8)
    with pytest.raises(ValueError, match="1 to 16"):
        SketchSettings(hash="angular", hashes_per_row=17)
    assert SketchSettings(hash="pstable").params(DIM, 1.0).hashes_per_row == 8
    fixed = SketchSettings(hash="angular", hashes_per_row=5).params(DIM)
    assert (fixed.hash, fixed.buckets, fixed.width) == ("angular", 32, ANGULAR_WIDTH)

    data = mixture(seed=5, big=240, small=(30,))
    sketch = SketchSettings(dim=DIM, rows=32, hash="angular", hashes_per_row="auto")
    core = DensityCore(DensitySettings(sketch=sketch, target_rate=0.3))
    assert core.width is None
    with pytest.raises(FailedPrecondition, match="auto"):
        core.params()
    outcomes = [o for b in run_bounded(core, [data.samples()]) for o in b]
    chosen = core.bandwidth
    assert chosen is not None and chosen.rule == "spread/angular/v1"
    params = core.params()
    assert params.hash == "angular" and params.hashes_per_row == chosen.hashes_per_row
    assert params.buckets == 1 << chosen.hashes_per_row
    assert f"-a{chosen.hashes_per_row}-" in outcomes[0].sample.lineage[-1].model_version
    kept = np.array([o.kept for o in outcomes])
    assert data.small[kept].mean() > 1.5 * data.small.mean()
    # a chosen K is never switched, and a p-stable choice is not an angular one
    with pytest.raises(FailedPrecondition, match="already chosen"):
        core.set_bandwidth(BandwidthChoice(ANGULAR_WIDTH, "x", 0, 0.5, 0.1, 0.0, 3))
    other = DensityCore(DensitySettings(sketch=sketch))
    with pytest.raises(FailedPrecondition, match="another hash family"):
        other.set_bandwidth(BandwidthChoice(1.4, "spread/v1", 10, 0.5, 0.0, 0.8))
    # a sketch of the other family is refused where the stage's own is expected
    pstable = DensityCore(
        DensitySettings(sketch=SketchSettings(hash="pstable", dim=DIM, rows=32, width=1.4))
    )
    pstable.add(core.name, data.samples()[:20])
    with pytest.raises(FailedPrecondition, match="pstable sketch"):
        other.install(pstable.state())


def test_angular_online_holds_the_warm_up_then_chooses_k_from_it() -> None:
    data = mixture(seed=6, big=150, small=(30,)).samples()
    sketch = SketchSettings(dim=DIM, rows=32)  # the defaults: angular, K auto
    core = DensityCore(DensitySettings(sketch=sketch, mode="online", warmup=100, target_rate=0.5))
    core.online_batch(data[:60], core.vectors(data[:60]))
    assert core.width is None and core.bandwidth is None  # warm-up: held, K unchosen
    core.online_batch(data[60:], core.vectors(data[60:]))
    chosen = core.bandwidth
    assert chosen is not None and chosen.hashes_per_row > 0
    assert core.state().n == len(data)
    assert core.state().sketch.params.hashes_per_row == chosen.hashes_per_row
