"""One pipeline definition: stages chain by topic in the order given, a stage may read an
earlier topic (fan-out), the chain is checked, and the same file renders chart values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.cli import main
from services.runtime.errors import ConfigError
from services.runtime.pipeline import Pipeline
from services.runtime.registry import KINDS, consumer_group

CHART = Path(__file__).resolve().parents[3] / "charts" / "sluice"


def test_stages_chain_by_topic() -> None:
    p = Pipeline.model_validate({"stages": ["scoring", "density", "distill"]})
    topics = [(s.topics.input, s.topics.output) for s in p.stages]
    assert topics == [
        ("sluice.ingest", "sluice.scored"),
        ("sluice.scored", "sluice.sampled"),
        ("sluice.sampled", "sluice.distilled"),
    ]
    assert p.source == "sluice.ingest" and p.sinks == ["sluice.distilled"]
    assert [s.group for s in p.stages] == ["sluice-scoring", "sluice-density", "sluice-distill"]


def test_fan_out_and_settings() -> None:
    p = Pipeline.model_validate(
        {
            "stages": [
                "scoring",
                {"kind": "density", "config": {"mode": "online", "kafka": {"max_poll_records": 2}}},
                {"kind": "distill", "topics": {"input": "sluice.scored"}, "group": "kd"},
            ]
        }
    )
    assert p.sinks == ["sluice.sampled", "sluice.distilled"]
    density = p.stages[1].settings()
    assert density.kafka.input_topic == "sluice.scored"
    assert density.kafka.max_poll_records == 2
    assert consumer_group("density", density) == "sluice-density"
    assert consumer_group("distill", p.stages[2].settings()) == "kd"


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        (["scoring", "scoring"], "repeated"),
        (["scoring", {"kind": "density", "topics": {"input": "nowhere"}}], "no stage before"),
        (["scoring", {"kind": "density", "topics": {"output": "sluice.ingest"}}], "in use"),
        ([{"kind": "density", "config": {"kafka": {"group_id": "x"}}}], "topics/group instead"),
        ([], "at least 1"),
    ],
)
def test_broken_chains_are_refused(stages: list[object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Pipeline.model_validate({"stages": stages})


def test_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="unknown stage kind 'dedupe'"):
        Pipeline.model_validate({"stages": ["dedupe"]})


def test_render_values(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "stages": ["scoring", {"kind": "density", "config": {"mode": "online"}}],
                "scoring": {"steps": ["heuristics"]},
                "batch_size": 8,
            }
        )
    )
    out = tmp_path / "values.yaml"
    assert main(["pipeline", "render-values", str(pipeline), "--out", str(out)]) == 0
    stages = yaml.safe_load(out.read_text())["stages"]
    assert tuple(stages) == KINDS
    assert stages["scoring"]["config"] == {"steps": ["heuristics"]}
    assert stages["density"] == {
        "enabled": True,
        "topics": {"input": "sluice.scored", "output": "sluice.sampled", "dlq": ""},
        "group": "sluice-density",
        "config": {"mode": "online"},
    }
    assert all(stages[k] == {"enabled": False} for k in ("rewrite", "synth", "distill"))
    # Every key rendered is one the chart's schema knows for a stage.
    schema = json.loads((CHART / "values.schema.json").read_text())
    stage_schema = schema["properties"]["stages"]["additionalProperties"]
    while "$ref" in stage_schema:  # '#/$defs/stage'
        node = schema
        for part in stage_schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        stage_schema = node
    known = set(stage_schema["properties"])
    for values in stages.values():
        assert set(values) <= known
