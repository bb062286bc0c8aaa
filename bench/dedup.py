"""Near-duplicate detection: precision and recall per similarity band, and documents/s of the
dedup stage's core against datasketch's MinHashLSH on the same corpus, in one run.

``python -m bench.dedup [--variants 12] [--repeat 3] [--no-redis]``

**Corpus.** Real articles from the demo corpus (the Lee news corpus gensim ships), kept only
if no two share more than 0.3 of their word 5-grams, are the *originals*. Each gets
``--variants`` edited copies: random word deletions, insertions (words of other articles),
adjacent swaps and boilerplate lines (a newsletter footer, a share bar, a copyright line),
at edit rates spread so the copies land at every Jaccard similarity from ~0.3 to 1. The
stream is every original (shuffled), then every copy (shuffled).

**Ground truth** is exact: the Jaccard similarity of the normalised texts' word 5-gram sets
(the stage's own normalisation and shingles, FineWeb's recipe), of every copy against every
earlier document of its cluster (its original and the copies before it); a document is a
true near-duplicate when that maximum is >= the stage's threshold (0.8). Across clusters the
originals' largest Jaccard is measured and printed (it must stay far below 0.8).

**Measured.** Recall per band of that true Jaccard (the share of documents the method drops);
precision = dropped documents whose *named* earlier document really has Jaccard >= 0.8 with
them (computed exactly) / all dropped. Both methods decide the same way: 112 permutations,
14 bands x 8 rows, a band hit confirmed when the signatures' estimated Jaccard reaches the
stage's ``near.threshold`` (0.82), every document indexed (kept or not). They differ in what
a band remembers: datasketch every document in the bucket, the stage the first one (one
Redis key per band, SET NX). The stage runs its full core (normalise, exact digest,
MinHash, LSH claims in its embedded SQLite store, lineage) on batches of 256; datasketch runs
MinHash + MinHashLSH query, confirm, insert per document. docs/s: best of ``--repeat`` runs
each, alternating. With a ``redis-server`` on PATH or in the venv, the state size per
document is measured per level on a real Redis (``INFO memory`` used_memory growth).

Last line: ``RESULT dedup docs_per_s=<stage> recall=<at J >= 0.9> precision=<p>
speedup_vs_datasketch=<x>``.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from services.dedup.core import META_DUPLICATE_OF, DedupCore
from services.dedup.minhash import normalise
from services.dedup.settings import DedupSettings
from services.dedup.store import create_store
from services.runtime.domain import Sample

THRESHOLD = 0.8  # the truth: a near-duplicate shares >= 80% of its 5-grams with an earlier doc
VERIFY = DedupSettings().near.threshold  # what both methods confirm a band hit at
NUM_PERM, BANDS, ROWS, NGRAM = 112, 14, 8, 5
BANDS_EDGES = (0.0, 0.5, 0.7, 0.8, 0.9, 1.0001)
BOILERPLATE = (
    "Subscribe to our newsletter to get the latest news delivered to your inbox every morning.",
    "Share this article on Facebook Twitter LinkedIn Email Print",
    "Copyright 2001 all rights reserved. This material may not be published, broadcast, "
    "rewritten or redistributed.",
)
RATES = (0.0, 0.002, 0.005, 0.008, 0.012, 0.016, 0.02, 0.025, 0.03, 0.04, 0.06, 0.1)


@dataclass
class Doc:
    id: str
    text: str
    cluster: int


def shingles(text: str) -> frozenset[str]:
    w = normalise(text).split()
    if len(w) < NGRAM:
        return frozenset([" ".join(w)]) if w else frozenset()
    return frozenset(" ".join(w[i : i + NGRAM]) for i in range(len(w) - NGRAM + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def originals(min_words: int = 60, max_cross: float = 0.3) -> tuple[list[str], float]:
    from services.demo.corpus import build_demo_corpus

    texts = [r.text for r in build_demo_corpus(seed=0) if r.kind == "real"]
    picked: list[str] = []
    sets: list[frozenset[str]] = []
    for t in texts:
        s = shingles(t)
        if len(t.split()) < min_words or any(jaccard(s, o) > max_cross for o in sets):
            continue
        picked.append(t)
        sets.append(s)
    cross = max((jaccard(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]), default=0.0)
    return picked, cross


def variant(rng: random.Random, text: str, vocab: Sequence[str]) -> str:
    words = text.split()
    rate = rng.choice(RATES)
    out: list[str] = []
    for w in words:
        r = rng.random()
        if r < rate:  # deletion
            continue
        out.append(w)
        if r < 2 * rate:  # insertion
            out.append(rng.choice(vocab))
    for _ in range(int(len(out) * rate)):  # adjacent swaps
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    body = " ".join(out)
    if rng.random() < 0.3:
        line = rng.choice(BOILERPLATE)
        body = f"{body}\n{line}" if rng.random() < 0.5 else f"{line}\n{body}"
    return body


def build_corpus(variants: int, seed: int = 0) -> tuple[list[Doc], float]:
    rng = random.Random(seed)
    base, cross = originals()
    vocab = [w for t in base for w in t.split()]
    first = [Doc(f"o{i:04d}", t, i) for i, t in enumerate(base)]
    copies = [
        Doc(f"c{i:04d}-{k:02d}", variant(rng, t, vocab), i)
        for i, t in enumerate(base)
        for k in range(variants)
    ]
    rng.shuffle(first)
    rng.shuffle(copies)
    return first + copies, cross


def truth(docs: list[Doc]) -> tuple[np.ndarray, dict[str, frozenset[str]]]:
    """Each document's max exact Jaccard with an earlier document of its cluster."""
    sets = {d.id: shingles(d.text) for d in docs}
    seen: dict[int, list[str]] = {}
    best = np.zeros(len(docs))
    for i, d in enumerate(docs):
        earlier = seen.setdefault(d.cluster, [])
        best[i] = max((jaccard(sets[d.id], sets[e]) for e in earlier), default=0.0)
        earlier.append(d.id)
    return best, sets


