"""Rewriting settings: env prefix, nesting, validation."""

from __future__ import annotations

import pytest

from services.rewrite.settings import RewriteSettings
from services.runtime.errors import ConfigError
from services.runtime.settings import load_settings


def test_env_prefix_and_nested_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_REWRITE_INSTRUCTION__PRESET", "simplify")
    monkeypatch.setenv("SLUICE_REWRITE_TOXICITY__POLICY", "rewrite")
    monkeypatch.setenv("SLUICE_REWRITE_GENERATION__MAX_NEW_TOKENS", "64")
    s = load_settings(RewriteSettings)
    assert s.instruction.preset == "simplify"
    assert s.toxicity.policy == "rewrite"
    assert s.generation.max_new_tokens == 64
    assert s.kafka.output_topic == "sluice.rewritten" and s.kafka.group_id == "sluice-rewrite"


@pytest.mark.parametrize(
    "bad",
    [
        {"instruction": {"preset": "poetry"}},
        {"toxicity": {"policy": "ignore"}},
        {"toxicity": {"threshold": 1.5}},
        {"drift": {"min_length_ratio": 3.0, "max_length_ratio": 2.0}},
        {"drift": {"on_reject": "shrug"}},
        {"generation": {"max_new_tokens": 0}},
        {"typo": 1},
    ],
)
def test_bad_settings_are_config_errors(bad: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError):
        load_settings(RewriteSettings, **bad)
