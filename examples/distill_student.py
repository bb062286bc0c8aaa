"""Knowledge distillation on CPU: a tiny student learns from the distillation service's data.

    python examples/distill_student.py            # ~1-3 minutes on 2 cores
    python examples/distill_student.py --help

1. **Teacher data.** The distillation core (``services.distill``) asks the packaged
   SmolLM2-135M-Instruct to summarise real news reports (gensim's ``lee_background.cor``).
   Each output sample carries the teacher's response token ids and, for every response
   position, its top-8 tokens with float16 logprobs (the compact payload of
   ``services.distill.codec``), read back with ``load_topk``.
2. **Student.** A randomly initialised 2-layer GPT-2 (transformers) over the teacher's
   tokenizer and vocabulary, so teacher and student token ids mean the same thing.
3. **KD loss.** At every response position the teacher's top-k logprobs are renormalised
   into a distribution q over its k tokens; the loss is KL(q || p), with p the student's
   full-vocabulary softmax read at those k tokens: sum_k q (log q - log p). It is >= 0 and
   0 only when the student puts all its mass on the teacher's top-k in the teacher's
   proportions. The student reads the same rendered prompt the teacher answered.

It prints the KD loss of every training step and the loss on held-out prompts before and
after training; both fall. ``tests/unit/distill/test_student_example.py`` runs a short
version and checks that.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch
from transformers import GPT2Config, GPT2Model

from services.distill.codec import load_topk
from services.distill.core import DistillCore
from services.distill.settings import DistillSettings
from services.runtime.backends.base import LMBackend, ModelSettings
from services.runtime.backends.torch_backend import TorchBackend
from services.runtime.domain import Sample

INSTRUCTION = "Summarise this news report in one sentence:\n\n{prompt}"


@dataclass(frozen=True, slots=True)
class Example:
    """One training sequence: prompt + teacher response ids, and the teacher's top-k."""

    ids: list[int]
    prompt_len: int
    top_ids: torch.Tensor  # (T, k) int64
    q: torch.Tensor  # (T, k) float32: the teacher's top-k, renormalised


@dataclass(frozen=True, slots=True)
class Result:
    train_losses: list[float]
    heldout_before: float
    heldout_after: float


def news_documents(n: int, doc_tokens: int, teacher: LMBackend) -> list[str]:
    from gensim.test.utils import datapath

    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        docs = [line.strip() for line in f if line.strip()]
    return [teacher.truncate(d, doc_tokens) for d in docs[:n]]


def distil(teacher: LMBackend, docs: list[str], max_new_tokens: int, k: int) -> list[Example]:
    """Teacher pairs from the distillation core, turned into student training examples."""
    settings = DistillSettings.model_validate(
        {
            "instruction_template": INSTRUCTION,
            "generation": {"max_new_tokens": max_new_tokens, "top_logprobs": k},
        }
    )
    core = DistillCore(settings, backend=teacher)
    samples = [Sample(id=f"lee-{i}", text=d) for i, d in enumerate(docs)]
    examples = []
    for outcome in core.distill(samples):
        if not outcome.kept:
            continue
        topk = load_topk(outcome.sample)
        prompt = teacher.token_ids(core.teacher_prompt(outcome.sample.prompt))
        logprobs = torch.from_numpy(topk.top_logprobs.astype("float32"))
        examples.append(
            Example(
                ids=prompt + topk.tokens.tolist(),
                prompt_len=len(prompt),
                top_ids=torch.from_numpy(topk.top_ids.astype("int64")),
                q=torch.softmax(logprobs, dim=-1),  # renormalised over the k tokens
            )
        )
    return examples