Method = Callable[[list[Doc]], dict[str, str]]
"""Runs a fresh dedup over the stream; returns dropped id -> the id it names."""


def run_stage(docs: list[Doc], batch: int = 256) -> dict[str, str]:
    settings = DedupSettings()  # defaults: exact + near (14 x 8, verify at 0.8), SQLite
    core = DedupCore(settings, store=create_store(settings.state))
    dropped: dict[str, str] = {}
    for i in range(0, len(docs), batch):
        samples = [Sample(id=d.id, text=d.text) for d in docs[i : i + batch]]
        for o in core.process(samples):
            if not o.kept:
                dropped[o.sample.id] = o.sample.metadata[META_DUPLICATE_OF]
    core.store.close()
    return dropped


def run_datasketch(docs: list[Doc]) -> dict[str, str]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=NUM_PERM, params=(BANDS, ROWS))
    sigs: dict[str, MinHash] = {}
    dropped: dict[str, str] = {}
    for d in docs:
        w = normalise(d.text).split()
        grams = [" ".join(w[i : i + NGRAM]).encode() for i in range(max(1, len(w) - NGRAM + 1))]
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch(grams)
        best, best_j = "", -1.0
        for other in lsh.query(m):
            j = m.jaccard(sigs[other])
            if j > best_j:
                best, best_j = other, j
        if best and best_j >= VERIFY:
            dropped[d.id] = best
        lsh.insert(d.id, m)
        sigs[d.id] = m
    return dropped


@dataclass
class Quality:
    recall: dict[str, float]
    counts: dict[str, int]
    precision: float
    flagged: int


def score(
    docs: list[Doc], best: np.ndarray, sets: dict[str, frozenset[str]], dropped: dict[str, str]
) -> Quality:
    flags = np.array([d.id in dropped for d in docs])
    recall, counts = {}, {}
    for lo, hi in pairwise(BANDS_EDGES):
        name = f"[{lo:.1f}, {min(hi, 1.0):.1f}{']' if hi > 1 else ')'}"
        sel = (best >= lo) & (best < hi)
        counts[name] = int(sel.sum())
        recall[name] = float(flags[sel].mean()) if sel.any() else float("nan")
    hi_sel = best >= 0.9
    recall["J>=0.9"] = float(flags[hi_sel].mean())
    recall["J>=0.8"] = float(flags[best >= THRESHOLD].mean())
    right = sum(jaccard(sets[a], sets[b]) >= THRESHOLD for a, b in dropped.items())
    return Quality(recall, counts, right / max(1, len(dropped)), len(dropped))


