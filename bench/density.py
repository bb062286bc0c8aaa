"""RACE density sketch: build + score throughput, peak memory and agreement with exact KDE.

``python -m bench.density --points N [--dim 384] [--subset 2000] ...`` streams N generated,
clustered embeddings twice, chunk by chunk (never all in memory): pass 1 adds every point to
a sketch, pass 2 scores every point against it, the two passes of the density stage. A
uniform subset of the points is also scored exactly (the same kernel summed over all N
points, streamed alongside pass 2) to measure the sketch's rank correlation and its speed
per query against exact KDE. Prints a table, then one line
``RESULT density points_per_s=<p> spearman=<rho> peak_rss_mb=<m>`` where points_per_s counts
points sketched and scored per second of sketch work (generation and the exact reference
are timed separately and excluded).

Pass 2 scores with the stage's estimator (``--estimator geometric``: the geometric mean of a
point's R row counts less its own count, ``RaceSketch.estimate_density(exclude_self=True)``;
a monotone shift, so it ranks like the mean of logs) or the rows' mean (``mean``,
``RaceSketch.score``, the estimator before it). Both are computed for the queries from the
same sketch, so the table compares them at identical hashing; the cost of each reduction
is timed on the same chunk, alternately, and reported as a ratio (robust to a shared,
loaded machine, unlike points/s).

The data: ``--clusters`` topics with Zipf-distributed sizes (a few huge, a long tail of
small ones), each a random unit centre plus noise of a per-topic spread in a shared
``--latent``-dimensional subspace (real sentence embeddings have a low intrinsic dimension),
then L2-normalised by the sketch. Chunk i is drawn from its own seeded generator, so the two
passes see identical points without storing them.
"""

from __future__ import annotations

import os

# This machine's 2 cores are shared with other processes. By default libgomp threads spin
# ~300k times waiting for a peer: when that peer is descheduled they burn the very CPU it
# needs (measured 5-12x slower with one competing process). A short spin keeps the quiet
# case as fast (2.1 us per point and pass) and degrades gracefully (6 instead of 27 us).
# An explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse
import functools
import math
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import spearmanr

from services.density.bandwidth import choose_hashes, choose_width
from services.density.exact import accumulate_kde
from services.density.settings import PSTABLE_HASHES, SketchSettings
from services.density.sketch import ANGULAR_WIDTH, RaceSketch, SketchParams


