"""How fast the batched Ask-LLM scorer is, against a naive loop and against the hardware.

``python -m bench.scoring [--quick] [--sizes 135m,1.7b] [--device cuda]`` scores the same
real news documents (gensim's ``lee_background.cor``) with the same model and dtype three
ways: a per-sample loop (one unpadded forward per prompt with the full logits), the
backend's padded length buckets (``packing: off``: left padding, LM head on the last
position only) and its padding-free packed rows (``packing: on``: prompts back to back,
position ids restarting per prompt). It reports tokens/s, the tokens each method computed
(padding included), achieved FLOP/s (2 x parameters x prompt tokens / time) and that as a
fraction of this machine's matmul peak, measured with a square matmul in the same dtype
(8192^3 on a GPU, 2048^3 on a CPU, ``--peak-n``), so the number means something on any
host. It checks that every method gives the same scores.

``--sizes`` runs random-init checkpoints of real shapes (``bench.shapes``: SmolLM2's 135M,
360M, 1.7B with the packaged tokenizer; built once into the bench cache, on ``--device``)
instead of ``--model``: no hub is needed, and throughput does not depend on the weights.
The last line is ``RESULT scoring speedup_vs_naive=.. flop_fraction=.. tokens_per_s=..
packed_vs_padded=..`` for the last size, where flop_fraction and tokens_per_s are those of
what ``packing: auto`` runs on this device (packed on CUDA, padded on CPU).
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

from bench.shapes import checkpoints_for
from services.runtime.backends.base import ModelSettings
from services.runtime.backends.torch_backend import TorchBackend, length_buckets, packed_passes
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


def peak_size(device: torch.device) -> int:
    """The square matmul that measures the peak: 8192^3 on a GPU (2048^3 leaves it
    launch-bound and overstates the fraction), 2048^3 on a CPU (seconds, not minutes)."""
    return 8192 if device.type == "cuda" else 2048


def device_name(device: torch.device) -> str:
    """What the numbers were measured on: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return "cpu"


def computed_tokens(backend: TorchBackend, lengths: list[int], packed: bool) -> int:
    """Token positions a method runs through the model, padding and row filler included."""
    if not packed:
        return sum(
            len(b) * max(lengths[i] for i in b)
            for b in length_buckets(lengths, backend.batch_tokens)
        )
    passes = packed_passes(lengths, backend.settings.pack_tokens, backend.batch_tokens)
    return sum(len(rows) * max(sum(lengths[i] for i in row) for row in rows) for rows in passes)


