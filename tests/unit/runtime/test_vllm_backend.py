"""The vLLM backend: import hygiene, configuration errors, and plumbing (stand-in engine).

Three layers, so that most of it runs where vLLM is not installed (``make test``):

- Import hygiene and configuration errors, against the real modules.
- Plumbing, against a stand-in ``vllm`` module whose ``LLM.generate`` honours the vLLM
  contract this backend relies on (``logprob_token_ids`` on the first generated position,
  ``prompt_logprobs`` with a leading None, outputs in request order) and computes the
  numbers with the packaged model in torch, one unpadded prompt at a time. It checks the
  encoding, BOS handling, truncation, column order and engine settings; it cannot check
  that real vLLM keeps that contract.
- The real engine against the torch backend: test_vllm_engine.py, a module of its own so
  that no stand-in ``vllm`` is installed while it runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.machinery
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from services.runtime.backends import vllm_backend
from services.runtime.backends.base import NLL, ModelSettings
from services.runtime.backends.factory import create_backend
from services.runtime.backends.torch_backend import TorchBackend
from services.runtime.backends.vllm_backend import (
    INSTALL_HINT,
    VLLMBackend,
    candidate_logprobs,
    prompt_nll,
    vllm_available,
)
from services.runtime.errors import ConfigError, InvalidArgument, SluiceError
from services.scoring.prompts import (
    answer_token_ids,
    build_ask_llm_prompt,
)

ROOT = Path(__file__).resolve().parents[3]

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
    " ".join([PROSE] * 3),  # longer than MAX_TOKENS: scored on its head
]

MAX_TOKENS = 64


def settings(**fields: Any) -> ModelSettings:
    # model_validate: mypy without the pydantic plugin reads Field("x", ...) as required.
    return ModelSettings.model_validate(fields)


# -- import hygiene and configuration errors -------------------------------------------------


def test_cpu_path_never_imports_vllm(tmp_path: Path) -> None:
    """Importing the factory, both backend modules and the scoring core loads no vllm,
    even where a ``vllm`` package is importable (a stand-in on PYTHONPATH here)."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("")
    code = textwrap.dedent(
        """
        import sys
        import services.runtime.backends.factory
        import services.runtime.backends.vllm_backend as vb
        import services.runtime.backends.torch_backend
        import services.scoring.core
        assert vb.vllm_available(), "the stand-in vllm should be importable"
        loaded = sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))
        assert not loaded, loaded
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(vllm_available(), reason="vllm is installed here")
def test_vllm_backend_without_vllm_names_the_install_command() -> None:
    with pytest.raises(ConfigError, match=r"pip install 'sluice\[gpu\]'"):
        create_backend(settings(backend="vllm"))


def test_missing_vllm_is_reported_before_any_model_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_resolve(*_: object) -> None:
        raise AssertionError("resolved (and maybe converted) a model before checking vllm")

    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: False)
    monkeypatch.setattr(vllm_backend, "resolve_model", must_not_resolve)
    with pytest.raises(ConfigError, match="not installed") as err:
        VLLMBackend(settings(backend="vllm"))
    assert INSTALL_HINT in str(err.value)


def test_unknown_backend_is_a_config_error() -> None:
    # model_construct skips validation, as a hand-built or future settings object might.
    bogus = ModelSettings.model_construct(backend="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tensorrt"):
        create_backend(bogus)


def test_vllm_without_logprob_token_ids_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass
    class OldSamplingParams:  # vLLM before logprob_token_ids existed
        max_tokens: int | None = 16
        logprobs: int | None = None

    old = _module("vllm", SamplingParams=OldSamplingParams, LLM=None, __version__="0.10.0")
    monkeypatch.setitem(sys.modules, "vllm", old)
    monkeypatch.setattr(vllm_backend, "resolve_model", lambda _s: pytest.fail("resolved"))
    with pytest.raises(
        ConfigError, match=r"vllm 0\.10\.0 has no SamplingParams\.logprob_token_ids"
    ):
        VLLMBackend(settings(backend="vllm"))


# -- reading vLLM outputs (pure) -------------------------------------------------------------


@dataclass(frozen=True)
class Logprob:
    """vllm.logprobs.Logprob as far as this backend reads it."""

    logprob: float


def _request_output(
    ids: list[int], sample: dict[int, Logprob] | None, prompt: list[Any] | None = None
) -> SimpleNamespace:
    return SimpleNamespace(
        prompt_token_ids=ids,
        prompt_logprobs=prompt,
        outputs=[SimpleNamespace(logprobs=None if sample is None else [sample])],
    )


def test_candidate_logprobs_keep_candidate_order_and_mark_missing_as_minus_inf() -> None:
    outputs = [
        _request_output([1], {7: Logprob(-0.5), 3: Logprob(-1.0), 9: Logprob(-2.0)}),
        _request_output([1], {3: Logprob(-0.25), 7: Logprob(-3.0)}),
    ]
    got = candidate_logprobs(outputs, [3, 9, 3, 7])
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [[-1.0, -2.0, -1.0, -0.5], [-0.25, -np.inf, -0.25, -3.0]])
    with pytest.raises(SluiceError, match="logprob_token_ids"):
        candidate_logprobs([_request_output([1], None)], [3])


def test_prompt_nll_sums_the_actual_tokens_after_the_first() -> None:
    ids = [1, 5, 6]
    positions = [None, {5: Logprob(-1.5), 2: Logprob(-0.1)}, {6: Logprob(-0.5)}]
    assert prompt_nll(positions, ids) == NLL(2.0, 2)
    with pytest.raises(SluiceError, match="2 prompt logprobs for 3"):
        prompt_nll(positions[:2], ids)
    with pytest.raises(SluiceError, match="token 6"):
        prompt_nll([None, positions[1], {8: Logprob(-1.0)}], ids)


# -- plumbing against a stand-in engine --------------------------------------------------------


@dataclass
class FakeSamplingParams:
    """The SamplingParams fields this backend may set; an unknown keyword is a TypeError."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    detokenize: bool = True


class FakeLLM:
    """``vllm.LLM`` for one model: generate() computes exact fp32 logprobs with torch."""

    reference: ClassVar[TorchBackend]

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.kwargs = {"model": model, **kwargs}
        self.calls: list[tuple[list[list[int]], FakeSamplingParams]] = []

    def generate(
        self,
        prompts: list[dict[str, list[int]]],
        sampling_params: FakeSamplingParams,
        *,
        use_tqdm: bool = True,
    ) -> list[SimpleNamespace]:
        assert not use_tqdm
        batch = [list(p["prompt_token_ids"]) for p in prompts]
        self.calls.append((batch, sampling_params))
        return [self._one(ids, sampling_params) for ids in batch]

    def _one(self, ids: list[int], params: FakeSamplingParams) -> SimpleNamespace:
        assert ids, "vLLM refuses empty prompts"
        with torch.inference_mode():
            logits = self.reference.model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1).double()
        last = lp[-1]
        sampled = int(last.argmax())
        sample: dict[int, Logprob] | None = None
        if params.logprob_token_ids:
            sample = {sampled: Logprob(float(last[sampled]))}
            sample.update({t: Logprob(float(last[t])) for t in params.logprob_token_ids})
        prompt: list[Any] | None = None
        if params.prompt_logprobs is not None:
            prompt = [None] + [{t: Logprob(float(lp[p - 1, t]))} for p, t in enumerate(ids) if p]
        return _request_output(ids, sample, prompt)


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec finds it
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


