"""Typed settings of the distillation service (env prefix ``SLUICE_DISTILL_``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from services.runtime.backends.base import GenerationParams, ModelSettings
from services.runtime.objectstore import ObjectStoreSettings
from services.runtime.settings import StrictModel
from services.runtime.stage import StageSettings

KiB = 1024


class S3Settings(ObjectStoreSettings):
    """The object store for top-k payloads too large to travel inline
    (services.runtime.objectstore); only the defaults are distill's."""

    bucket: str = Field("sluice-distill", description="Bucket of top-k objects (must exist).")
    prefix: str = Field("topk/", description="Key prefix; objects are '<prefix><sha256>.stk'.")


class TopKStoreSettings(StrictModel):
    """Where the compact top-k payload of each distilled sample goes."""

    inline_max_bytes: int = Field(
        64 * KiB,
        ge=0,
        description="Payloads up to this many bytes go inline (base64 in metadata "
        "'distill.topk'); larger ones become S3 objects referenced by 'distill.topk_uri' "
        "when s3.endpoint is set, and stay inline when it is not. 0 = every payload to S3.",
    )
    s3: S3Settings = Field(default_factory=S3Settings)  # type: ignore[arg-type]


class DistillGeneration(GenerationParams):
    """GenerationParams whose top-k is on: distillation exists to store it."""

    top_logprobs: int = Field(
        8,
        ge=1,
        le=128,
        description="k: the most likely tokens (and logprobs) stored per response position.",
    )


class DistillSettings(StageSettings):
    """The teacher model, generation defaults and limits, prompt rendering and storage."""

    kind = "distill"
    model: ModelSettings = Field(default_factory=ModelSettings)  # type: ignore[arg-type]
    generation: DistillGeneration = Field(
        default_factory=DistillGeneration,  # type: ignore[arg-type]
        description="Generation defaults (greedy, 128 tokens, top-8 logprobs); requests "
        "override them field by field.",
    )
    max_new_tokens_limit: int = Field(
        1024, ge=1, le=4096, description="Largest max_new_tokens a request may ask for."
    )
    instruction_template: str = Field(
        "{prompt}",
        description="The user message built from a sample's prompt ('{prompt}' is replaced).",
    )
    chat_template: bool = Field(
        True, description="Render the message with the model's chat template when it has one."
    )
    keep_original_response: bool = Field(
        False,
        description="Keep a sample's existing response in metadata 'distill.original_response' "
        "before the teacher's replaces it.",
    )
    topk_store: TopKStoreSettings = Field(default_factory=TopKStoreSettings)

    @model_validator(mode="after")
    def _consistent(self) -> DistillSettings:
        if "{prompt}" not in self.instruction_template:
            raise ValueError("instruction_template must contain '{prompt}'")
        if self.generation.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("generation.max_new_tokens exceeds max_new_tokens_limit")
        reserved = self.model.generation_tokens
        if self.model.backend == "vllm" and reserved < self.max_new_tokens_limit:
            raise ValueError(
                f"model.generation_tokens ({reserved}) must be at least "
                f"max_new_tokens_limit ({self.max_new_tokens_limit}) with the vllm backend: the "
                "engine reserves that room per sequence"
            )
        return self
