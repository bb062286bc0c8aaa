"""Does density sampling improve coverage on real text? Kept share per domain and clusters
covered, for the density stage vs uniform random vs exact-KDE inverse-density sampling.

``python -m bench.coverage [--rates 0.05,0.1,0.3] [--clusters 100]`` embeds six domains of
real text of very different sizes (``bench.coverage_corpus``: package docs, the Python
reference, news, movie reviews, licences, Russian fiction; all from installed packages)
with the packaged all-MiniLM-L6-v2, runs the density stage on them as ``sluice run`` does
(``run_bounded``: both passes in process, the default settings, ``sketch.width: auto``),
and compares at each target rate:

- **random**: uniform sampling at the rate (expected kept share = the rate everywhere);
- **exact**: inverse-density sampling with the exact KDE of the same kernel (the sketch's
  chosen width and K), p = min(1, c / density), c calibrated to the rate;
- **sketch**: the stage's own densities and decisions.

Kept shares are expected values (mean keep probability per domain: no sampling noise on a
domain of 19 texts); "kept" counts the stage's actual decisions. Clusters: k-means on the
embeddings, expected number of clusters with at least one kept text. The rare domains are
those under 5% of the corpus. Prints the tables, then
``RESULT coverage rare_gain_vs_random=<g> rare_gain_vs_exact=<e> spearman=<rho>`` at 10%:
g = rare share kept by the stage / the rate, e = the stage's rare share / exact's.
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


@dataclass
class Run:
    """One target rate: keep probabilities per text for each method, the stage's kept."""

    rate: float
    probs: dict[str, np.ndarray]
    kept: np.ndarray


def stage_densities(
    corpus: Corpus, vectors: np.ndarray, rate: float, seed: int
) -> tuple[DensityCore, np.ndarray, np.ndarray]:
    """The density stage over the corpus, as ``sluice run`` runs it: (core, density, kept)."""
    settings = DensitySettings(target_rate=rate, seed=seed)  # type: ignore[call-arg]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="0.05,0.1,0.3")
    ap.add_argument("--clusters", type=int, default=100, help="k-means clusters")
    ap.add_argument("--dtype", default="auto", help="embedding dtype (auto: bf16 on AMX)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rates = [float(r) for r in args.rates.split(",")]

    t0 = time.perf_counter()
    corpus = build_corpus()
    vectors = embed(corpus.texts, MODEL, args.dtype, 256)
    t_embed = time.perf_counter() - t0
    n, sizes = len(corpus.texts), np.array(corpus.sizes())
    rare = [d for d, s in enumerate(sizes) if s / n < RARE_SHARE]
    is_rare = np.isin(corpus.labels, rare)

    from sklearn.cluster import KMeans

    clusters = KMeans(args.clusters, n_init=3, random_state=args.seed).fit_predict(vectors)

    runs: list[Run] = []
    spearman = float("nan")
    width = ""
    t_stage = 0.0
    for rate in rates:
        t1 = time.perf_counter()
        core, dens, kept = stage_densities(corpus, vectors, rate, args.seed)
        t_stage += time.perf_counter() - t1
        params = core.params()
        width = f"R={params.rows} K={params.hashes_per_row} B={params.buckets} width={params.width}"
        if core.bandwidth is not None:
            width += f" ({core.bandwidth.rule} on {core.bandwidth.sample} texts)"
        exact = np.maximum(exact_kde(vectors, vectors, params), 1.0) / n
        spearman = float(spearmanr(dens, exact).statistic)
        probs = {
            "random": np.full(n, rate),
            "exact": sampler.keep_probabilities(exact, sampler.calibrate(exact, rate)),
            "sketch": sampler.keep_probabilities(dens, sampler.calibrate(dens, rate)),
        }
        runs.append(Run(rate, probs, kept))

    print(f"corpus: {n} texts, {len(sizes)} domains, embedded with {MODEL} ({t_embed:.1f} s)")
    print(f"sketch: {width}; stage time {t_stage:.1f} s for {len(rates)} rates")
    print(f"spearman(sketch density, exact KDE) over all texts: {spearman:.4f}\n")
    methods = ("random", "exact", "sketch")
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
    rare_names = "+".join(corpus.domains[d] for d in rare)
    row = f"{'rare: ' + rare_names:<18}"[:18] + f"{int(is_rare.sum()):>6}{is_rare.mean():>7.1%}"
    for run in runs:
        row += "".join(f"{run.probs[m][is_rare].mean():>12.1%}" for m in methods)
    print(row)
    row = f"{'clusters covered':<31}"
    for run in runs:
        row += "".join(
            f"{expected_clusters(run.probs[m], clusters, args.clusters):>12.1f}" for m in methods
        )
    print(row)
    row = f"{'stage kept (actual)':<31}"
    for run in runs:
        row += f"{'':>12}{'':>12}{run.kept.mean():>12.1%}"
    print(row)

    print(f"\nrare domains ({rare_names}) kept vs random, per rate")
    cols = ("random", "exact", "sketch")
    print(f"{'rate':>6}" + "".join(f"{c:>9}" for c in cols) + f"{'vs random':>12}{'vs exact':>11}")
    summary = {}
    for run in runs:
        r_exact = float(run.probs["exact"][is_rare].mean())
        r_sketch = float(run.probs["sketch"][is_rare].mean())
        summary[run.rate] = (r_sketch / run.rate, r_sketch / r_exact)
        print(
            f"{run.rate:>6.0%}{run.rate:>9.1%}{r_exact:>9.1%}{r_sketch:>9.1%}"
            f"{r_sketch / run.rate:>11.2f}x{r_sketch / r_exact:>10.2f}x"
        )
    key = 0.1 if 0.1 in summary else rates[0]
    g, e = summary[key]
    print(
        f"RESULT coverage rare_gain_vs_random={g:.2f} rare_gain_vs_exact={e:.2f} "
        f"spearman={spearman:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
