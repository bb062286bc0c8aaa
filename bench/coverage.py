"""Does density sampling improve coverage on real text? Kept share per domain and clusters
covered, for the density stage vs uniform random vs exact-KDE inverse-density sampling.

``python -m bench.coverage [--rates 0.05,0.1,0.3] [--clusters 100] [--sketch K=V ...]``
embeds seven domains of real text of very different sizes (``bench.coverage_corpus``: package
docs, the Python reference, news, dialogue, movie reviews, licences, Russian fiction; all from
installed packages) with the packaged all-MiniLM-L6-v2, runs the density stage on them as
``sluice run`` does (``run_bounded``: both passes in process, the default settings: an
angular sketch with ``hashes_per_row: auto``; ``--sketch`` overrides a sketch setting, e.g.
``--sketch hash=pstable`` for the p-stable family), and compares at each target rate:

- **random**: uniform sampling at the rate (expected kept share = the rate everywhere);
- **exact**: inverse-density sampling with the exact KDE of the same kernel (the sketch's
  family and chosen K or width), p = min(1, c / density), c calibrated to the rate; like the stage,
  each text's density is that of the *other* texts (its own k = 1 left out);
- **sketch**: the stage's own densities and decisions;
- **gauss**: a reference outside the sketch's reach: inverse-density sampling with an exact
  *Gaussian* KDE, its bandwidth h chosen by the same criterion as the sketch's ``auto``
  (the h that maximises the spread of log-density). It shows how much the kernel's shape,
  not its width, limits coverage: the p-stable kernel p(c / width)^K has a log that is
  linear (Laplace-like) near 0 and flattens far away; the angular (1 - angle / pi)^K's and
  a Gaussian's fall ever faster.

Kept shares are expected values (mean keep probability per domain: no sampling noise on a
domain of 19 texts); "kept" counts the stage's actual decisions. Clusters: k-means on the
embeddings, expected number of clusters with at least one kept text.

Two scenarios, each with its own table:

- **all-domains** (the RESULT line): every domain; the rare domains are those under 5% of
  the corpus.
- **two-domain**: the shape of the issue that asked for this bench (a big technical domain
  and a small, topically distinct one: 255 documentation paragraphs and 40 news articles):
  the whole Python reference plus news articles drawn at random (``--seed``) in the same
  40 : 255 ratio; the news is the rare domain. Reported on its own line
  ``SCENARIO two-domain ...``; it does not enter the RESULT line.

The last line is ``RESULT coverage rare_gain_vs_random=<g> rare_gain_vs_exact=<e>
spearman=<rho>`` for the all-domains scenario at 10%: g = rare share kept by the stage / the
rate, e = the stage's rare share / exact's.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from bench.coverage_corpus import Corpus, build_corpus, embed
from services.density import sampler
from services.density.core import SCORE_DENSITY, DensityCore, run_bounded
from services.density.exact import exact_kde
from services.density.settings import DensitySettings
from services.runtime.domain import Sample

RARE_SHARE = 0.05
MODEL = "packaged:all-minilm-l6-v2"
TWO_DOMAIN_RATIO = 40 / 255
"""Rare : big domain size ratio of the two-domain scenario (the issue's mixture)."""
_GAUSS_GRID = np.geomspace(0.2, 2.0, 21)
"""Gaussian bandwidths tried, in units of the median nearest-neighbour distance."""


@dataclass(frozen=True)
class Scenario:
    """Texts, their domains and vectors, and which texts belong to the rare domains."""

    name: str
    corpus: Corpus
    vectors: np.ndarray
    rare: list[int]

    @property
    def is_rare(self) -> np.ndarray:
        return np.isin(self.corpus.labels, self.rare)


def all_domains(corpus: Corpus, vectors: np.ndarray) -> Scenario:
    n, sizes = len(corpus.texts), corpus.sizes()
    rare = [d for d, s in enumerate(sizes) if s / n < RARE_SHARE]
    return Scenario("all-domains", corpus, vectors, rare)


def two_domain(corpus: Corpus, vectors: np.ndarray, seed: int) -> Scenario:
    """The whole Python reference plus news articles drawn in the issue's 40 : 255 ratio."""
    big = np.flatnonzero(corpus.labels == corpus.domains.index("python-reference"))
    news = np.flatnonzero(corpus.labels == corpus.domains.index("news"))
    size = min(len(news), round(len(big) * TWO_DOMAIN_RATIO))
    small = np.sort(np.random.default_rng(seed).choice(news, size, replace=False))
    idx = np.concatenate([big, small])
    sub = Corpus(
        [corpus.texts[i] for i in idx],
        np.array([0] * len(big) + [1] * len(small)),
        ["python-reference", "news (drawn)"],
    )
    return Scenario("two-domain", sub, vectors[idx], [1])


def gaussian_kde(vectors: np.ndarray) -> tuple[float, np.ndarray]:
    """(h, density): the exact Gaussian KDE (itself included) of unit vectors, at the h of
    ``_GAUSS_GRID`` that maximises the standard deviation of log-density."""
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sq = np.clip(2.0 - 2.0 * (x @ x.T), 0.0, None)
    np.fill_diagonal(sq, 0.0)
    nn = np.sqrt(np.where(np.eye(len(x), dtype=bool), np.inf, sq).min(axis=1))
    best: tuple[float, float, np.ndarray] = (-1.0, 0.0, np.ones(len(x)))
    for h in float(np.median(nn)) * _GAUSS_GRID:
        dens = np.exp(-sq / (2.0 * h * h)).sum(axis=1)
        spread = float(np.log(dens).std())
        if spread > best[0]:
            best = (spread, float(h), dens)
    return best[1], best[2]


@dataclass
class Run:
    """One target rate: keep probabilities per text for each method, the stage's kept."""

    rate: float
    probs: dict[str, np.ndarray]
    kept: np.ndarray


def stage_densities(
    corpus: Corpus,
    vectors: np.ndarray,
    rate: float,
    seed: int,
    sketch: dict[str, str] | None = None,
) -> tuple[DensityCore, np.ndarray, np.ndarray]:
    """The density stage over the corpus, as ``sluice run`` runs it: (core, density, kept).
    ``sketch``: overrides of the stage's ``sketch`` settings (``--sketch K=V``)."""
    settings = DensitySettings.model_validate(
        {"target_rate": rate, "seed": seed, "sketch": dict(sketch or {})}
    )
    core = DensityCore(settings)
    samples = [
        Sample(id=f"t{i}", text=text, embedding=vectors[i].tolist())
        for i, text in enumerate(corpus.texts)
    ]
    batches = [samples[i : i + 256] for i in range(0, len(samples), 256)]
    outcomes = [o for b in run_bounded(core, batches) for o in b]
    dens = np.array([o.sample.scores[SCORE_DENSITY] for o in outcomes])
    return core, dens, np.array([o.kept for o in outcomes])


def expected_clusters(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """E[#clusters with >= 1 kept text] = sum_c 1 - prod_{i in c} (1 - p_i)."""
    log_miss = np.zeros(k)
    np.add.at(log_miss, labels, np.log1p(-np.minimum(probs, 1.0 - 1e-12)))
    return float((1.0 - np.exp(log_miss)).sum())


def evaluate(
    scenario: Scenario, rates: list[float], k: int, seed: int, sketch: dict[str, str] | None = None
) -> tuple[list[Run], np.ndarray, str, float]:
    """Every method at every rate: (runs, k-means labels, sketch description, spearman)."""
    from sklearn.cluster import KMeans

    corpus, vectors = scenario.corpus, scenario.vectors
    n = len(corpus.texts)
    clusters = KMeans(k, n_init=3, random_state=seed).fit_predict(vectors)
    h, gauss = gaussian_kde(vectors)
    runs: list[Run] = []
    spearman = float("nan")
    desc = ""
    for rate in rates:
        core, dens, kept = stage_densities(corpus, vectors, rate, seed, sketch)
        params = core.params()
        desc = f"R={params.rows} K={params.hashes_per_row} B={params.buckets} width={params.width}"
        if core.bandwidth is not None:
            desc += f" ({core.bandwidth.rule} on {core.bandwidth.sample} texts)"
        # the stage's semantics for both references: the *other* points' kernel mass
        # (itself, k = 1, left out), floored where the sketch floors it
        floor = core.state().sketch.others_floor
        exact = np.maximum(exact_kde(vectors, vectors, params) - 1.0, floor) / n
        others = np.maximum(gauss - 1.0, floor) / n
        spearman = float(spearmanr(dens, exact).statistic)
        probs = {
            "random": np.full(n, rate),
            "exact": sampler.keep_probabilities(exact, sampler.calibrate(exact, rate)),
            "sketch": sampler.keep_probabilities(dens, sampler.calibrate(dens, rate)),
            "gauss": sampler.keep_probabilities(others, sampler.calibrate(others, rate)),
        }
        runs.append(Run(rate, probs, kept))
    return runs, clusters, f"{desc}; gauss h={h:.3f}", spearman


def report(
    scenario: Scenario, runs: list[Run], clusters: np.ndarray, k: int
) -> dict[float, tuple[float, float, float]]:
    """Print the scenario's tables; per rate (vs random, vs exact, gauss vs random)."""
    corpus, is_rare = scenario.corpus, scenario.is_rare
    n, sizes = len(corpus.texts), corpus.sizes()
    methods = ("random", "exact", "sketch", "gauss")
    head = f"{'domain':<18}{'texts':>6}{'share':>7}"
    for run in runs:
        head += "".join(f"{m[:6] + f'@{run.rate:.0%}':>12}" for m in methods)
    print("kept share of each domain (expected)")
    print(head)
    print("-" * len(head))
    for d, name in enumerate(corpus.domains):
        mask = corpus.labels == d
        row = f"{name:<18}{sizes[d]:>6}{sizes[d] / n:>7.1%}"
        for run in runs:
            row += "".join(f"{run.probs[m][mask].mean():>12.1%}" for m in methods)
        print(row)
    rare_names = "+".join(corpus.domains[d] for d in scenario.rare)
    row = f"{'rare: ' + rare_names:<18}"[:18] + f"{int(is_rare.sum()):>6}{is_rare.mean():>7.1%}"
    for run in runs:
        row += "".join(f"{run.probs[m][is_rare].mean():>12.1%}" for m in methods)
    print(row)
    row = f"{'clusters covered':<31}"
    for run in runs:
        row += "".join(f"{expected_clusters(run.probs[m], clusters, k):>12.1f}" for m in methods)
    print(row)
    row = f"{'stage kept (actual)':<31}"
    for run in runs:
        row += f"{'':>12}{'':>12}{run.kept.mean():>12.1%}{'':>12}"
    print(row)

    print(f"\nrare domains ({rare_names}) kept vs random, per rate")
    cols = ("random", "exact", "sketch", "gauss")
    print(
        f"{'rate':>6}" + "".join(f"{c:>9}" for c in cols) + f"{'vs random':>12}{'vs exact':>11}"
        f"{'gauss':>9}"
    )
    summary = {}
    for run in runs:
        r_exact = float(run.probs["exact"][is_rare].mean())
        r_sketch = float(run.probs["sketch"][is_rare].mean())
        r_gauss = float(run.probs["gauss"][is_rare].mean())
        summary[run.rate] = (r_sketch / run.rate, r_sketch / r_exact, r_gauss / run.rate)
        print(
            f"{run.rate:>6.0%}{run.rate:>9.1%}{r_exact:>9.1%}{r_sketch:>9.1%}{r_gauss:>9.1%}"
            f"{r_sketch / run.rate:>11.2f}x{r_sketch / r_exact:>10.2f}x{r_gauss / run.rate:>8.2f}x"
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="0.05,0.1,0.3")
    ap.add_argument("--clusters", type=int, default=100, help="k-means clusters")
    ap.add_argument("--dtype", default="auto", help="embedding dtype (auto: bf16 on AMX)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--sketch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a sketch setting of the stage (repeatable), e.g. hashes_per_row=16, "
        "buckets=65536, bandwidth_rule=nn_quantile, bandwidth_kernel=0.01, width=2.0",
    )
    args = ap.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in args.sketch)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rates = [float(r) for r in args.rates.split(",")]
    key = 0.1 if 0.1 in rates else rates[0]

    t0 = time.perf_counter()
    corpus = build_corpus()
    vectors = embed(corpus.texts, MODEL, args.dtype, 256)
    t_embed = time.perf_counter() - t0
    print(
        f"corpus: {len(corpus.texts)} texts, {len(corpus.domains)} domains, embedded with "
        f"{MODEL} ({t_embed:.1f} s)"
    )
    results = {}
    for scenario in (all_domains(corpus, vectors), two_domain(corpus, vectors, args.seed)):
        t1 = time.perf_counter()
        runs, clusters, desc, spearman = evaluate(
            scenario, rates, args.clusters, args.seed, overrides
        )
        print(f"\n== scenario {scenario.name}: {len(scenario.corpus.texts)} texts")
        print(f"sketch: {desc}; {time.perf_counter() - t1:.1f} s for {len(rates)} rates")
        print(f"spearman(sketch density, exact KDE) over all texts: {spearman:.4f}\n")
        summary = report(scenario, runs, clusters, args.clusters)
        results[scenario.name] = (summary[key], spearman)
    (g, e, gg), rho = results["two-domain"]
    print(
        f"\nSCENARIO two-domain rare_gain_vs_random={g:.2f} rare_gain_vs_exact={e:.2f} "
        f"gauss_gain_vs_random={gg:.2f} spearman={rho:.4f}"
    )
    (g, e, gg), rho = results["all-domains"]
    print(
        f"SCENARIO all-domains rare_gain_vs_random={g:.2f} rare_gain_vs_exact={e:.2f} "
        f"gauss_gain_vs_random={gg:.2f} spearman={rho:.4f}"
    )
    print(
        f"RESULT coverage rare_gain_vs_random={g:.2f} rare_gain_vs_exact={e:.2f} spearman={rho:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
