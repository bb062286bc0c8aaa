"""Typed settings of the rewriting service (env prefix ``SLUICE_REWRITE_``).

Nested blocks use ``__``: ``SLUICE_REWRITE_INSTRUCTION__PRESET=simplify``,
``SLUICE_REWRITE_TOXICITY__POLICY=rewrite``, ``SLUICE_REWRITE_GENERATION__MAX_NEW_TOKENS=256``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.rewrite.prompts import Preset
from services.rewrite.toxicity import DEFAULT_TERMS, TOXICITY_QUESTION
from services.runtime.backends.base import GenerationParams, ModelSettings
from services.runtime.backends.embeddings import EmbeddingSettings
from services.runtime.settings import StrictModel
from services.runtime.stage import StageSettings

ToxicityPolicy = Literal["drop", "rewrite", "flag"]
TOXICITY_POLICIES: tuple[ToxicityPolicy, ...] = ("drop", "rewrite", "flag")


class InstructionSettings(StrictModel):
    """What a quality rewrite asks the model to do."""

    preset: Preset = Field(
        "wikipedia",
        description="'wikipedia' (Nemotron-CC / WRAP: a high-quality encyclopedic paraphrase), "
        "'qa' (question-answer form), 'simplify' (simple words and sentences), 'paraphrase' "
        "(same content, new wording) or 'none' (no quality rewrite: toxicity control only).",
    )
    custom: str = Field(
        "",
        description="A custom instruction; when set it replaces the preset. It may contain "
        "'{text}' where the sample goes; otherwise the sample follows the instruction.",
    )


class ToxicitySettings(StrictModel):
    """Toxicity control: a lexical pre-filter, an LLM judge for the rest, then a policy."""

    enabled: bool = Field(True, description="Check samples (and rewrites) for toxicity at all.")
    terms: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TERMS),
        description="Lexical pre-filter: words or phrases (case-insensitive, whole words) "
        "that mark a text as toxic without asking the model. The default is a small list of "
        "strong profanity and threats (services/rewrite/toxicity.py); deployments add their "
        "own (e.g. a slur list) here or in terms_file.",
    )
    terms_file: str = Field(
        "", description="A file of further terms, one per line ('#' starts a comment)."
    )
    judge: bool = Field(
        True,
        description="Ask the LLM for the texts the lexicon passes: P(yes) to 'is this harmful?' "
        "from one prefill, pooled over yes/no token variants (as Ask-LLM).",
    )
    threshold: float = Field(
        0.8,
        ge=0,
        le=1,
        description="P(harmful) at or above which the judge calls a text toxic. Set it for the "
        "model: the packaged 135M model is uninformative here (120 real news texts: 0.34-0.67, "
        "six insults/threats: 0.37-0.48, docs/rewrite.md), so the default sits above what it "
        "gives real text and the lexicon does the work on CPU; calibrate a 2B+ instruct judge "
        "on labelled data.",
    )
    question: str = Field(TOXICITY_QUESTION, description="The judge's question after the fences.")
    policy: ToxicityPolicy = Field(
        "drop",
        description="'drop': remove toxic samples (reason 'toxicity:lexical' or "
        "'toxicity:judge'); 'rewrite': rewrite them with the detoxify instruction and check "
        "again (still toxic or rejected by the drift guard: dropped); 'flag': keep them with "
        "scores['toxicity'] and metadata['toxicity'] set.",
    )


class DriftSettings(StrictModel):
    """Reject rewrites that lose the content: empty, echoes, cut off, too short/long, too
    dissimilar."""

    reject_truncated: bool = Field(
        True,
        description="Reject a rewrite that stopped at max_new_tokens ('rewrite:truncated'): "
        "its end is missing.",
    )

    max_copy_ratio: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Share of the rewrite's word trigrams found in the original at or above "
        "which it is a near-verbatim copy, not a rewrite ('rewrite:echo').",
    )
    min_length_ratio: float = Field(
        0.5, ge=0, description="Rewrite words / original words below this: 'rewrite:too_short'."
    )
    max_length_ratio: float = Field(
        3.0, gt=0, description="Rewrite words / original words above this: 'rewrite:too_long'."
    )
    similarity: bool = Field(
        True, description="Compare original and rewrite by sentence-embedding cosine."
    )
    min_similarity: float = Field(
        0.6,
        ge=-1,
        le=1,
        description="Cosine (all-MiniLM-L6-v2) below which the rewrite drifted: 'rewrite:drift'. "
        "Paraphrases measure ~0.8-0.95, unrelated texts ~0.0-0.3.",
    )
    on_reject: Literal["keep_original", "drop"] = Field(
        "keep_original",
        description="A rejected rewrite: keep the original (lineage KEPT with the reason) or "
        "drop the sample (DROPPED with the reason).",
    )
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _ratios_ordered(self) -> DriftSettings:
        if self.min_length_ratio > self.max_length_ratio:
            raise ValueError(
                f"min_length_ratio {self.min_length_ratio} > max_length_ratio "
                f"{self.max_length_ratio}"
            )
        return self


class RewriteSettings(StageSettings):
    """Everything the rewriting service reads."""

    kind = "rewrite"
    model: ModelSettings = Field(
        default_factory=ModelSettings,  # type: ignore[arg-type]
        description="The generator (and toxicity judge). model.max_tokens is also the longest "
        "text rewritten: longer texts are kept unchanged ('rewrite:input_too_long'), never cut.",
    )
    generation: GenerationParams = Field(
        default_factory=lambda: GenerationParams(max_new_tokens=512),
        description="Generation defaults; max_new_tokens is also the cap per request.",
    )
    instruction: InstructionSettings = Field(default_factory=InstructionSettings)  # type: ignore[arg-type]
    toxicity: ToxicitySettings = Field(default_factory=ToxicitySettings)  # type: ignore[arg-type]
    drift: DriftSettings = Field(default_factory=DriftSettings)  # type: ignore[arg-type]
    keep_original: bool = Field(
        True, description="Keep the replaced text in metadata['original_text']."
    )
    max_request_samples: int = Field(1024, ge=1, description="Most samples per gRPC request.")
