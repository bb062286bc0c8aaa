"""How well a cheap student learns an expensive teacher, and how much cheaper it is.

``python -m bench.classifier [--n N] [--teacher-model M] [--teacher-examples builtin]
[--max-tokens T] [--hidden H]``:

1. a corpus of short texts: the first ~60 words of real news documents (gensim's Lee
   corpus), the single-line technical paragraphs of ``bench.paragraphs``, and junk made
   from both (spam, navigation, gibberish, repeats, shuffled words);
2. the teacher, Ask-LLM with the packaged model on CPU (configurable; ``--teacher-examples
   builtin`` adds the four few-shot turns of ``ask_llm.examples: builtin``), scores all of
   them (P(yes), timed);
3. the student (frozen all-MiniLM-L6-v2 + a torch head) is trained on a stratified share
   of the teacher's labels (kept = P(yes) above its median) and evaluated on the rest:
   ROC AUC against the teacher's labels, agreement, Spearman with the teacher's scores;
4. docs/s of the teacher and of the student (embedding + head) on the same texts.

The last line is ``RESULT classifier auc_vs_teacher=.. speedup_vs_teacher=..``. The goal
is AUC >= 0.9 against the teacher's own labels and >= 50x the teacher's speed.
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np


def corpus(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` short texts (kinds alongside): 3/4 real, 1/4 junk, shuffled."""
    from bench.paragraphs import REAL_PARAGRAPHS
    from services.demo.corpus import _GENERATORS, JUNK_TYPES, _lee_documents

    rng = random.Random(seed)
    lee = [" ".join(d.split()[:60]) for d in _lee_documents()]
    real = list(REAL_PARAGRAPHS) + lee
    rng.shuffle(real)
    n_real = min(len(real), round(n * 0.75))
    texts = real[:n_real]
    kinds = ["real"] * n_real
    while len(texts) < n:
        kind = JUNK_TYPES[len(texts) % len(JUNK_TYPES)]
        words = _GENERATORS[kind](rng, real).split()
        texts.append(" ".join(words[: rng.randint(30, 70)]))
        kinds.append(f"junk:{kind}")
    order = list(range(len(texts)))
    rng.shuffle(order)
    return [texts[i] for i in order], [kinds[i] for i in order]


def main(argv: list[str] | None = None) -> int:
    from services.runtime.backends.base import ModelSettings
    from services.runtime.backends.embeddings import EmbeddingSettings, create_embedder
    from services.runtime.domain import Sample
    from services.runtime.evaluation import roc_auc, spearman
    from services.scoring.classifier import TrainConfig, evaluate, train_head
    from services.scoring.core import ScoringCore
    from services.scoring.settings import ScoringSettings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240, help="texts the teacher labels")
    ap.add_argument("--teacher-model", default=ModelSettings().model)
    ap.add_argument("--teacher-backend", default="torch")
    ap.add_argument(
        "--teacher-examples",
        default="none",
        help="Ask-LLM few-shot examples: 'none' (the paper's zero-shot prompt) or 'builtin'",
    )
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens of each text either reads")
    ap.add_argument("--embedding-model", default="packaged:all-minilm-l6-v2")
    ap.add_argument("--hidden", type=int, default=0, help="MLP hidden units (0 = linear head)")
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    texts, kinds = corpus(args.n, args.seed)
    settings = ScoringSettings(steps=["ask_llm"])
    settings.model.model = args.teacher_model
    settings.model.backend = args.teacher_backend
    settings.model.max_tokens = args.max_tokens
    if args.teacher_examples != "none":
        settings.ask_llm.examples = args.teacher_examples
    core = ScoringCore(settings)
    core.backend  # load outside the timing  # noqa: B018
    core.score([Sample(id="warm", text=texts[0])], apply_policy=False)
    samples = [Sample(id=str(i), text=t) for i, t in enumerate(texts)]
    t0 = time.perf_counter()
    core.score(samples, apply_policy=False)
    teacher_s = time.perf_counter() - t0
    teacher = np.array([s.scores["ask_llm"] for s in samples])

    embedder = create_embedder(
        EmbeddingSettings(model=args.embedding_model, max_tokens=args.max_tokens)
    )
    embedder.embed(texts[:4])  # warm
    t0 = time.perf_counter()
    x = embedder.embed(texts)
    embed_s = time.perf_counter() - t0
    y = (teacher > np.median(teacher)).astype(np.float64)
    head, test_idx, probs = train_head(
        x, y, TrainConfig(hidden=args.hidden, test_fraction=args.test_fraction, seed=args.seed)
    )
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        head(torch.from_numpy(x).float())
    head_s = time.perf_counter() - t0
    student_s = embed_s + head_s
    m = evaluate(y[test_idx], probs, teacher[test_idx])

    real = np.array([k == "real" for k in kinds])
    print(
        f"teacher: Ask-LLM {core.model_version} (max_tokens {args.max_tokens}, examples "
        f"{args.teacher_examples}); student: "
        f"{embedder.model_version} + {'linear' if not args.hidden else f'MLP {args.hidden}'} head"
    )
    print(
        f"texts {len(texts)} (real {int(real.sum())}, junk {int((~real).sum())}); student "
        f"trained on {len(texts) - len(test_idx)}, evaluated on {len(test_idx)} held out\n"
    )
    header = f"{'':<26}{'teacher':>12}{'student':>12}"
    print(header)
    print("-" * len(header))
    print(f"{'docs/s':<26}{len(texts) / teacher_s:>12.1f}{len(texts) / student_s:>12.1f}")
    print(f"{'seconds for all texts':<26}{teacher_s:>12.1f}{student_s:>12.2f}")
    with torch.no_grad():
        student_all = torch.sigmoid(head(torch.from_numpy(x).float()).squeeze(-1)).numpy()
    print(
        f"{'AUC real vs junk (all)':<26}{roc_auc(real, teacher):>12.3f}"
        f"{roc_auc(real, student_all):>12.3f}"
    )
    print()
    print(f"student vs teacher on held-out ({len(test_idx)}):")
    print(f"  AUC vs teacher's labels    {m['auc']:.3f}")
    print(f"  agreement                  {m['agreement']:.3f}")
    print(f"  Spearman vs teacher score  {m.get('spearman_vs_teacher_score', float('nan')):.3f}")
    print(f"  ECE / Brier                {m['ece']:.3f} / {m['brier']:.3f}")
    print(f"  Spearman (all texts)       {spearman(teacher, student_all):.3f}")
    speedup = (len(texts) / student_s) / (len(texts) / teacher_s)
    print(f"RESULT classifier auc_vs_teacher={m['auc']:.3f} speedup_vs_teacher={speedup:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
