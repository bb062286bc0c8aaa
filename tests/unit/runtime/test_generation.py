"""Batched generation on the torch backend and the vLLM backend's reading of its outputs.

Batching (left padding, length buckets, per-row sampling streams, stop strings) is where
generation bugs hide, so batched results are checked against the plainest computation:
one prompt at a time through transformers' own ``generate``, and a full forward pass over
prompt + response for the top-k logprobs. float32, so batched and unbatched agree.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from services.runtime.backends.base import Generation, GenerationParams, LMBackend, ModelSettings
from services.runtime.backends.text import first_stop
from services.runtime.backends.torch_backend import TorchBackend, _nucleus
from services.runtime.backends.vllm_backend import (
    VLLMBackend,
    generation_from_output,
    top_k_arrays,
)
from services.runtime.errors import InvalidArgument

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a short poem about a river that runs through an old mill town in winter.",
    "Explain in detail how a steam engine works, step by step.",
]
MAX_NEW = 10
K = 5


def settings(**fields: Any) -> ModelSettings:
    return ModelSettings.model_validate(fields)


def _implements_the_protocol(backend: TorchBackend, vllm: VLLMBackend) -> list[LMBackend]:
    return [backend, vllm]  # checked by mypy: both are structurally LMBackends


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    # float32 for exact agreement; a small token budget forces several buckets.
    return TorchBackend(settings(dtype="float32", max_tokens=64, batch_tokens=120))


@pytest.fixture(scope="module")
def prompts(backend: TorchBackend) -> list[str]:
    return [backend.render_chat(q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def greedy(backend: TorchBackend, prompts: list[str]) -> list[Generation]:
    return backend.generate(prompts, GenerationParams(max_new_tokens=MAX_NEW, top_logprobs=K))


def naive_generate(backend: TorchBackend, prompt: str, max_new: int) -> list[int]:
    """One prompt alone, no padding, transformers' greedy generate."""
    ids = torch.tensor([backend.encode_prompt(prompt)])
    out = backend.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False
    )
    new: list[int] = out[0, ids.shape[1] :].tolist()
    eos = backend.tokenizer.eos_token_id
    return new[: new.index(eos)] if eos in new else new


def teacher_forced_logprobs(backend: TorchBackend, prompt: str, response: list[int]) -> np.ndarray:
    """log_softmax at every response position from one full forward pass."""
    ids = backend.encode_prompt(prompt)
    with torch.inference_mode():
        logits = backend.model(torch.tensor([ids + response])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)[len(ids) - 1 : len(ids) - 1 + len(response)]
    return lp.numpy()


# -- the torch backend --------------------------------------------------------------------


def test_greedy_batch_equals_one_prompt_at_a_time(
    backend: TorchBackend, prompts: list[str], greedy: list[Generation]
) -> None:
    assert len(greedy) == len(prompts)
    for prompt, gen in zip(prompts, greedy, strict=True):
        assert gen.token_ids == naive_generate(backend, prompt, MAX_NEW)
        assert gen.text == backend.decode(gen.token_ids)
        assert gen.prompt_tokens == len(backend.encode_prompt(prompt))
        want = "length" if len(gen.token_ids) == MAX_NEW else "stop"
        assert gen.finish_reason == want
    assert {g.finish_reason for g in greedy} == {"stop", "length"}  # both paths exercised


def test_top_logprobs_are_the_models_raw_distribution(
    backend: TorchBackend, prompts: list[str], greedy: list[Generation]
) -> None:
    for prompt, gen in zip(prompts, greedy, strict=True):
        assert gen.top_ids is not None and gen.top_logprobs is not None
        n = len(gen.token_ids)
        assert gen.top_ids.shape == gen.top_logprobs.shape == (n, K)
        assert gen.top_ids.dtype == np.int32 and gen.top_logprobs.dtype == np.float32
        np.testing.assert_array_equal(gen.top_ids[:, 0], gen.token_ids)  # greedy = top-1
        assert (np.diff(gen.top_logprobs, axis=1) <= 0).all()
        full = teacher_forced_logprobs(backend, prompt, gen.token_ids)
        np.testing.assert_array_equal(gen.top_ids, np.argsort(-full, axis=1)[:, :K])
        picked = np.take_along_axis(full, gen.top_ids.astype(np.int64), axis=1)
        np.testing.assert_allclose(gen.top_logprobs, picked, atol=2e-4)


