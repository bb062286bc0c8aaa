"""Distillation settings: env prefix, defaults and the consistency rules."""

from __future__ import annotations

from typing import Any

import pytest

from services.distill.settings import DistillSettings
from services.distill.store import parse_uri
from services.runtime.errors import ConfigError, InvalidArgument
from services.runtime.settings import load_settings


def test_defaults_distil_greedy_top8() -> None:
    s = DistillSettings()
    assert s.generation.top_logprobs == 8 and s.generation.temperature == 0.0
    assert s.kafka.group_id == "sluice-distill" and s.kafka.output_topic == "sluice.distilled"
    assert s.topk_store.s3.endpoint == ""


def test_env_prefix_and_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_DISTILL_GENERATION__MAX_NEW_TOKENS", "32")
    monkeypatch.setenv("SLUICE_DISTILL_GENERATION__STOP", '["\\n\\n"]')
    monkeypatch.setenv("SLUICE_DISTILL_TOPK_STORE__S3__ENDPOINT", "minio:9000")
    monkeypatch.setenv("SLUICE_DISTILL_TOPK_STORE__S3__SECRET_KEY", "hunter2")
    s = load_settings(DistillSettings)
    assert s.generation.max_new_tokens == 32 and s.generation.stop == ["\n\n"]
    assert s.generation.top_logprobs == 8  # an override of one field keeps the others
    assert s.topk_store.s3.endpoint == "minio:9000"
    assert "hunter2" not in repr(s)


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"instruction_template": "no placeholder"}, "{prompt}"),
        ({"generation": {"top_logprobs": 0}}, "top_logprobs"),
        ({"generation": {"max_new_tokens": 64}, "max_new_tokens_limit": 32}, "limit"),
        ({"model": {"backend": "vllm"}}, "generation_tokens"),
        ({"generation": {"temperature": -1}}, "temperature"),
    ],
)
def test_inconsistent_settings_are_config_errors(fields: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_settings(DistillSettings, **fields)


def test_vllm_with_enough_reserved_generation_tokens_is_fine() -> None:
    s = load_settings(
        DistillSettings,
        model={"backend": "vllm", "generation_tokens": 256},
        max_new_tokens_limit=256,
    )
    assert s.model.generation_tokens == 256


def test_parse_uri() -> None:
    assert parse_uri("s3://bucket/a/b.stk") == ("bucket", "a/b.stk")
    for bad in ("http://x/y", "s3://bucket", "s3:///key"):
        with pytest.raises(InvalidArgument):
            parse_uri(bad)