def timed(method: Method, docs: list[Doc], repeat: int) -> tuple[float, dict[str, str]]:
    best_t, out = float("inf"), {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = method(docs)
        best_t = min(best_t, time.perf_counter() - t0)
    return best_t, out


def redis_binary() -> str | None:
    venv = Path(sys.executable).with_name("redis-server")
    return str(venv) if venv.is_file() else shutil.which("redis-server")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_state(docs: list[Doc]) -> list[tuple[str, float, float]] | None:
    exe = redis_binary()
    if exe is None:
        return None
    import redis

    port = _free_port()
    work = tempfile.mkdtemp(prefix="bench-dedup-redis-")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        configs = {
            "exact": {"near": {"enabled": False}},
            "near (14 bands)": {"exact": {"enabled": False}, "near": {"verify": False}},
            "near + verify (signatures)": {"exact": {"enabled": False}},
            "exact + near + verify (default)": {},
        }
        rows = []
        for name, cfg in configs.items():
            client.flushall()
            before = int(client.info("memory")["used_memory"])
            settings = DedupSettings.model_validate(
                {**cfg, "state": {"backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0"}}
            )
            core = DedupCore(settings, store=create_store(settings.state))
            for i in range(0, len(docs), 256):
                core.process([Sample(id=d.id, text=d.text) for d in docs[i : i + 256]])
            after = int(client.info("memory")["used_memory"])
            rows.append((name, (after - before) / len(docs), client.dbsize() / len(docs)))
        return rows
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dedup", description=__doc__.split("\n")[0])
    ap.add_argument("--variants", type=int, default=12, help="edited copies per original")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method (best kept)")
    ap.add_argument("--no-redis", action="store_true", help="skip the state-size measurement")
    args = ap.parse_args(argv)

    docs, cross = build_corpus(args.variants)
    best, sets = truth(docs)
    n_orig = sum(d.id.startswith("o") for d in docs)
    print(
        f"corpus: {n_orig} originals + {len(docs) - n_orig} edited copies = {len(docs)} docs; "
        f"largest Jaccard between originals {cross:.3f}"
    )
    run_stage(docs[:300])  # warm-up: imports, numpy caches
    run_datasketch(docs[:300])
    times: dict[str, float] = {"stage": float("inf"), "datasketch": float("inf")}
    results: dict[str, dict[str, str]] = {}
    for _ in range(args.repeat):  # alternate, so both see the same machine load
        for name, method in (("stage", run_stage), ("datasketch", run_datasketch)):
            t, out = timed(method, docs, 1)
            times[name] = min(times[name], t)
            results[name] = out
    q = {name: score(docs, best, sets, results[name]) for name in results}

    stage_q, ds_q = q["stage"], q["datasketch"]
    print()
    print("| true Jaccard vs earlier docs | docs | stage dropped | datasketch dropped |")
    print("|---|---|---|---|")
    for band, count in stage_q.counts.items():
        print(f"| {band} | {count} | {stage_q.recall[band]:.3f} | {ds_q.recall[band]:.3f} |")
    print()
    rate = {name: len(docs) / t for name, t in times.items()}
    print("| method | recall J>=0.9 | recall J>=0.8 | precision | dropped | docs/s |")
    print("|---|---|---|---|---|---|")
    for name, label in (("stage", "dedup stage core (numpy MinHash, SQLite)"),
                        ("datasketch", "datasketch 2.0.0 MinHash + MinHashLSH")):  # fmt: skip
        x = q[name]
        print(
            f"| {label} | {x.recall['J>=0.9']:.3f} | {x.recall['J>=0.8']:.3f} | "
            f"{x.precision:.3f} | {x.flagged} | {rate[name]:,.0f} |"
        )
    speedup = rate["stage"] / rate["datasketch"]
    if not args.no_redis:
        rows = measure_state(docs)
        if rows is None:
            print("\n(no redis-server found: state size not measured)")
        else:
            print("\n| state on Redis 7 (level) | bytes/doc | keys/doc |")
            print("|---|---|---|")
            for name, per_doc, keys in rows:
                print(f"| {name} | {per_doc:,.0f} | {keys:.1f} |")
    print(
        f"\nRESULT dedup docs_per_s={rate['stage']:.0f} recall={stage_q.recall['J>=0.9']:.3f} "
        f"precision={stage_q.precision:.3f} speedup_vs_datasketch={speedup:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