def test_no_top_logprobs_unless_asked(backend: TorchBackend, prompts: list[str]) -> None:
    (gen,) = backend.generate(prompts[:1], GenerationParams(max_new_tokens=2))
    assert gen.top_ids is None and gen.top_logprobs is None


def test_stop_strings_end_generation_and_are_excluded(
    backend: TorchBackend, prompts: list[str], greedy: list[Generation]
) -> None:
    # A stop string taken from inside each greedy continuation, so it must occur.
    long = [(p, g) for p, g in zip(prompts, greedy, strict=True) if len(g.text.split()) >= 4]
    assert long
    stops = [g.text.split()[2] for _, g in long]
    got = backend.generate(
        [p for p, _ in long], GenerationParams(max_new_tokens=MAX_NEW, stop=stops, top_logprobs=2)
    )
    for (_, full), gen in zip(long, got, strict=True):
        cut = min(i for i in (full.text.find(s) for s in stops) if i >= 0)
        assert gen.finish_reason == "stop"
        assert gen.text == full.text[:cut]
        assert not any(s in gen.text for s in stops)
        assert gen.token_ids == full.token_ids[: len(gen.token_ids)]
        assert gen.text.startswith(backend.decode(gen.token_ids))
        assert len(gen.token_ids) < len(full.token_ids)
        assert gen.top_ids is not None and len(gen.top_ids) == len(gen.token_ids)


def test_max_new_tokens_bounds_every_prompt(backend: TorchBackend, prompts: list[str]) -> None:
    got = backend.generate(prompts, GenerationParams(max_new_tokens=3))
    for gen in got:
        assert len(gen.token_ids) <= 3
    assert any(g.finish_reason == "length" and len(g.token_ids) == 3 for g in got)


def test_seeded_sampling_is_per_prompt_and_independent_of_the_batch(
    backend: TorchBackend, prompts: list[str]
) -> None:
    sampled = GenerationParams(max_new_tokens=6, temperature=1.0, seed=11)
    batch = backend.generate(prompts[1:], sampled)
    alone = backend.generate(prompts[2:3], sampled)
    assert alone[0].token_ids == batch[1].token_ids
    others = [
        backend.generate(prompts[2:3], sampled.model_copy(update={"seed": s}))[0].token_ids
        for s in (12, 13)
    ]
    assert any(o != alone[0].token_ids for o in others)  # the seed matters


def test_tiny_top_p_is_greedy(
    backend: TorchBackend, prompts: list[str], greedy: list[Generation]
) -> None:
    nucleus = GenerationParams(max_new_tokens=MAX_NEW, temperature=1.5, top_p=1e-6, seed=3)
    got = backend.generate(prompts[:2], nucleus)
    assert [g.token_ids for g in got] == [g.token_ids for g in greedy[:2]]


def test_nucleus_keeps_the_smallest_set_reaching_top_p() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.97, 0.01, 0.01, 0.01]])
    kept = _nucleus(probs, 0.75)
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.5, 0.3, 0.0], [0.97, 0, 0, 0]]))


def test_generation_refuses_prompts_that_do_not_fit(backend: TorchBackend) -> None:
    huge = backend.render_chat("word " * 2000)
    with pytest.raises(InvalidArgument, match="truncate"):
        backend.generate([huge], GenerationParams(max_new_tokens=4))
    assert backend.generate([], GenerationParams()) == []