@dataclass(frozen=True)
class ClusteredStream:
    """N points of ``dim`` dims in Zipf-sized clusters, generated chunk by chunk."""

    points: int
    dim: int
    clusters: int
    latent: int
    chunk: int
    seed: int
    centres: torch.Tensor = field(init=False, repr=False)
    basis: torch.Tensor = field(init=False, repr=False)
    spread: torch.Tensor = field(init=False, repr=False)
    cdf: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        centres = torch.randn(self.clusters, self.dim, generator=g)
        centres /= torch.linalg.vector_norm(centres, dim=1, keepdim=True)
        q, _ = torch.linalg.qr(torch.randn(self.dim, self.latent, generator=g))
        sizes = 1.0 / torch.arange(1, self.clusters + 1, dtype=torch.float64)  # Zipf(1)
        cdf = torch.cumsum(sizes / sizes.sum(), 0)
        spread = 0.35 + 0.35 * torch.rand(self.clusters, generator=g)  # noise norm per topic
        object.__setattr__(self, "centres", centres)
        object.__setattr__(self, "basis", (q.t() / math.sqrt(self.latent)).contiguous())
        object.__setattr__(self, "spread", spread)
        object.__setattr__(self, "cdf", cdf)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        buf = torch.empty(self.chunk, self.dim)
        for i, start in enumerate(range(0, self.points, self.chunk)):
            n = min(self.chunk, self.points - start)
            yield start, self._draw(i, buf[:n])

    def _draw(self, index: int, out: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        n = len(out)
        labels = torch.searchsorted(self.cdf, torch.rand(n, generator=g, dtype=torch.float64))
        labels.clamp_(max=self.clusters - 1)
        z = torch.randn(n, self.latent, generator=g)
        z *= self.spread.index_select(0, labels)[:, None]
        torch.index_select(self.centres, 0, labels, out=out)
        return torch.addmm(out, z, self.basis, out=out)


@dataclass
class Phase:
    wall: float = 0.0
    cpu: float = 0.0  # process CPU time (all threads): cpu / wall < threads = disturbed


@dataclass
class Clock:
    phases: dict[str, Phase] = field(default_factory=lambda: defaultdict(Phase))

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        w0, c0 = time.perf_counter(), time.process_time()
        yield
        phase = self.phases[name]
        phase.wall += time.perf_counter() - w0
        phase.cpu += time.process_time() - c0

    def timed(
        self, stream: ClusteredStream, phase: str = "generate"
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The stream, with the time spent generating each chunk booked to ``phase``."""
        it = iter(stream)
        while True:
            with self(phase):
                item = next(it, None)
            if item is None:
                return
            yield item


def _subset_indices(points: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 17)
    return np.sort(rng.choice(points, size=min(size, points), replace=False))


def _in_chunk(indices: np.ndarray, start: int, size: int) -> np.ndarray:
    """Positions in the sorted ``indices`` that fall in [start, start + size)."""
    lo, hi = np.searchsorted(indices, [start, start + size])
    return np.arange(lo, hi)


def _params(args: argparse.Namespace, stream: ClusteredStream) -> SketchParams:
    """The sketch params, an 'auto' bandwidth chosen as the stage chooses it (width of a
    p-stable sketch, K of an angular one) on a uniform sample: chunk 0 is one."""
    k = args.hashes_per_row
    auto = args.width is None if args.hash == "pstable" else k == "auto"
    choice = None
    if auto:
        _, first = next(iter(stream))
        sample = first[: args.width_sample].numpy()
        if args.hash == "angular":
            choice = choose_hashes(sample, rule=args.width_rule)
        else:
            choice = choose_width(sample, _pstable_k(k), rule=args.width_rule)
    if args.hash == "angular":
        k = choice.hashes_per_row if choice is not None else int(k)
        return SketchParams(
            hash="angular",
            dim=args.dim,
            rows=args.rows,
            hashes_per_row=k,
            buckets=1 << k,
            width=ANGULAR_WIDTH,
            seed=args.seed,
        )
    width = choice.width if choice is not None else args.width
    return SketchParams(
        dim=args.dim,
        rows=args.rows,
        hashes_per_row=_pstable_k(k),
        buckets=args.buckets,
        width=round(width, 4),
        seed=args.seed,
    )


def _pstable_k(k: str) -> int:
    return PSTABLE_HASHES if k == "auto" else int(k)


@dataclass
class Outcome:
    sketch: RaceSketch
    clock: Clock
    subset_scores: np.ndarray
    subset_mean: np.ndarray
    subset_exact: np.ndarray | None
    mean_score: float
    reduce_cost: dict[str, float]


def run(args: argparse.Namespace) -> Outcome:
    stream = ClusteredStream(
        args.points, args.dim, args.clusters, args.latent, args.chunk, args.seed
    )
    sketch = RaceSketch(_params(args, stream), device=args.device)
    subset = _subset_indices(args.points, args.subset, args.seed)
    queries = np.zeros((len(subset), args.dim), dtype=np.float32)
    clock = Clock()

    for start, x in clock.timed(stream):  # pass 1: build
        pos = _in_chunk(subset, start, len(x))
        queries[pos] = x.numpy()[subset[pos] - start]
        with clock("build"):
            sketch.add(x.numpy())

    estimators: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "geometric": functools.partial(sketch.estimate_density, exclude_self=True),
        "mean": sketch.score,
    }
    scores_of_subset = np.zeros(len(subset))
    total = 0.0
    reduce_cost = {name: math.inf for name in estimators}
    for start, x in clock.timed(stream):  # pass 2: score every point
        with clock("score"):
            scores = estimators[args.estimator](x.numpy())
        total += float(scores.sum())
        if start == 0:  # both reductions on the same chunk, alternately; the fastest of 3
            for _ in range(3):
                for name, estimate in estimators.items():
                    t0 = time.perf_counter()
                    estimate(x.numpy())
                    reduce_cost[name] = min(reduce_cost[name], time.perf_counter() - t0)
        pos = _in_chunk(subset, start, len(x))
        scores_of_subset[pos] = scores[subset[pos] - start]

    mean_of_subset = sketch.score(queries)
    exact = _exact_reference(queries, stream, sketch.params, clock) if len(subset) else None
    return Outcome(
        sketch, clock, scores_of_subset, mean_of_subset, exact, total / args.points, reduce_cost
    )


def _exact_reference(
    queries: np.ndarray, stream: ClusteredStream, params: SketchParams, clock: Clock
) -> np.ndarray:
    """Exact KDE of the queries over every point of the stream (a third pass)."""
    q_unit = torch.from_numpy(queries / np.linalg.norm(queries, axis=1, keepdims=True))
    exact = torch.zeros(len(queries), dtype=torch.float64)
    for _, x in clock.timed(stream, "generate (reference)"):
        with clock("exact"):
            unit = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
            accumulate_kde(exact, q_unit, unit, params)
    return exact.numpy()


def _rate(n: int, phase: Phase) -> str:
    return (
        f"{phase.wall:8.2f} s  {n / phase.wall:12,.0f} points/s  "
        f"(CPU {phase.cpu / phase.wall:.2f} cores)"
    )


def report(args: argparse.Namespace, out: Outcome, load_before: str) -> dict[str, float]:
    n, p, ph = args.points, out.sketch.params, out.clock.phases
    exact = out.subset_exact if out.subset_exact is not None else np.zeros(0)
    q = len(exact)
    rho = float(spearmanr(out.subset_scores, exact).statistic) if q > 2 else math.nan
    rho_mean = float(spearmanr(out.subset_mean, exact).statistic) if q > 2 else math.nan
    b = float(p.buckets)
    bias = 0.0 if p.hash == "angular" else n / b  # an angular sketch has no rehash
    estimate = (out.subset_mean - bias) * (b / (b - 1.0)) if bias else out.subset_mean
    rel_err = float(np.median(np.abs(estimate - exact) / exact)) if q else math.nan
    # the stage's estimate leaves the point itself out (G - 1): add it back to compare
    # with the exact KDE, which counts it
    geometric = out.subset_scores + 1.0 if args.estimator == "geometric" else out.subset_mean
    spread = {
        name: float(np.log(np.maximum(v, 1.0) / exact).std()) if q else math.nan
        for name, v in (("geometric", geometric), ("mean", estimate))
    }
    cost = out.reduce_cost
    both = Phase(ph["build"].wall + ph["score"].wall, ph["build"].cpu + ph["score"].cpu)
    gen_sketch = ph["generate"].wall
    per_query_sketch = ph["score"].wall / n
    per_query_exact = ph["exact"].wall / max(1, q)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    rows: list[tuple[str, str]] = [
        ("points x dim", f"{n:,} x {args.dim} fp32, {args.clusters} Zipf clusters"),
        (
            "sketch",
            f"{p.hash} R={p.rows} K={p.hashes_per_row} B={p.buckets} width={p.width} "
            f"({out.sketch.counts.nbytes / 2**20:.1f} MiB)",
        ),
        (
            "threads / OpenMP wait / load",
            f"{torch.get_num_threads()} / {_wait_policy()} / load avg {load_before} -> {_load()}",
        ),
        ("generate (passes 1+2)", f"{gen_sketch:8.2f} s  (excluded from points/s)"),
        ("pass 1 build", _rate(n, ph["build"])),
        ("pass 2 score", _rate(n, ph["score"])),
        ("build + score", _rate(n, both)),
        (
            "build + score + generation",
            f"{both.wall + gen_sketch:8.2f} s  {n / (both.wall + gen_sketch):12,.0f} points/s",
        ),
        (
            f"mean score ({args.estimator})",
            f"{out.mean_score:10.1f}  (rehash bias n/B = {bias:.1f})",
        ),
        (f"exact KDE of {q} queries", f"{ph['exact'].wall:8.2f} s  (each over all {n:,})"),
        (
            "per query sketch / exact",
            f"{per_query_sketch * 1e6:.2f} us / {per_query_exact * 1e3:.1f} ms "
            f"= {per_query_exact / per_query_sketch:,.0f}x",
        ),
        (f"spearman sketch vs exact ({args.estimator})", f"{rho:.4f}"),
        ("spearman, mean of rows (same sketch)", f"{rho_mean:.4f}"),
        ("median rel. err (mean, debiased)", f"{rel_err:.3f}"),
        (
            "sd log(estimate / exact)",
            f"geometric {spread['geometric']:.3f}, mean {spread['mean']:.3f} "
            "(what p = c / density sees)",
        ),
        (
            "score cost geometric / mean",
            f"{cost['geometric'] / cost['mean']:.3f} ({cost['geometric'] * 1e3:.0f} ms vs "
            f"{cost['mean'] * 1e3:.0f} ms for chunk 0, same hashing)",
        ),
        ("peak RSS", f"{peak_mb:,.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    print("-" * (width + 60))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return {
        "points_per_s": n / both.wall,
        "spearman": rho,
        "spearman_mean": rho_mean,
        "peak_rss_mb": peak_mb,
    }


def _wait_policy() -> str:
    if "OMP_WAIT_POLICY" in os.environ:
        return f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    return f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'default')}"


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--subset", type=int, default=2000, help="queries for the exact reference")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--latent", type=int, default=32, help="intrinsic dimension of the noise")
    ap.add_argument("--chunk", type=int, default=65536, help="points generated per chunk")
    ap.add_argument("--rows", type=int, default=100, help="R (the stage default)")
    defaults = SketchSettings()
    ap.add_argument(
        "--hash", default=defaults.hash, choices=["pstable", "angular"], help="LSH family"
    )
    ap.add_argument(
        "--hashes-per-row",
        default=str(defaults.hashes_per_row),
        help="K, or auto (angular: chosen from the data; pstable: 8)",
    )
    ap.add_argument("--buckets", type=int, default=4096, help="B (pstable; angular: 2^K)")
    ap.add_argument(
        "--width", type=float, default=None, help="pstable width; default: auto (choose_width)"
    )
    ap.add_argument("--width-rule", default="spread", choices=["spread", "nn_quantile"])
    ap.add_argument("--width-sample", type=int, default=2000, help="sample for the auto width")
    ap.add_argument("--device", default="cpu", help="where points are hashed: cpu, cuda")
    ap.add_argument(
        "--estimator",
        default="geometric",
        choices=["geometric", "mean"],
        help="pass 2's reduction over rows (geometric: the stage's)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    load_before = _load()
    res = report(args, run(args), load_before)
    print(
        f"RESULT density points_per_s={res['points_per_s']:.0f} "
        f"spearman={res['spearman']:.4f} spearman_mean={res['spearman_mean']:.4f} "
        f"peak_rss_mb={res['peak_rss_mb']:.0f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
