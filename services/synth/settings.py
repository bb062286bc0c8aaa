"""Typed settings of the synthesis service (env prefix ``SLUICE_SYNTH_``).

Nested blocks use ``__``: ``SLUICE_SYNTH_GENERATION__TEMPERATURE=0.7``,
``SLUICE_SYNTH_NEAR_DUP__THRESHOLD=0.85``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from services.runtime.backends.base import GenerationParams, ModelSettings
from services.runtime.backends.embeddings import EmbeddingSettings
from services.runtime.settings import StrictModel
from services.runtime.stage import StageSettings
from services.synth.evol import EvolOp
from services.synth.self_instruct import DEFAULT_SEED_INSTRUCTIONS

Method = Literal["grounded_qa", "self_instruct", "evol"]
METHODS: tuple[Method, ...] = ("grounded_qa", "self_instruct", "evol")
DEFAULT_EVOL_OPS: tuple[EvolOp, ...] = ("deepen", "broaden", "concretize")


class LengthSettings(StrictModel):
    """Word-count bounds of a generated sample ('filter:too_short' / 'filter:too_long')."""

    min_prompt_words: int = Field(3, ge=0, description="Fewest words in the instruction.")
    max_prompt_words: int = Field(256, ge=1, description="Most words in the instruction.")
    min_response_words: int = Field(1, ge=0, description="Fewest words in the response.")
    max_response_words: int = Field(2048, ge=1, description="Most words in the response.")


class NearDupSettings(StrictModel):
    """Near-duplicate removal against a bounded memory of what the stage kept before."""

    enabled: bool = Field(True, description="Run the near-duplicate filter.")
    threshold: float = Field(
        0.9,
        ge=-1,
        le=1,
        description="Cosine (all-MiniLM-L6-v2) at or above which a sample duplicates an "
        "earlier one. Rephrasings of one question measure ~0.85-0.97.",
    )
    capacity: int = Field(
        10000, ge=1, description="Embeddings remembered (ring buffer): ~15 MB at 384 dims."
    )
    field: Literal["prompt", "content"] = Field(
        "prompt",
        description="What is compared: the instruction/question (Self-Instruct's practice) or "
        "the whole prompt + response.",
    )
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)  # type: ignore[arg-type]


class GateSettings(StrictModel):
    """Optional model-score gates on generated samples (each costs prefill passes)."""

    ask_llm: bool = Field(False, description="Score generated pairs with Ask-LLM and gate.")
    ask_llm_threshold: float = Field(
        0.5, ge=0, le=1, description="Keep pairs with P(yes) at or above this."
    )
    ifd: bool = Field(
        False, description="Score Instruction-Following Difficulty (IFD) and gate on it."
    )
    ifd_max: float = Field(
        1.0,
        gt=0,
        description="Keep pairs with IFD below this (IFD >= 1: the instruction does not help "
        "predict the response). Unmeasurable pairs (over the token budget) are kept.",
    )


class SynthSettings(StageSettings):
    """Everything the synthesis service reads."""

    kind = "synth"
    model: ModelSettings = Field(
        default_factory=ModelSettings,  # type: ignore[arg-type]
        description="The generator. Seed documents are cut to model.max_tokens (head kept).",
    )
    generation: GenerationParams = Field(
        default_factory=lambda: GenerationParams(max_new_tokens=256),
        description="Generation defaults for answers and responses; max_new_tokens is also the "
        "cap per request. The i-th sample of a seed uses seed + i when a seed is set.",
    )
    instruction_max_new_tokens: int = Field(
        64, ge=1, le=4096, description="Token limit of a generated instruction (one line)."
    )
    methods: list[Method] = Field(
        default_factory=lambda: list(METHODS),
        description="Methods to run: 'grounded_qa' on seeds with text, 'self_instruct' and "
        "'evol' on seeds with a prompt (an instruction).",
    )
    per_seed: int = Field(
        1,
        ge=1,
        le=64,
        description="Samples per seed and method. With greedy decoding (temperature 0) extra "
        "samples repeat and the near-duplicate filter removes them: set a temperature.",
    )
    seed_instructions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SEED_INSTRUCTIONS),
        description="Self-Instruct's fixed pool of demonstration tasks; instructions from the "
        "stream and kept generated ones join it (bounded by pool_size).",
    )
    pool_size: int = Field(
        2000, ge=0, description="Instructions remembered from the stream and from generation."
    )
    demonstrations: int = Field(
        4, ge=1, le=16, description="Tasks shown in a Self-Instruct prompt (the seed's last)."
    )
    evol_ops: list[EvolOp] = Field(
        default_factory=lambda: list(DEFAULT_EVOL_OPS),
        description="Evol-Instruct operations; the i-th sample of a seed applies one, in "
        "rotation from a per-seed offset: deepen, broaden, concretize, add_constraints, "
        "reasoning.",
    )
    min_answer_overlap: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Grounded QA: share of the answer's content words (4+ letters or numbers) "
        "that must occur in the document; below it the answer is 'filter:ungrounded'.",
    )
    reject_truncated: bool = Field(
        True,
        description="Reject a sample whose answer/response stopped at max_new_tokens "
        "('filter:truncated').",
    )
    forward_seeds: bool = Field(
        True,
        description="Kafka/local: forward the seed samples (lineage KEPT) with the generated "
        "ones; false = the seeds are consumed (DROPPED, 'synth:seed_consumed').",
    )
    length: LengthSettings = Field(default_factory=LengthSettings)  # type: ignore[arg-type]
    near_dup: NearDupSettings = Field(default_factory=NearDupSettings)  # type: ignore[arg-type]
    gates: GateSettings = Field(default_factory=GateSettings)  # type: ignore[arg-type]
    max_request_samples: int = Field(256, ge=1, description="Most seeds per gRPC request.")
    dropped_topic: str = Field(
        "",
        description="If set, generated samples the filters rejected (and consumed seeds) are "
        "written here for audit.",
    )

    @field_validator("methods", "evol_ops")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"entries repeat: {v}")
        return v

    @model_validator(mode="after")
    def _evol_has_ops(self) -> SynthSettings:
        if "evol" in self.methods and not self.evol_ops:
            raise ValueError("method 'evol' needs at least one entry in evol_ops")
        return self