@pytest.mark.parametrize(
    "fields",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 5000},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"stop": [""]},
        {"top_logprobs": -1},
        {"seed": -1},
        {"beam_width": 4},
    ],
)
def test_generation_params_are_validated(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GenerationParams.model_validate(fields)


# -- early exit: an ended prompt leaves the batch and its KV cache --------------------------


@pytest.fixture(scope="module")
def one_batch() -> TorchBackend:
    """All four prompts in one batch, so prompts end at different steps of the same loop."""
    return TorchBackend(settings(dtype="float32", max_tokens=64, batch_tokens=4096))


@pytest.fixture(scope="module")
def old_loop() -> TorchBackend:
    """The transformers generate path, for comparison."""
    return TorchBackend(
        settings(dtype="float32", max_tokens=64, batch_tokens=4096, decode_loop="transformers")
    )


@pytest.fixture
def forward_rows(one_batch: TorchBackend) -> Iterator[list[int]]:
    """Rows of every forward pass of ``one_batch``'s model while the test runs."""
    rows: list[int] = []

    def count(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rows.append(int(kwargs["input_ids"].shape[0]))

    handle = one_batch.model.register_forward_pre_hook(count, with_kwargs=True)
    yield rows
    handle.remove()


def _steps(gen: Generation) -> int:
    """Forward passes a prompt needs: one per generated token up to the one that ends it
    (the EOS that ends a 'stop' counts)."""
    return len(gen.token_ids) + (gen.finish_reason == "stop")


def _stop_steps(backend: TorchBackend, gen: Generation, stops: list[str]) -> int:
    """The same when stop strings also end it: at the token that completes one."""
    for n in range(1, len(gen.token_ids) + 1):
        if first_stop(backend.decode(gen.token_ids[:n]), stops) is not None:
            return n
    return _steps(gen)


def _live_rows(steps: list[int]) -> list[int]:
    """Rows each forward pass must compute when an ended prompt is never computed again."""
    return [sum(n > s for n in steps) for s in range(max(steps))]


def test_an_ended_prompt_is_not_computed_again(
    one_batch: TorchBackend, prompts: list[str], greedy: list[Generation], forward_rows: list[int]
) -> None:
    got = one_batch.generate(prompts, GenerationParams(max_new_tokens=MAX_NEW, top_logprobs=K))
    steps = [_steps(g) for g in greedy]
    assert len(set(steps)) > 1  # prompts end at different steps: the case under test
    assert forward_rows == _live_rows(steps)
    assert sum(forward_rows) < len(prompts) * max(steps)
    for g, want in zip(got, greedy, strict=True):  # same contract as in length buckets
        assert (g.token_ids, g.text, g.finish_reason) == (
            want.token_ids,
            want.text,
            want.finish_reason,
        )
        assert g.top_ids is not None and want.top_ids is not None
        np.testing.assert_array_equal(g.top_ids, want.top_ids)
        np.testing.assert_allclose(g.top_logprobs, want.top_logprobs, atol=2e-4)  # type: ignore[arg-type]


def test_a_stop_string_ends_the_prompts_computation(
    one_batch: TorchBackend, prompts: list[str], greedy: list[Generation], forward_rows: list[int]
) -> None:
    stops = [greedy[2].text.split()[2]]
    got = one_batch.generate(prompts, GenerationParams(max_new_tokens=MAX_NEW, stop=stops))
    steps = [_stop_steps(one_batch, g, stops) for g in greedy]
    assert steps[2] < _steps(greedy[2])  # the stop string ends prompt 2 before EOS or length
    assert forward_rows == _live_rows(steps)
    assert got[2].finish_reason == "stop" and stops[0] not in got[2].text
    assert greedy[2].text.startswith(got[2].text)


def test_seeded_rows_keep_their_stream_when_neighbours_leave(
    one_batch: TorchBackend, prompts: list[str], forward_rows: list[int]
) -> None:
    sampled = GenerationParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=11)
    (first,) = one_batch.generate(prompts[:1], sampled)
    assert len(first.text.split()) >= 3
    # A stop string from the first prompt's own sample ends it while the others go on.
    sampled = sampled.model_copy(update={"stop": [first.text.split()[1]], "top_logprobs": 3})
    forward_rows.clear()
    together = one_batch.generate(prompts, sampled)
    assert together[0].finish_reason == "stop"
    assert len(set(forward_rows)) > 1  # some prompt ended while others went on
    forward_rows.clear()
    for prompt, gen in zip(prompts, together, strict=True):
        (alone,) = one_batch.generate([prompt], sampled)
        assert (alone.token_ids, alone.finish_reason) == (gen.token_ids, gen.finish_reason)
        np.testing.assert_allclose(alone.top_logprobs, gen.top_logprobs, atol=2e-4)  # type: ignore[arg-type]


def test_the_transformers_loop_gives_the_same_results(
    old_loop: TorchBackend, one_batch: TorchBackend, prompts: list[str], greedy: list[Generation]
) -> None:
    for params in (
        GenerationParams(max_new_tokens=MAX_NEW, top_logprobs=K),
        GenerationParams(max_new_tokens=MAX_NEW, stop=[greedy[2].text.split()[2]]),
        GenerationParams(max_new_tokens=6, temperature=1.0, seed=5, top_logprobs=2),
    ):
        old, new = old_loop.generate(prompts, params), one_batch.generate(prompts, params)
        for o, n in zip(old, new, strict=True):
            assert (o.token_ids, o.text, o.finish_reason) == (n.token_ids, n.text, n.finish_reason)
            if params.top_logprobs:
                np.testing.assert_array_equal(o.top_ids, n.top_ids)  # type: ignore[arg-type]
                np.testing.assert_allclose(o.top_logprobs, n.top_logprobs, atol=2e-4)  # type: ignore[arg-type]


def test_static_cache_compacts_when_the_live_batch_halves(
    prompts: list[str], greedy: list[Generation], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The compiled path's cache and compaction, run eagerly (compiling on CPU takes minutes).
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    static = TorchBackend(
        settings(dtype="float32", max_tokens=64, batch_tokens=4096, compile_decode=True)
    )
    rows: list[int] = []
    static.model.register_forward_pre_hook(
        lambda m, a, kw: rows.append(int(kw["input_ids"].shape[0])), with_kwargs=True
    )
    got = static.generate(prompts, GenerationParams(max_new_tokens=MAX_NEW, top_logprobs=K))
    for g, want in zip(got, greedy, strict=True):
        assert (g.token_ids, g.finish_reason) == (want.token_ids, want.finish_reason)
        np.testing.assert_allclose(g.top_logprobs, want.top_logprobs, atol=2e-4)  # type: ignore[arg-type]
    steps = [_steps(g) for g in greedy]
    want_rows = []
    size = len(prompts)
    for live in _live_rows(steps):
        while size > 1 and live <= size // 2:
            size //= 2
        want_rows.append(size)
    assert rows == want_rows


# -- the vLLM backend against a stand-in engine -------------------------------------------


@dataclass(frozen=True)
class Logprob:
    """vllm.logprobs.Logprob as far as this backend reads it."""

    logprob: float
    rank: int | None = None


@dataclass
class FakeSamplingParams:
    """The SamplingParams fields the backend may set; an unknown keyword is a TypeError."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] | None = None
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    detokenize: bool = True


class FakeLLM:
    """``vllm.LLM`` greedy generation with vLLM's output conventions, computed unbatched
    with full forward passes: EOS stays in ``token_ids``; a stop string cuts the text but
    not the ids; ``logprobs=k`` gives the top k plus the sampled token."""

    reference: ClassVar[TorchBackend]

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.kwargs = {"model": model, **kwargs}
        self.calls: list[tuple[list[list[int]], FakeSamplingParams]] = []

    def generate(
        self, prompts: list[dict[str, list[int]]], params: FakeSamplingParams, *, use_tqdm: bool
    ) -> list[SimpleNamespace]:
        batch = [list(p["prompt_token_ids"]) for p in prompts]
        self.calls.append((batch, params))
        return [self._one(ids, params) for ids in batch]

    def _one(self, prompt: list[int], params: FakeSamplingParams) -> SimpleNamespace:
        ref, eos = self.reference, self.reference.tokenizer.eos_token_id
        ids = torch.tensor([prompt])
        out = ref.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=params.max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new: list[int] = out.sequences[0, len(prompt) :].tolist()
        text, finish, stop_reason, n = ref.decode(new), "length", None, len(new)
        for n in range(1, len(new) + 1):  # vLLM checks stop strings after every token
            text = ref.decode(new[:n])
            hits = [text.find(s) for s in params.stop or [] if s in text]
            if hits:
                text, finish, stop_reason = text[: min(hits)], "stop", "hit"
                break
            if new[n - 1] == eos:
                finish = "stop"
                break
        steps = []
        for logits in out.logits[:n]:
            top = torch.log_softmax(logits[0].float(), dim=-1).topk(params.logprobs or 1)
            steps.append({int(t): Logprob(float(v)) for v, t in zip(*top, strict=True)})
        completion = SimpleNamespace(
            token_ids=new[:n],
            text=text,
            finish_reason=finish,
            stop_reason=stop_reason,
            logprobs=steps if params.logprobs else None,
        )
        return SimpleNamespace(prompt_token_ids=prompt, outputs=[completion])


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


@pytest.fixture(scope="module")
def fake_vllm(backend: TorchBackend) -> Iterator[VLLMBackend]:
    FakeLLM.reference = backend
    fake = _module("vllm", LLM=FakeLLM, SamplingParams=FakeSamplingParams, __version__="0.33.0")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "vllm", fake)
        yield VLLMBackend(
            settings(
                backend="vllm",
                dtype="float32",
                max_tokens=64,
                prompt_margin_tokens=384,
                generation_tokens=32,
            )
        )


def _engine(backend: VLLMBackend) -> FakeLLM:
    engine = backend.llm
    assert isinstance(engine, FakeLLM)
    return engine


def test_vllm_engine_reserves_the_generation_tokens(fake_vllm: VLLMBackend) -> None:
    kwargs = _engine(fake_vllm).kwargs
    assert kwargs["max_model_len"] == 64 + 384 + 32
    assert kwargs["max_logprobs"] >= K


def test_vllm_generate_matches_the_torch_backend(
    fake_vllm: VLLMBackend, prompts: list[str], greedy: list[Generation]
) -> None:
    # The first two prompts end one by EOS and one by length.
    got = fake_vllm.generate(prompts[:2], GenerationParams(max_new_tokens=MAX_NEW, top_logprobs=K))
    assert {g.finish_reason for g in got} == {"stop", "length"}
    for g, want in zip(got, greedy[:2], strict=True):
        assert (g.text, g.token_ids, g.finish_reason) == (
            want.text,
            want.token_ids,
            want.finish_reason,
        )
        assert g.prompt_tokens == want.prompt_tokens
        assert g.top_ids is not None and want.top_ids is not None
        np.testing.assert_array_equal(g.top_ids, want.top_ids)
        np.testing.assert_allclose(g.top_logprobs, want.top_logprobs, atol=2e-4)  # type: ignore[arg-type]
    batch, params = _engine(fake_vllm).calls[-1]
    assert batch == [fake_vllm.encode_prompt(p) for p in prompts[:2]]
    assert (params.max_tokens, params.temperature, params.top_p) == (MAX_NEW, 0.0, 1.0)
    assert params.logprobs == K and params.stop is None and params.seed is None


def test_vllm_stop_strings_trim_ids_like_the_torch_backend(
    fake_vllm: VLLMBackend, backend: TorchBackend, prompts: list[str], greedy: list[Generation]
) -> None:
    stops = [greedy[2].text.split()[3]]
    params = GenerationParams(max_new_tokens=MAX_NEW, stop=stops, seed=5, top_logprobs=1)
    got = fake_vllm.generate(prompts[2:3], params)
    want = backend.generate(prompts[2:3], params)
    assert got[0].finish_reason == want[0].finish_reason == "stop"
    assert (got[0].text, got[0].token_ids) == (want[0].text, want[0].token_ids)
    _, sent = _engine(fake_vllm).calls[-1]
    assert sent.stop == stops and sent.seed == 5 and sent.logprobs == 1


def test_vllm_refuses_generation_beyond_max_model_len(fake_vllm: VLLMBackend) -> None:
    # max_model_len 480: a 400-token prompt leaves room for 80 new tokens, not 81.
    prompt = fake_vllm.tokenizer.decode(fake_vllm.token_ids("word " * 600)[:399])
    assert len(fake_vllm.encode_prompt(prompt)) == 400
    calls = len(_engine(fake_vllm).calls)
    with pytest.raises(InvalidArgument, match="generation_tokens"):
        fake_vllm.generate([prompt], GenerationParams(max_new_tokens=81))
    assert len(_engine(fake_vllm).calls) == calls


def test_top_k_arrays_take_the_best_k_by_value() -> None:
    # The sampled token (id 9) ranks below the top 2 and is left out.
    steps = [
        {4: Logprob(-2.0), 7: Logprob(-0.5), 9: Logprob(-6.0)},
        {1: Logprob(-0.1), 2: Logprob(-3.0)},
    ]
    ids, values = top_k_arrays(steps, 2)
    np.testing.assert_array_equal(ids, [[7, 4], [1, 2]])
    np.testing.assert_allclose(values, [[-0.5, -2.0], [-0.1, -3.0]])
    assert ids.dtype == np.int32 and values.dtype == np.float32


def test_generation_from_output_drops_eos(backend: TorchBackend) -> None:
    eos = backend.tokenizer.eos_token_id
    hello = backend.token_ids("Hello there")
    completion = SimpleNamespace(
        token_ids=[*hello, eos],
        text="Hello there",
        finish_reason="stop",
        stop_reason=None,
        logprobs=None,
    )
    gen = generation_from_output(SimpleNamespace(outputs=[completion]), 7, 0, backend)
    assert (gen.token_ids, gen.text, gen.finish_reason, gen.prompt_tokens) == (
        hello,
        "Hello there",
        "stop",
        7,
    )
    assert gen.top_ids is None