class Student(torch.nn.Module):
    """A small GPT-2 whose output layer is its (tied) token embedding."""

    def __init__(self, teacher: TorchBackend, positions: int, layers: int, width: int) -> None:
        super().__init__()
        tokenizer = teacher.tokenizer
        config = GPT2Config(
            vocab_size=teacher.model.config.vocab_size,
            n_positions=positions,
            n_embd=width,
            n_layer=layers,
            n_head=4,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        self.body = GPT2Model(config)

    def response_logits(self, batch: list[Example]) -> torch.Tensor:
        """Logits at the positions that predict response tokens only, (sum T, vocab): the
        full (batch, length, vocab) tensor would be most of the memory and time."""
        width = max(len(e.ids) for e in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(batch):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
            mask[row, : len(e.ids)] = 1
        hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = [hidden[row, e.prompt_len - 1 : len(e.ids) - 1] for row, e in enumerate(batch)]
        return torch.cat(rows) @ self.body.wte.weight.T


def kd_loss(student: Student, batch: list[Example]) -> torch.Tensor:
    """Mean over response positions of KL(q || p) on the teacher's top-k tokens."""
    logp = torch.log_softmax(student.response_logits(batch), dim=-1)
    top_ids = torch.cat([e.top_ids for e in batch])
    q = torch.cat([e.q for e in batch])
    logp_k = logp.gather(1, top_ids)
    return (q * (torch.log(q.clamp_min(1e-12)) - logp_k)).sum(dim=1).mean()


def train(
    student: Student,
    train_set: list[Example],
    heldout: list[Example],
    steps: int,
    batch_size: int,
    lr: float,
    log: bool = True,
) -> Result:
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    with torch.no_grad():
        before = float(kd_loss(student, heldout))
    if log:
        print(f"held-out KD loss before training: {before:.3f}")
    losses = []
    for step in range(steps):
        start = (step * batch_size) % len(train_set)
        batch = (train_set + train_set)[start : start + batch_size]
        loss = kd_loss(student, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log:
            print(f"step {step + 1:3d}  kd_loss {losses[-1]:.3f}")
    with torch.no_grad():
        after = float(kd_loss(student, heldout))
    if log:
        print(f"held-out KD loss after training:  {after:.3f}")
    return Result(losses, before, after)


def run(
    teacher: TorchBackend,
    *,
    samples: int,
    heldout: int,
    steps: int,
    max_new_tokens: int,
    doc_tokens: int = 48,
    k: int = 8,
    layers: int = 2,
    width: int = 64,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    log: bool = True,
) -> Result:
    """Distil ``samples + heldout`` prompts, train on the first ``samples``, evaluate on
    the rest."""
    started = time.perf_counter()
    docs = news_documents(samples + heldout, doc_tokens, teacher)
    examples = distil(teacher, docs, max_new_tokens, k)
    if log:
        tokens = sum(len(e.top_ids) for e in examples)
        print(
            f"distilled {len(examples)} teacher responses ({tokens} tokens, top-{k}) in "
            f"{time.perf_counter() - started:.1f} s with {teacher.model_version}"
        )
    train_set, heldout_set = examples[:samples], examples[samples:]
    torch.manual_seed(seed)
    positions = max(len(e.ids) for e in examples)
    student = Student(teacher, positions, layers, width)
    if log:
        n_params = sum(p.numel() for p in student.parameters())
        print(f"student: {layers}-layer GPT-2, width {width}, {n_params / 1e6:.1f}M parameters")
    return train(student, train_set, heldout_set, steps, batch_size, lr, log)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--samples", type=int, default=48, help="training prompts")
    ap.add_argument("--heldout", type=int, default=8, help="held-out prompts")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="teacher response length")
    ap.add_argument("--top-k", type=int, default=8, help="teacher logprobs per position")
    args = ap.parse_args(argv)
    teacher = TorchBackend(ModelSettings())
    result = run(
        teacher,
        samples=args.samples,
        heldout=args.heldout,
        steps=args.steps,
        max_new_tokens=args.max_new_tokens,
        k=args.top_k,
    )
    first, last = result.train_losses[0], result.train_losses[-1]
    print(
        f"KD loss {first:.3f} -> {last:.3f} (train), {result.heldout_before:.3f} -> "
        f"{result.heldout_after:.3f} (held-out)"
    )


if __name__ == "__main__":
    main()
