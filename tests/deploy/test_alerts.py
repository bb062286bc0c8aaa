"""The chart's PrometheusRule, for real: rendered by helm, its groups checked by
`promtool check rules` and run by `promtool test rules` against synthetic series that make
each alert fire and not fire (promtool/alerts_test.yaml); every metric the rules name is one
the services or the operator really export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.chart import GPU_VALUES, needs_helm, needs_promtool, render, tool

pytestmark = [needs_helm, needs_promtool]

UNIT_TESTS = Path(__file__).parent / "promtool" / "alerts_test.yaml"

# The values promtool/alerts_test.yaml is written for (see its header). A values file, not
# --set: helm's --set turns 0.1 into a string.
RULE_VALUES: dict[str, Any] = {
    "prometheusRule": {
        "enabled": True,
        "alertLabels": {"team": "data"},
        "stageDown": {"for": "5m"},
        "lagGrowing": {"window": "10m", "for": "5m"},
        "retention": {"window": "10m", "for": "5m"},
        "deadLetters": {"window": "15m"},
        "operator": {"for": "10m"},
    },
    "stages": {
        "scoring": {"alerts": {"lagThreshold": 100, "retention": {"min": 0.1, "max": 0.9}}},
        "density": {
            "enabled": True,
            "config": {"mode": "online"},
            "alerts": {"lagThreshold": 100, "retention": {"min": 0.2, "max": 0.8}},
        },
        "synth": {
            "enabled": True,
            "alerts": {"lagThreshold": 100, "retention": {"min": 1.05, "max": 20}},
        },
    },
    "operator": {"enabled": True},
}


@pytest.fixture
def rule_values(tmp_path: Path) -> Path:
    path = tmp_path / "rule-values.yaml"
    path.write_text(yaml.safe_dump(RULE_VALUES))
    return path


def _rule_groups(*set_values: str, values_files: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    objs = render(*set_values, values_files=values_files)
    rules = [o for (kind, _), o in objs.items() if kind == "PrometheusRule"]
    assert len(rules) == 1
    groups: list[dict[str, Any]] = rules[0]["spec"]["groups"]
    return groups


def _promtool(*args: str, cwd: Path) -> None:
    out = subprocess.run(
        [str(tool("promtool")), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_fire_and_resolve_as_specified(tmp_path: Path, rule_values: Path) -> None:
    groups = _rule_groups(values_files=(rule_values,))
    assert [g["name"] for g in groups] == [
        "sluice-density",
        "sluice-scoring",
        "sluice-synth",
        "sluice-operator",
    ]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    _promtool("test", "rules", UNIT_TESTS.name, cwd=tmp_path)


def test_gpu_values_rules_pass_promtool_check(tmp_path: Path) -> None:
    groups = _rule_groups(values_files=(GPU_VALUES,))
    stages = yaml.safe_load(GPU_VALUES.read_text())["stages"]
    assert {g["name"] for g in groups} == {f"sluice-{s}" for s in stages} | {"sluice-operator"}
    for g in groups:
        alerts = {r["alert"] for r in g["rules"]}
        if g["name"] == "sluice-operator":
            assert alerts == {"SluiceOperatorDown", "SluiceOperatorLagSourceDown"}
        else:
            assert alerts == {
                "SluiceStageDown",
                "SluiceStageLagGrowing",
                "SluiceStageRetentionOutOfBand",
                "SluiceStageDeadLetters",
            }
        for r in g["rules"]:
            assert r["labels"]["team"] == "data-platform"  # prometheusRule.alertLabels
            assert {"summary", "description"} <= set(r["annotations"])
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    _promtool("check", "rules", "rules.yaml", cwd=tmp_path)


def _exported_names() -> set[str]:
    """Series names the stage runtime and the operator register, as Prometheus sees them."""
    from operators.metrics import OperatorMetrics
    from services.runtime.metrics import StageMetrics

    stage = StageMetrics("scoring")
    stage.score_histogram("ask_llm")
    names = {"up"}  # written by Prometheus for every target
    for registry in (stage.registry, OperatorMetrics().registry):
        for family in registry.collect():
            suffixes = {
                "counter": ("_total",),
                "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count"),
            }[family.type]
            names |= {family.name + s for s in suffixes}
    return names


def test_rules_name_only_exported_metrics(rule_values: Path) -> None:
    exported = _exported_names()
    used = set()
    for g in _rule_groups(values_files=(rule_values,)):
        for r in g["rules"]:
            used |= set(re.findall(r"\b(sluice_\w+|up)\s*\{", r["expr"]))
    assert used, "no metric names found in the rules"
    assert used <= exported, used - exported
