"""The one stage interface: settings take their env prefix and Kafka defaults from the
registry (and keep them when one Kafka field comes from the environment), every core has
``model_version`` as a property, and generating cores share one lazy wiring."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from services.density.core import DensityCore
from services.density.settings import DensitySettings
from services.distill.core import DistillCore
from services.distill.settings import DistillSettings
from services.rewrite.core import RewriteCore
from services.rewrite.settings import RewriteSettings
from services.runtime.errors import ConfigError
from services.runtime.registry import KINDS, stage
from services.runtime.settings import load_settings
from services.scoring.core import ScoringCore
from services.scoring.settings import ScoringSettings
from services.synth.core import SynthCore


def test_env_override_of_one_kafka_field_keeps_the_stage_topics(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SLUICE_REWRITE_KAFKA__BOOTSTRAP_SERVERS", "broker:9092")
    s = RewriteSettings()
    assert (s.kafka.bootstrap_servers, s.kafka.input_topic, s.kafka.output_topic) == (
        "broker:9092",
        "sluice.scored",
        "sluice.rewritten",
    )
    # The file's topic survives the env layer: defaults filled in stay "unset".
    f = tmp_path / "rewrite.yaml"
    f.write_text(yaml.safe_dump({"kafka": {"input_topic": "mine"}}))
    s = load_settings(RewriteSettings, f)
    assert (s.kafka.input_topic, s.kafka.group_id) == ("mine", "sluice-rewrite")


@pytest.mark.parametrize("kind", KINDS)
def test_env_prefix_is_the_registry_one(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = stage(kind)
    monkeypatch.setenv(f"{spec.env_prefix}LOG_LEVEL", "DEBUG")
    cls = spec.settings_class()
    assert cls.model_config.get("env_prefix") == spec.env_prefix
    assert cls().log_level == "DEBUG"


def test_model_version_is_a_property_everywhere() -> None:
    for core_cls in (ScoringCore, DensityCore, RewriteCore, SynthCore, DistillCore):
        assert isinstance(inspect.getattr_static(core_cls, "model_version"), property)
    assert ScoringCore(ScoringSettings(steps=["heuristics"])).model_version == "heuristics"
    density = DensityCore(DensitySettings.model_validate({"embedding": {"model": "m"}}))
    assert density.model_version == "m"


def test_generating_core_wiring() -> None:
    distill = DistillCore(DistillSettings(), backend=lambda: None)  # type: ignore[arg-type,return-value]
    assert distill.generation_cap == DistillSettings().max_new_tokens_limit
    with pytest.raises(ConfigError, match="no embedding model"):
        _ = distill.embedder
    metrics = object()
    rewrite = RewriteCore(RewriteSettings(), metrics=metrics)  # type: ignore[arg-type]
    assert rewrite.metrics is metrics and not rewrite._backend.loaded