@pytest.fixture(scope="module")
def reference() -> TorchBackend:
    return TorchBackend(settings(dtype="float32", max_tokens=MAX_TOKENS))


@pytest.fixture(scope="module")
def fake_backend(reference: TorchBackend) -> Iterator[VLLMBackend]:
    FakeLLM.reference = reference
    fake = _module("vllm", LLM=FakeLLM, SamplingParams=FakeSamplingParams, __version__="0.33.0")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "vllm", fake)
        yield VLLMBackend(settings(backend="vllm", dtype="float32", max_tokens=MAX_TOKENS))


def _engine(backend: VLLMBackend) -> FakeLLM:
    engine = backend.llm
    assert isinstance(engine, FakeLLM)
    return engine


@pytest.mark.slow
def test_engine_is_configured_for_raw_logprobs(fake_backend: VLLMBackend) -> None:
    kwargs = _engine(fake_backend).kwargs
    assert kwargs["model"] == kwargs["tokenizer"] == fake_backend.resolved.path
    assert kwargs["logprobs_mode"] == "raw_logprobs"
    assert kwargs["dtype"] == "float32"
    assert kwargs["max_model_len"] == MAX_TOKENS + ModelSettings().prompt_margin_tokens + 1
    assert kwargs["max_logprobs"] >= 20
    assert fake_backend.max_prompt_tokens == MAX_TOKENS + ModelSettings().prompt_margin_tokens
    assert fake_backend.model_version == "smollm2-135m-instruct@fp32+vllm"


