"""Typed settings of the scoring service (env prefix ``SLUICE_SCORING_``)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_validator

from services.runtime.backends.base import ModelSettings
from services.runtime.objectstore import ObjectStoreSettings
from services.runtime.settings import StrictModel
from services.runtime.stage import StageSettings
from services.scoring.heuristics import HeuristicSettings
from services.scoring.prompts import ASK_LLM_QUESTION, BUILTIN_EXAMPLES

Step = Literal["heuristics", "classifier", "perplexity", "ask_llm"]
# The order steps run in, cheapest first: rules drop obvious junk before any
# model sees it; the learned classifier (embeddings + a head) before any LM.
STEP_ORDER: tuple[Step, ...] = ("heuristics", "classifier", "perplexity", "ask_llm")
DEFAULT_STEPS: tuple[Step, ...] = ("heuristics", "perplexity", "ask_llm")
"""The classifier needs a trained artifact, so it runs only when asked for."""


class SignalPolicy(StrictModel):
    """What a model score does to a sample."""

    mode: Literal["annotate", "threshold", "top_fraction"] = Field(
        "annotate",
        description="'annotate': record the score, keep everything; 'threshold': keep by a "
        "fixed cut; 'top_fraction': keep the best fraction of the stream so far (streaming "
        "P² quantile estimate).",
    )
    threshold: float = Field(
        0.5,
        description="For 'threshold': ask_llm keeps P(yes) >= threshold; perplexity keeps "
        "perplexity <= threshold.",
    )
    top_fraction: float = Field(0.5, gt=0, le=1, description="For 'top_fraction': share kept.")


class AskLLMExample(StrictModel):
    """One few-shot turn: a text and the judge's answer to it."""

    text: str = Field(..., min_length=1, description="The example text (fenced like a sample).")
    answer: Literal["yes", "no"] = Field(..., description="The answer shown for it.")


class AskLLMSettings(StrictModel):
    """Ask-LLM: the question, few-shot examples and the keep policy."""

    question: str = Field(
        ASK_LLM_QUESTION, description="The question after the ### fences (the paper's by default)."
    )
    examples: list[AskLLMExample] | Literal["builtin"] = Field(
        default_factory=list,
        description="Few-shot turns before each sample (same prompt, then the answer): [] for "
        "the paper's zero-shot prompt, 'builtin' for four generic ones "
        "(services.scoring.prompts.BUILTIN_EXAMPLES), or a list of {text, answer}. They count "
        "against model.prompt_margin_tokens, and change the model version in lineage.",
    )
    policy: SignalPolicy = Field(
        default_factory=lambda: SignalPolicy(mode="annotate"),
        description="Default 'annotate': the packaged 135M model does not separate good text "
        "from junk (see README); set 'threshold'/'top_fraction' with a 2B+ instruct model.",
    )

    def example_pairs(self) -> list[tuple[str, str]]:
        """The examples as (text, answer) pairs."""
        if self.examples == "builtin":
            return list(BUILTIN_EXAMPLES)
        return [(e.text, e.answer) for e in self.examples]

    def prompt_version(self) -> str:
        """'' for the paper's zero-shot prompt, else 'prompt-<digest>' of the question and
        examples: what lineage and batch ids add to the model's version."""
        pairs = self.example_pairs()
        if self.question == ASK_LLM_QUESTION and not pairs:
            return ""
        doc = json.dumps([self.question, pairs], separators=(",", ":"))
        return "prompt-" + hashlib.blake2b(doc.encode(), digest_size=4).hexdigest()


class PerplexitySettings(StrictModel):
    """Perplexity: the keep policy (lower is better)."""

    policy: SignalPolicy = Field(
        default_factory=lambda: SignalPolicy(mode="threshold", threshold=200.0),
        description="Default: drop text the model finds incoherent (perplexity > 200 under the "
        "packaged SmolLM2-135M; real news prose measures ~10-60, shuffled words ~1,000+). "
        "Re-derive the cut when changing the model.",
    )


class ClassifierSettings(StrictModel):
    """The learned classifier step: which trained artifact, where it runs, its keep policy.

    A new version is deployed by pointing ``artifact`` at it and restarting the worker (no
    rebuild): the version is in the worker's batch ids, lineage and ``model_info`` metric
    from its first batch."""

    artifact: str = Field(
        "",
        description="Trained classifier (sluice classifier train): a directory or "
        "s3://bucket/prefix holding model.json and head.pt. Required by the 'classifier' step.",
    )
    store: ObjectStoreSettings = Field(
        default_factory=ObjectStoreSettings,
        description="The S3/MinIO endpoint and credentials for an s3:// artifact (its bucket "
        "comes from the URI).",
    )
    device: str = Field("cpu", description="torch device of the embedding model and head.")
    batch_size: int = Field(64, ge=1, description="Texts per embedding forward pass.")
    policy: SignalPolicy = Field(
        default_factory=lambda: SignalPolicy(mode="threshold", threshold=0.5),
        description="Default: keep P(teacher keeps) >= 0.5, the head's own decision boundary; "
        "'top_fraction' keeps the best share of the stream.",
    )


class ScoringSettings(StageSettings):
    """Everything the scoring service reads: model, steps, and per-step policies."""

    kind = "scoring"

    steps: list[Step] = Field(
        default_factory=lambda: list(DEFAULT_STEPS),
        description="Steps to run; they always run in the order heuristics, classifier, "
        "perplexity, ask_llm (default: all but the classifier, which needs an artifact).",
    )
    model: ModelSettings = Field(default_factory=ModelSettings)  # type: ignore[arg-type]
    heuristics: HeuristicSettings = Field(default_factory=HeuristicSettings)
    ask_llm: AskLLMSettings = Field(default_factory=AskLLMSettings)
    perplexity: PerplexitySettings = Field(default_factory=PerplexitySettings)
    classifier: ClassifierSettings = Field(default_factory=ClassifierSettings)

    @model_validator(mode="after")
    def _steps_known_and_unique(self) -> ScoringSettings:
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"steps repeat: {self.steps}")
        if "classifier" in self.steps and not self.classifier.artifact:
            raise ValueError("the classifier step needs classifier.artifact (a trained model)")
        return self
