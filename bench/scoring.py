"""How fast the batched Ask-LLM scorer is, against a naive loop and against the hardware.

``python -m bench.scoring [--quick]`` scores the same real news documents (gensim's
``lee_background.cor``) twice with the same model and dtype: once through
``TorchBackend.next_token_logprobs`` (length buckets, left padding, LM head on the last
position only) and once with a per-sample loop (one unpadded forward per prompt with the
full logits). It reports tokens/s, achieved FLOP/s (2 x parameters x prompt tokens / time)
and that as a fraction of this machine's matmul peak, measured here with a square matmul in
the same dtype, so the number means something on any host. It also checks both methods
give the same scores. The last line is ``RESULT scoring speedup_vs_naive=.. flop_fraction=..
tokens_per_s=..``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from services.runtime.backends.base import ModelSettings
from services.runtime.backends.torch_backend import TorchBackend
from services.scoring.prompts import (
    answer_token_ids,
    build_ask_llm_prompt,
    normalized_yes_probability,
)


@dataclass(frozen=True, slots=True)
class Run:
    """One timed scoring pass."""

    method: str
    samples: int
    tokens: int
    seconds: float
    logprobs: np.ndarray


def load_texts(n: int) -> list[str]:
    """``n`` real human-written news documents (one per line), cycled if n > 300."""
    from gensim.test.utils import datapath

    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        docs = [line.strip() for line in f if line.strip()]
    return [docs[i % len(docs)] for i in range(n)]


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, n: int = 2048) -> float:
    """Best FLOP/s of an n^3 matmul: what this machine's torch can do at best in ``dtype``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        torch.matmul(a, b)  # warm-up (kernel selection, AMX tile setup)
        for _ in range(8):
            _sync(device)
            start = time.perf_counter()
            torch.matmul(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_logprobs(backend: TorchBackend, prompts: list[str], candidates: list[int]) -> np.ndarray:
    """The plain way: one unpadded forward per prompt, full logits, read the last row."""
    model = backend.model
    device = next(model.parameters()).device
    cand = torch.tensor(candidates, device=device)
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([backend.encode_prompt(prompt)], device=device)
            logits = model(input_ids=ids).logits
            rows.append(torch.log_softmax(logits[0, -1].float(), dim=-1)[cand].double().cpu())
    return torch.stack(rows).numpy()


def best_of(
    reps: int,
    methods: dict[str, Callable[[list[str], list[int]], np.ndarray]],
    prompts: list[str],
    candidates: list[int],
    tokens: int,
    device: torch.device,
) -> list[Run]:
    """Each method's fastest of ``reps`` passes, the methods interleaved.

    Shared or virtual machines have noisy neighbours; interleaving exposes both methods to
    the same interference, and the best pass is the least disturbed one.
    """
    for fn in methods.values():
        fn(prompts[:2], candidates)  # warm-up: first-call kernel and allocator setup
    best: dict[str, Run] = {}
    for _ in range(reps):
        for method, fn in methods.items():
            _sync(device)
            start = time.perf_counter()
            logprobs = fn(prompts, candidates)
            _sync(device)
            run = Run(method, len(prompts), tokens, time.perf_counter() - start, logprobs)
            if method not in best or run.seconds < best[method].seconds:
                best[method] = run
    return [best[m] for m in methods]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small subset (< 45 s on 2 cores)")
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=0, help="documents (default 12 / 96)")
    parser.add_argument("--max-tokens", type=int, default=256, help="sample text token budget")
    parser.add_argument("--batch-tokens", type=int, default=0, help="padded tokens per pass")
    parser.add_argument("--reps", type=int, default=0, help="passes per method, best kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args(argv)
    samples = args.samples or (12 if args.quick else 96)
    reps = args.reps or 3

    fields = {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
    }
    if args.batch_tokens:  # else the production default, so the bench measures what runs
        fields["batch_tokens"] = args.batch_tokens
    settings = ModelSettings.model_validate(fields)
    start = time.perf_counter()
    backend = TorchBackend(settings)
    load_s = time.perf_counter() - start
    device = torch.device(settings.device)
    n_params = sum(p.numel() for p in backend.model.parameters())

    texts = [backend.truncate(t, settings.max_tokens) for t in load_texts(samples)]
    prompts = [backend.render_chat(build_ask_llm_prompt(t)) for t in texts]
    yes, no = answer_token_ids(backend)
    candidates = yes + no
    tokens = sum(len(backend.encode_prompt(p)) for p in prompts)

    peak = matmul_peak_flops(backend.dtype, device)
    methods = {
        "naive per-sample": lambda p, c: naive_logprobs(backend, p, c),
        "batched (backend)": backend.next_token_logprobs,
    }
    naive, batched = best_of(reps, methods, prompts, candidates, tokens, device)
    peak = max(peak, matmul_peak_flops(backend.dtype, device))

    print(
        f"model {backend.model_version} ({n_params / 1e6:.1f}M params, loaded in {load_s:.1f} s) "
        f"on {device} with {torch.get_num_threads()} threads; {samples} docs, text <= "
        f"{settings.max_tokens} tokens, {tokens / samples:.0f} prompt tokens/doc, "
        f"batch_tokens {settings.batch_tokens}, best of {reps} interleaved passes"
    )
    print(f"matmul peak (2048^3, {backend.dtype}, best before/after): {peak / 1e9:,.0f} GFLOP/s")
    print()
    header = f"{'method':<20}{'samples':>8}{'tokens':>9}{'seconds':>9}{'tokens/s':>10}"
    print(header + f"{'GFLOP/s':>9}{'% peak':>8}")
    for run in (naive, batched):
        flops = 2 * n_params * run.tokens / run.seconds
        print(
            f"{run.method:<20}{run.samples:>8}{run.tokens:>9}{run.seconds:>9.2f}"
            f"{run.tokens / run.seconds:>10,.0f}{flops / 1e9:>9,.0f}{100 * flops / peak:>7.1f}%"
        )
    p_naive = normalized_yes_probability(naive.logprobs, len(yes))
    p_batched = normalized_yes_probability(batched.logprobs, len(yes))
    print()
    d_logprob = np.abs(batched.logprobs - naive.logprobs).max()
    print(
        f"agreement batched vs naive: max |d logprob| {d_logprob:.2e}"
        f", max |d P(yes)| {np.abs(p_batched - p_naive).max():.2e}"
        f" (P(yes) range {p_batched.min():.3f}..{p_batched.max():.3f})"
    )
    print(
        "FLOPs counted as 2 x all parameters x prompt tokens; the batched path applies the "
        "LM head at one position per prompt, so it executes fewer FLOPs than counted."
    )
    speedup = naive.seconds / batched.seconds
    fraction = 2 * n_params * batched.tokens / batched.seconds / peak
    print(
        f"RESULT scoring speedup_vs_naive={speedup:.2f} flop_fraction={fraction:.3f} "
        f"tokens_per_s={batched.tokens / batched.seconds:.0f}"
    )


if __name__ == "__main__":
    main()
