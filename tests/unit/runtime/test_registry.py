"""The stage registry is the one list of stage kinds: every other place that lists them
(CLI, local runner, chart schema and helpers, CRD, Tiltfile, operator) must agree with it,
and the consumer group the worker commits is the one the operator is told to watch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from services.runtime.errors import ConfigError
from services.runtime.registry import (
    KINDS,
    STAGES,
    consumer_group,
    load_stage_settings,
    stage,
)

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "sluice"


def test_kinds_are_unique_and_folders_exist() -> None:
    assert len(set(KINDS)) == len(KINDS) == len(STAGES)
    for kind in KINDS:
        assert (ROOT / "services" / kind / "__main__.py").is_file(), kind


@pytest.mark.parametrize("kind", KINDS)
def test_declaration_matches_the_settings_class(kind: str) -> None:
    spec = stage(kind)
    cls = spec.settings_class()
    assert cls.model_config.get("env_prefix") == spec.env_prefix
    kafka = cls().kafka
    assert (kafka.input_topic, kafka.output_topic, kafka.group_id) == (
        spec.topics.input,
        spec.topics.output,
        spec.topics.group,
    )
    if spec.object_store:  # the block the chart wires S3 into exists, with its fields
        block = load_stage_settings(kind, {})
        for part in spec.object_store.split("."):
            block = getattr(block, part)
        assert {"endpoint", "bucket", "secure", "region"} <= set(type(block).model_fields)


def test_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known: scoring, density"):
        stage("dedupe")


def test_registry_and_settings_import_no_model_runtime() -> None:
    """The operator imports the registry and loads stage settings: no torch for it."""
    code = (
        "import sys\n"
        "from services.runtime.registry import KINDS, load_stage_settings, consumer_group\n"
        "for k in KINDS:\n"
        "    consumer_group(k, load_stage_settings(k, {'sketch': {'version': 2}}"
        " if k == 'density' else {}))\n"
        "heavy = {'torch', 'sentence_transformers', 'transformers', 'vllm', 'kafka'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


# -- consumer groups ------------------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "density"])
def test_group_is_the_configured_one(kind: str) -> None:
    settings = load_stage_settings(kind, {"kafka": {"group_id": "team-a"}})
    assert consumer_group(kind, settings) == "team-a"


def test_density_groups_per_pass_and_version() -> None:
    def group(**config: object) -> str:
        return consumer_group("density", load_stage_settings("density", config))

    assert group(mode="online") == "sluice-density"
    assert group(mode="two_pass_build", sketch={"version": 3}) == "sluice-density.build.default.v3"
    assert (
        group(mode="two_pass_sample", sketch={"name": "web", "version": 7}, kafka={"group_id": "g"})
        == "g.sample.web.v7"
    )
    with pytest.raises(ConfigError, match=r"sketch\.version"):
        group(mode="two_pass_sample")


def test_density_worker_commits_the_registry_group() -> None:
    """The worker's Kafka settings name the group ``consumer_group`` returns, with the
    version pass 2 resolved (here 4) filled in."""
    from services.density.settings import DensitySettings
    from services.density.worker import pass_kafka_settings

    kafka = pass_kafka_settings(DensitySettings.model_validate({"mode": "two_pass_sample"}), 4)
    pinned = load_stage_settings("density", {"mode": "two_pass_sample", "sketch": {"version": 4}})
    assert kafka.group_id == consumer_group("density", pinned) == "sluice-density.sample.default.v4"
    build_settings = {"mode": "two_pass_build", "sketch": {"version": 2}}
    build = pass_kafka_settings(DensitySettings.model_validate(build_settings), 2)
    assert build.output_topic == ""


def test_bad_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid scoring settings"):
        load_stage_settings("scoring", {"no_such_field": 1})


# -- derived places ---------------------------------------------------------------------


def test_cli_serve_choices() -> None:
    from services.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    serve = sub.choices["serve"]  # type: ignore[index]
    service = next(a for a in serve._actions if a.dest == "service")
    assert tuple(service.choices) == KINDS


def test_chart_schema_enum_and_values() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert tuple(schema["properties"]["stages"]["propertyNames"]["enum"]) == KINDS
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert tuple(values["stages"]) == KINDS


def test_chart_helpers_object_store_paths() -> None:
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    block = re.search(r'define "sluice.s3ConfigPath".*?\(dict ([^)]*)\)', text, re.S)
    assert block, "sluice.s3ConfigPath not found in _helpers.tpl"
    words = re.findall(r'"([^"]*)"', block.group(1))
    declared = {s.name: s.object_store for s in STAGES if s.object_store}
    assert dict(zip(words[::2], words[1::2], strict=True)) == declared


def _enums_with_kinds(node: object) -> list[list[str]]:
    """Every enum list in a YAML tree that names at least one stage kind."""
    found: list[list[str]] = []
    if isinstance(node, dict):
        enum = node.get("enum")
        if isinstance(enum, list) and set(enum) & set(KINDS):
            found.append(enum)
        for v in node.values():
            found.extend(_enums_with_kinds(v))
    elif isinstance(node, list):
        for v in node:
            found.extend(_enums_with_kinds(v))
    return found


def test_crd_enums() -> None:
    crds = sorted((CHART / "crds").glob("*.yaml"))
    for path in crds:
        for doc in yaml.safe_load_all(path.read_text()):
            for enum in _enums_with_kinds(doc):
                assert tuple(enum) == KINDS, f"{path.name}: {enum}"


def test_operator_stage_kind() -> None:
    crd = pytest.importorskip("operators.crd")
    kind = getattr(crd, "StageKind", None)
    if kind is not None and typing.get_origin(kind) is typing.Literal:
        assert typing.get_args(kind) == KINDS


def test_tiltfile_services() -> None:
    text = (ROOT / "Tiltfile").read_text()
    charted = re.findall(r'"chart":\s*"stages\.([a-z_]+)"', text)
    entry = re.findall(r'"python",\s*"-m",\s*"services\.([a-z_]+)"', text)
    assert tuple(charted) == KINDS
    assert tuple(entry) == KINDS


def test_local_runner_stages() -> None:
    from services.local import runner

    assert tuple(runner.STAGES) == KINDS