def bench_model(args: argparse.Namespace, model: str, samples: int, reps: int) -> dict[str, float]:
    fields = {
        "model": model,
        "dtype": args.dtype,
        "device": args.device,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "packing": "off",
    }
    if args.batch_tokens:  # else the production default (auto), so the bench measures what runs
        fields["batch_tokens"] = args.batch_tokens
    settings = ModelSettings.model_validate(fields)
    start = time.perf_counter()
    padded_backend = TorchBackend(settings)
    load_s = time.perf_counter() - start
    packed_backend = TorchBackend(settings.model_copy(update={"packing": "on"}))
    device = torch.device(settings.device)
    n_params = sum(p.numel() for p in padded_backend.model.parameters())

    backend = padded_backend
    texts = [backend.truncate(t, settings.max_tokens) for t in load_texts(samples)]
    prompts = [backend.render_chat(build_ask_llm_prompt(t)) for t in texts]
    yes, no = answer_token_ids(backend)
    candidates = yes + no
    lengths = [len(backend.encode_prompt(p)) for p in prompts]
    tokens = sum(lengths)
    computed = {
        "naive per-sample": tokens,
        "padded buckets": computed_tokens(backend, lengths, packed=False),
        "packed rows": computed_tokens(packed_backend, lengths, packed=True),
    }

    peak = matmul_peak_flops(backend.dtype, device, args.peak_n)
    methods = {
        "naive per-sample": lambda p, c: naive_logprobs(backend, p, c),
        "padded buckets": padded_backend.next_token_logprobs,
        "packed rows": packed_backend.next_token_logprobs,
    }
    runs = best_of(reps, methods, prompts, candidates, tokens, device)
    peak = max(peak, matmul_peak_flops(backend.dtype, device, args.peak_n))

    print(
        f"\nmodel {model}: {backend.model_version} ({n_params / 1e6:,.0f}M params, loaded in "
        f"{load_s:.1f} s) on {device_name(device)} with {torch.get_num_threads()} threads; "
        f"{samples} docs, text <= {settings.max_tokens} tokens, {tokens / samples:.0f} prompt "
        f"tokens/doc (min {min(lengths)}, max {max(lengths)}), batch_tokens "
        f"{backend.batch_tokens}, pack_tokens {packed_backend.settings.pack_tokens}, best of "
        f"{reps} interleaved passes"
    )
    print(
        f"matmul peak ({args.peak_n}^3, {backend.dtype}, best before/after): "
        f"{peak / 1e9:,.0f} GFLOP/s"
    )
    print()
    header = f"{'method':<18}{'samples':>8}{'tokens':>9}{'computed':>10}{'seconds':>9}"
    print(header + f"{'tokens/s':>11}{'GFLOP/s':>10}{'% peak':>8}")
    for run in runs:
        flops = 2 * n_params * run.tokens / run.seconds
        print(
            f"{run.method:<18}{run.samples:>8}{run.tokens:>9}{computed[run.method]:>10}"
            f"{run.seconds:>9.2f}{run.tokens / run.seconds:>11,.0f}{flops / 1e9:>10,.0f}"
            f"{100 * flops / peak:>7.1f}%"
        )
    naive, padded, packed = runs
    p_naive = normalized_yes_probability(naive.logprobs, len(yes))
    print()
    for run in (padded, packed):
        p_run = normalized_yes_probability(run.logprobs, len(yes))
        print(
            f"agreement {run.method} vs naive: max |d logprob| "
            f"{np.abs(run.logprobs - naive.logprobs).max():.2e}, max |d P(yes)| "
            f"{np.abs(p_run - p_naive).max():.2e} (P(yes) range {p_run.min():.3f}.."
            f"{p_run.max():.3f})"
        )
    auto = packed if device.type == "cuda" else padded  # what packing: auto runs here
    return {
        "speedup_vs_naive": naive.seconds / auto.seconds,
        "flop_fraction": 2 * n_params * auto.tokens / auto.seconds / peak,
        "tokens_per_s": auto.tokens / auto.seconds,
        "packed_vs_padded": padded.seconds / packed.seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small subset (< 45 s on 2 cores)")
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument(
        "--sizes", default="", help="random-init shapes instead of --model, e.g. 135m,1.7b"
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=0, help="documents (default 12 / 96)")
    parser.add_argument("--max-tokens", type=int, default=256, help="sample text token budget")
    parser.add_argument("--batch-tokens", type=int, default=0, help="tokens per pass (0 = auto)")
    parser.add_argument("--reps", type=int, default=0, help="passes per method, best kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--peak-n", type=int, default=0, help="peak matmul size (0 = by device)")
    args = parser.parse_args(argv)
    samples = args.samples or (12 if args.quick else 96)
    reps = args.reps or 3
    args.peak_n = args.peak_n or peak_size(torch.device(args.device))
    models = [args.model]
    if args.sizes:
        models = [str(p) for p in checkpoints_for(args.sizes, args.dtype, args.device)]
    result: dict[str, float] = {}
    for model in models:
        result = bench_model(args, model, samples, reps)
    print(
        "\nFLOPs counted as 2 x all parameters x prompt tokens; the batched paths apply the LM "
        "head at one position per prompt, so they execute fewer FLOPs than counted."
    )
    print(
        f"RESULT scoring speedup_vs_naive={result['speedup_vs_naive']:.2f} "
        f"flop_fraction={result['flop_fraction']:.3f} tokens_per_s={result['tokens_per_s']:.0f} "
        f"packed_vs_padded={result['packed_vs_padded']:.2f}"
    )


if __name__ == "__main__":
    main()
