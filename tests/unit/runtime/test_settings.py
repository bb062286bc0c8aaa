"""Typed settings: env prefix and nesting, YAML files, precedence, unknown keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.runtime.errors import ConfigError
from services.runtime.settings import load_settings
from services.scoring.settings import ScoringSettings


def test_defaults_need_no_config() -> None:
    s = load_settings(ScoringSettings)
    assert s.steps == ["heuristics", "perplexity", "ask_llm"]
    assert s.kafka.dead_letter_topic == "sluice.ingest.dlq"
    assert s.model.model == "packaged:smollm2-135m-instruct"


def test_env_prefix_and_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_SCORING_KAFKA__BOOTSTRAP_SERVERS", "broker:9093")
    monkeypatch.setenv("SLUICE_SCORING_MODEL__BACKEND", "vllm")
    monkeypatch.setenv("SLUICE_SCORING_STEPS", '["heuristics"]')
    s = load_settings(ScoringSettings)
    assert s.kafka.bootstrap_servers == "broker:9093"
    assert s.model.backend == "vllm"
    assert s.steps == ["heuristics"]


def test_yaml_file_then_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "scoring.yaml"
    cfg.write_text(
        "kafka:\n  input_topic: corpus.a\n  group_id: g1\n"
        "ask_llm:\n  policy: {mode: top_fraction, top_fraction: 0.3}\n"
    )
    monkeypatch.setenv("SLUICE_SCORING_KAFKA__GROUP_ID", "from-env")
    s = load_settings(ScoringSettings, cfg)
    assert s.kafka.input_topic == "corpus.a"
    assert s.kafka.group_id == "from-env"
    assert s.ask_llm.policy.mode == "top_fraction"
    assert s.ask_llm.policy.top_fraction == 0.3


@pytest.mark.parametrize(
    "body",
    [
        "kafka:\n  bootstrap: x\n",
        "stepz: []\n",
        "steps: [heuristics, heuristics]\n",
        "steps: [vibes]\n",
        "- just a list\n",
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, body: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(body)
    with pytest.raises(ConfigError):
        load_settings(ScoringSettings, cfg)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(ScoringSettings, tmp_path / "nope.yaml")