@pytest.mark.slow
def test_text_handling_is_the_torch_backends(
    fake_backend: VLLMBackend, reference: TorchBackend
) -> None:
    assert fake_backend.has_chat_template == reference.has_chat_template
    message = build_ask_llm_prompt(PROSE)
    assert fake_backend.render_chat(message) == reference.render_chat(message)
    assert fake_backend.token_ids(PROSE) == reference.token_ids(PROSE)
    assert fake_backend.count_tokens(TEXTS) == reference.count_tokens(TEXTS)
    assert fake_backend.truncate(PROSE, 20) == reference.truncate(PROSE, 20)
    rendered = fake_backend.render_chat(message)
    assert fake_backend.encode_prompt(rendered) == reference.encode_prompt(rendered)
    assert answer_token_ids(fake_backend) == answer_token_ids(reference)


@pytest.mark.slow
def test_next_token_logprobs_match_the_torch_backend(
    fake_backend: VLLMBackend, reference: TorchBackend
) -> None:
    prompts = [
        fake_backend.render_chat(build_ask_llm_prompt(fake_backend.truncate(t, 40))) for t in TEXTS
    ]
    yes, no = answer_token_ids(fake_backend)
    candidates = [*yes, *no, yes[0]]  # a repeated id gets its own column
    got = fake_backend.next_token_logprobs(prompts, candidates)
    assert got.shape == (len(prompts), len(candidates))
    assert got.dtype == np.float64
    want = reference.next_token_logprobs(prompts, candidates)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(got[:, -1], got[:, 0])

    batch, params = _engine(fake_backend).calls[-1]
    assert batch == [reference.encode_prompt(p) for p in prompts]  # token ids, one BOS
    assert params.max_tokens == 1 and params.temperature == 0.0
    assert params.logprob_token_ids == [*yes, *no]  # deduplicated, order kept
    assert params.allowed_token_ids is None  # never restricts the distribution
    assert params.logprobs is None and not params.detokenize
    assert fake_backend.next_token_logprobs([], candidates).shape == (0, len(candidates))


@pytest.mark.slow
def test_sequence_nll_matches_the_torch_backend(
    fake_backend: VLLMBackend, reference: TorchBackend
) -> None:
    got = fake_backend.sequence_nll(TEXTS)
    want = reference.sequence_nll(TEXTS)
    for g, w in zip(got, want, strict=True):
        assert g.tokens == w.tokens
        assert g.total == pytest.approx(w.total, abs=1e-2, rel=1e-4)
    assert got[TEXTS.index("")] == NLL(0.0, 0)
    assert got[-1].tokens == MAX_TOKENS  # the head within the budget

    batch, params = _engine(fake_backend).calls[-1]
    assert len(batch) == len(TEXTS) - 1  # the empty text is never sent
    assert all(ids[0] == reference.tokenizer.bos_token_id for ids in batch)
    assert params.prompt_logprobs == 0 and params.max_tokens == 1
    assert params.logprob_token_ids is None and not params.detokenize


@pytest.mark.slow
def test_bad_requests_are_refused_before_the_engine(fake_backend: VLLMBackend) -> None:
    calls = len(_engine(fake_backend).calls)
    huge = fake_backend.render_chat(build_ask_llm_prompt(" ".join([PROSE] * 20)))
    with pytest.raises(InvalidArgument, match="truncate"):
        fake_backend.next_token_logprobs([huge], [1, 2])
    with pytest.raises(InvalidArgument, match="outside vocabulary"):
        fake_backend.next_token_logprobs(["hi"], [10**9])
    assert len(_engine(fake_backend).calls) == calls


@pytest.mark.slow
def test_concurrent_calls_reach_the_engine_one_at_a_time(
    fake_backend: VLLMBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gRPC handlers run in a thread pool and share one backend; vLLM's LLM is not thread-safe.
    engine = _engine(fake_backend)
    inner = engine.generate
    active, most = [0], [0]
    guard = threading.Lock()

    def slow_generate(*args: Any, **kwargs: Any) -> list[SimpleNamespace]:
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)
        try:
            return inner(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(engine, "generate", slow_generate)
    threads = [
        threading.Thread(target=fake_backend.sequence_nll, args=([f"Hello world {i}."],))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most[0] == 1
    assert not any(t.is_alive() for t in threads)
