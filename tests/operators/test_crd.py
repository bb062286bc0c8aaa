"""The SluicePipeline CRD: a structural schema the API server accepts, the same fields and
defaults as the operator's typed spec, examples that validate, bad objects that do not."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from operators import GROUP, KIND, PLURAL, VERSION
from operators.crd import (
    Condition,
    LagSourceState,
    PipelineSpec,
    PipelineStatus,
    SampleState,
    SpecError,
    StageStatus,
    parse_spec,
    parse_status,
    set_condition,
)
from tests.operators import schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "operators" / "examples" / "pipeline.yaml"


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "kafka": {"bootstrapServers": "kafka:9092"},
            "stages": [
                {
                    "name": "scoring",
                    "kind": "scoring",
                    "image": "sluice:0.1.0",
                    "topics": {"input": "sluice.ingest", "output": "sluice.scored"},
                    "group": "sluice-scoring",
                }
            ],
        },
    }


def test_crd_names_match_the_operator() -> None:
    crd = schema.crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert crd["spec"]["group"] == GROUP
    assert crd["spec"]["names"]["kind"] == KIND
    assert crd["spec"]["names"]["plural"] == PLURAL
    (version,) = crd["spec"]["versions"]
    assert version["name"] == VERSION and version["served"] and version["storage"]
    # The operator writes status through the status subresource.
    assert version["subresources"] == {"status": {}}


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path or "/", node)]
    for key, sub in (node.get("properties") or {}).items():
        out += _walk(sub, f"{path}/{key}")
    if isinstance(node.get("items"), dict):
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural() -> None:
    """What the API server requires of a v1 CRD schema: a type on every node (unless it keeps
    unknown fields), no $ref, properties and additionalProperties not mixed, defaults that
    validate against their own node, list-map keys that are required."""
    for path, node in _walk(schema.schema()):
        assert "$ref" not in node, path
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            assert node.get("type") in {
                "object",
                "array",
                "string",
                "integer",
                "number",
                "boolean",
            }, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node:
            jsonschema.Draft7Validator(node).validate(node["default"])
        if node.get("x-kubernetes-list-type") == "map":
            assert set(node["x-kubernetes-list-map-keys"]) <= set(
                node["items"].get("required", [])
            ), path
    jsonschema.Draft7Validator.check_schema(schema.schema())


def test_stage_kinds_are_services_in_the_image() -> None:
    (version,) = schema.crd()["spec"]["versions"]
    stage = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["stages"][
        "items"
    ]
    for kind in stage["properties"]["kind"]["enum"]:
        assert (ROOT / "services" / kind / "__main__.py").is_file(), kind


def _fields(model: type[Any]) -> set[str]:
    return {f.validation_alias for f in model.model_fields.values()}


def test_schema_and_typed_spec_have_the_same_fields() -> None:
    spec_schema = schema.schema()["properties"]["spec"]
    stage_schema = spec_schema["properties"]["stages"]["items"]
    from operators.crd import KafkaSpec, ScalingSpec, StageSpec, TopicsSpec

    pairs = [
        (spec_schema, PipelineSpec),
        (spec_schema["properties"]["kafka"], KafkaSpec),
        (stage_schema, StageSpec),
        (stage_schema["properties"]["topics"], TopicsSpec),
        (stage_schema["properties"]["scaling"], ScalingSpec),
    ]
    for node, model in pairs:
        assert set(node["properties"]) == _fields(model), model.__name__


def test_crd_defaults_equal_the_typed_defaults() -> None:
    """A minimal object as the API server stores it (CRD defaults applied) reads back, and
    dumps, identically: the operator and the API server agree on every default."""
    obj = minimal()
    schema.validate(obj)
    defaulted = schema.with_defaults(schema.schema(), obj)["spec"]
    parsed = PipelineSpec.model_validate(defaulted)
    assert parsed.model_dump(by_alias=True, exclude_none=True) == defaulted
    # Defaults the schema leaves out are the typed model's too.
    assert parsed == PipelineSpec.model_validate(minimal()["spec"])


def test_example_pipeline_is_valid() -> None:
    obj = yaml.safe_load(EXAMPLE.read_text())
    schema.validate(obj)
    spec = parse_spec(obj["metadata"]["name"], schema.with_defaults(schema.schema(), obj)["spec"])
    assert [s.name for s in spec.stages] == ["scoring", "density", "rewrite"]
    assert spec.stages[0].scaling.policy().min_replicas == 0


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    node: Any = obj
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return obj


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.stages.0.kind", "translate"),  # no such service
        ("spec.stages.0.name", "Scoring"),  # not a DNS label
        ("spec.stages.0.gpus", -1),
        ("spec.stages.0.topics.input", "has space"),
        ("spec.stages.0.scaling", {"minReplicas": -1}),
        ("spec.stages.0.scaling", {"maxReplicas": 0}),
        ("spec.stages.0.scaling", {"tolerancePercent": 95}),
        ("spec.stages.0.resources", {"limits": {"memory": "lots"}}),
        ("spec.kafka.bootstrapServers", "kafka"),  # no port
        ("spec.stages", []),
        ("spec.stages.0.imagePullPolicy", "Sometimes"),
    ],
)
def test_schema_and_typed_spec_reject(path: str, value: Any) -> None:
    bad = _set(minimal(), path, value)
    with pytest.raises(jsonschema.ValidationError):
        schema.validate(bad)
    with pytest.raises(SpecError):
        parse_spec("p", bad["spec"])


def test_missing_required_fields_are_rejected() -> None:
    for field in ("image", "topics", "group", "kind"):
        bad = copy.deepcopy(minimal())
        del bad["spec"]["stages"][0][field]
        with pytest.raises(jsonschema.ValidationError):
            schema.validate(bad)
        with pytest.raises(SpecError, match=field):
            parse_spec("p", bad["spec"])


def test_rules_beyond_the_schema() -> None:
    """What the CRD expresses as CEL rules and list-map keys (which jsonschema does not
    evaluate) or cannot express: the typed spec enforces it."""
    stage = minimal()["spec"]["stages"][0]
    spec = minimal()["spec"]
    with pytest.raises(SpecError, match="minReplicas"):
        parse_spec("p", _set(spec, "stages.0.scaling", {"minReplicas": 5, "maxReplicas": 2}))
    with pytest.raises(SpecError, match="names must be unique"):
        parse_spec("p", {**spec, "stages": [stage, {**stage, "group": "other"}]})
    with pytest.raises(SpecError, match="groups must be unique"):
        parse_spec("p", {**spec, "stages": [stage, {**stage, "name": "again"}]})
    with pytest.raises(SpecError, match="over 63"):
        parse_spec("p" * 60, spec)
    owned = {"name": "SLUICE_SCORING_KAFKA__GROUP_ID", "value": "x"}
    with pytest.raises(SpecError, match="operator-owned"):
        parse_spec("p", _set(spec, "stages.0.env", [owned]))
    with pytest.raises(SpecError, match="imag"):  # a typo is an error, not ignored
        parse_spec("p", _set(spec, "stages.0.imag", "x"))
    # Another stage's prefix, or any other setting, is the user's to set.
    ok = parse_spec(
        "p", _set(spec, "stages.0.env", [{"name": "SLUICE_SCORING_LOG_LEVEL", "value": "DEBUG"}])
    )
    assert ok.stages[0].env[0].name == "SLUICE_SCORING_LOG_LEVEL"


def test_status_the_operator_writes_fits_the_schema() -> None:
    """Every status field the operator writes is in the CRD's status schema (the API server
    would otherwise prune it) and reads back as written."""
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    ready = set_condition([], Condition(type="Ready", status="True", reason="PodsReady"), now)
    stage = StageStatus(
        name="scoring",
        deployment="p-scoring",
        replicas=2,
        desired_replicas=2,
        ready_replicas=1,
        partitions=4,
        observed_lag=10,
        incoming_rate=1.5,
        consumption_rate=2.5,
        last_scale_time="2026-01-02T03:04:05.000000Z",
        idle_since="2026-01-02T03:04:05.000000Z",
        last_decision="lag 10",
        conditions=ready,
        lag_source=LagSourceState(failures=1, retry_at="2026-01-02T03:04:10.000000Z"),
        sample=SampleState(
            sampled_at="2026-01-02T03:04:05.000000Z", end_offsets=20, committed_offsets=10, lag=10
        ),
    )
    status = PipelineStatus(observed_generation=3, conditions=ready, stages=[stage]).dump()
    obj = {**minimal(), "status": status}
    status_schema = schema.schema()["properties"]["status"]
    jsonschema.Draft7Validator(status_schema).validate(status)
    assert _covered(status_schema, status), "status has fields the CRD would prune"
    schema.validate(obj)
    assert parse_status(status) == PipelineStatus.model_validate(status)
    assert parse_status(status).stages[0] == stage


def _covered(node: dict[str, Any], value: Any) -> bool:
    if isinstance(value, dict):
        props = node.get("properties") or {}
        return all(k in props and _covered(props[k], v) for k, v in value.items())
    if isinstance(value, list):
        return all(_covered(node["items"], v) for v in value)
    return True


def test_unreadable_status_is_forgotten_not_fatal() -> None:
    assert parse_status({"stages": "garbage"}) == PipelineStatus()
    assert parse_status(None) == PipelineStatus()


def test_condition_transition_time_moves_only_on_a_status_change() -> None:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    t1 = t0 + dt.timedelta(minutes=1)
    first = set_condition([], Condition(type="Ready", status="False", reason="A"), t0)
    same = set_condition(first, Condition(type="Ready", status="False", reason="B"), t1)
    assert same[0].last_transition_time == first[0].last_transition_time
    assert same[0].reason == "B"
    flipped = set_condition(same, Condition(type="Ready", status="True"), t1)
    assert flipped[0].last_transition_time == "2026-01-01T00:01:00.000000Z"
    both = set_condition(flipped, Condition(type="LagSourceAvailable", status="True"), t1)
    assert [c.type for c in both] == ["Ready", "LagSourceAvailable"]
