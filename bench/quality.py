"""How well each signal separates real text from junk on the demo corpus.

``python -m bench.quality [--quick] [--model M]``: scores every demo document
with every signal (no drops, so each signal sees the whole corpus) and prints
the ROC AUC of real-vs-junk per signal and per junk type. This is the honest
number behind the README's claim about the packaged model.

``python -m bench.quality --paragraphs``: the heuristic rules only (no model), on the demo
corpus and on a labelled set of short single-line technical paragraphs with markdown
emphasis (``bench.paragraphs``), per preset: real text kept, junk caught per type.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def auc(pos: list[float], neg: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties half."""
    if not pos or not neg:
        return float("nan")
    p = np.asarray(pos)[:, None]
    n = np.asarray(neg)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def main(argv: list[str] | None = None) -> int:
    from services.demo.corpus import JUNK_TYPES, build_demo_corpus
    from services.runtime.backends.base import ModelSettings
    from services.runtime.domain import Sample
    from services.scoring.core import ScoringCore
    from services.scoring.settings import ScoringSettings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 60-document subset")
    ap.add_argument("--model", default=ModelSettings().model)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument(
        "--paragraphs",
        action="store_true",
        help="heuristics only: the demo corpus and the paragraph set, per preset (no model)",
    )
    args = ap.parse_args(argv)
    if args.paragraphs:
        return paragraph_table()

    records = build_demo_corpus(seed=0)
    if args.quick:
        records = records[:60]
    settings = ScoringSettings()
    settings.model.model = args.model
    settings.model.backend = args.backend
    settings.model.max_tokens = args.max_tokens
    core = ScoringCore(settings)
    samples = [Sample(id=r.id, text=r.text, metadata={"kind": r.kind}) for r in records]
    t0 = time.perf_counter()
    passed = [not core.heuristics.evaluate(s.text).failed for s in samples]
    core.score(samples, ["perplexity", "ask_llm"], apply_policy=False)
    seconds = time.perf_counter() - t0

    kinds = [s.metadata["kind"] for s in samples]
    real = [i for i, k in enumerate(kinds) if k == "real"]
    junk = [i for i, k in enumerate(kinds) if k != "real"]
    # orient every signal so that higher = "looks like real text"
    sig = {
        "ask_llm": [s.scores["ask_llm"] for s in samples],
        "-perplexity": [-s.scores["perplexity"] for s in samples],
        "heuristics_pass": [float(p) for p in passed],
    }
    print(
        f"model={core.model_version}  docs={len(samples)} (real {len(real)}, junk {len(junk)})"
        f"  {seconds:.1f}s\n"
    )
    header = f"{'signal':<18}{'AUC all':>9}" + "".join(f"{t:>12}" for t in JUNK_TYPES)
    print(header)
    print("-" * len(header))
    results: dict[str, float] = {}
    for name, vals in sig.items():
        row = f"{name:<18}{auc([vals[i] for i in real], [vals[i] for i in junk]):>9.3f}"
        results[name] = auc([vals[i] for i in real], [vals[i] for i in junk])
        for t in JUNK_TYPES:
            jt = [i for i, k in enumerate(kinds) if k == f"junk:{t}"]
            row += f"{auc([vals[i] for i in real], [vals[i] for i in jt]):>12.3f}"
        print(row)
    print("\nAUC = P(a real document scores above a junk document); 0.5 = chance.")
    real_pass = np.mean([passed[i] for i in real])
    junk_caught = 1 - np.mean([passed[i] for i in junk])
    print(f"heuristics: real documents passing {real_pass:.1%}, junk caught {junk_caught:.1%}")
    print(
        f"RESULT quality ask_llm_auc={results['ask_llm']:.3f} "
        f"perplexity_auc={results['-perplexity']:.3f} heuristics_real_pass={real_pass:.3f} "
        f"heuristics_junk_recall={junk_caught:.3f}"
    )
    return 0


def paragraph_table() -> int:
    """Heuristic rules per preset on the demo corpus (documents) and the paragraph set."""
    from collections import Counter

    from bench.paragraphs import REAL_PARAGRAPHS, paragraph_junk
    from services.demo.corpus import JUNK_TYPES, build_demo_corpus
    from services.scoring.heuristics import HeuristicFilter, HeuristicSettings

    demo = [(r.kind.removeprefix("junk:"), r.text) for r in build_demo_corpus(seed=0)]
    paras = [("real", t) for t in REAL_PARAGRAPHS] + paragraph_junk(seed=0)
    header = (
        f"{'set':<11}{'preset':<11}{'real kept':>10}{'junk caught':>12}{'bal.acc':>8}"
        + "".join(f"{t[:9]:>10}" for t in JUNK_TYPES)
        + f"{'docs/s':>9}  real drop reasons"
    )
    print(header)
    print("-" * len(header))
    out: dict[str, float] = {}
    for name, rows in (("demo", demo), ("paragraphs", paras)):
        for preset in ("document", "paragraph"):
            filt = HeuristicFilter(HeuristicSettings(preset=preset))
            t0 = time.perf_counter()
            results = [(kind, filt.evaluate(text)) for kind, text in rows]
            rate = len(rows) / (time.perf_counter() - t0)
            real = [r for k, r in results if k == "real"]
            junk = [r for k, r in results if k != "real"]
            kept = float(np.mean([r.passed for r in real]))
            caught = float(np.mean([not r.passed for r in junk]))
            per = [np.mean([not r.passed for k, r in results if k == t]) for t in JUNK_TYPES]
            why = Counter(r.failed[0] for r in real if r.failed).most_common(3)
            print(
                f"{name:<11}{preset:<11}{kept:>10.1%}{caught:>12.1%}{(kept + caught) / 2:>8.3f}"
                + "".join(f"{p:>10.0%}" for p in per)
                + f"{rate:>9.0f}  "
                + ", ".join(f"{k}={v}" for k, v in why)
            )
            out[f"{name}_{preset}_real"] = kept
            out[f"{name}_{preset}_junk"] = caught
    print(
        "RESULT quality_paragraphs "
        + " ".join(
            f"{k}={v:.3f}"
            for k, v in out.items()
            if "paragraphs_paragraph" in k or "demo_document" in k
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
