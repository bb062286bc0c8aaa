"""The SluiceScaler CRD: a structural schema the API server accepts, the same fields and
defaults as the operator's typed spec, the registry's stage kinds, bad objects rejected."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import jsonschema
import pytest

from operators import GROUP, KIND, PLURAL, VERSION
from operators.crd import (
    Condition,
    LagSourceState,
    SampleState,
    ScalerSpec,
    ScalerStatus,
    ScalingSpec,
    SpecError,
    StageRef,
    TargetRef,
    parse_spec,
    parse_status,
    set_condition,
)
from operators.lag import lag_target
from services.runtime.errors import ConfigError
from services.runtime.registry import KINDS
from tests.operators import schema


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": "sluice-scoring", "namespace": "ns"},
        "spec": {
            "scaleTargetRef": {"name": "sluice-scoring"},
            "stage": {"kind": "scoring"},
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
    # The operator writes status through the status subresource; it scales the target
    # through the target's scale subresource, so the scaler needs none of its own.
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


def test_stage_kinds_are_the_registry_kinds() -> None:
    stage = schema.schema()["properties"]["spec"]["properties"]["stage"]
    assert tuple(stage["properties"]["kind"]["enum"]) == KINDS


def _fields(model: type[Any]) -> set[str]:
    return {f.validation_alias for f in model.model_fields.values()}


def test_schema_and_typed_spec_have_the_same_fields() -> None:
    spec_schema = schema.schema()["properties"]["spec"]
    pairs = [
        (spec_schema, ScalerSpec),
        (spec_schema["properties"]["scaleTargetRef"], TargetRef),
        (spec_schema["properties"]["stage"], StageRef),
        (spec_schema["properties"]["scaling"], ScalingSpec),
    ]
    for node, model in pairs:
        assert set(node["properties"]) == _fields(model), model.__name__


def test_crd_defaults_equal_the_typed_defaults() -> None:
    """A minimal object as the API server stores it (CRD defaults applied) reads back, and
    dumps, identically: the operator and the API server agree on every default."""
    obj = minimal()
    schema.validate(obj)
    defaulted = schema.with_defaults(schema.schema(), obj)["spec"]
    parsed = ScalerSpec.model_validate(defaulted)
    assert parsed.model_dump(by_alias=True, exclude_none=True) == defaulted
    assert parsed == ScalerSpec.model_validate(minimal()["spec"])


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    node: Any = obj
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return obj


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.scaleTargetRef.kind", "StatefulSet"),
        ("spec.scaleTargetRef.name", "Not_A_Name"),
        ("spec.scaling", {"minReplicas": -1}),
        ("spec.scaling", {"maxReplicas": 0}),
        ("spec.scaling", {"tolerancePercent": 95}),
        ("spec.scaling", {"targetLagPerReplica": 0}),
    ],
)
def test_schema_and_typed_spec_reject(path: str, value: Any) -> None:
    bad = _set(minimal(), path, value)
    with pytest.raises(jsonschema.ValidationError):
        schema.validate(bad)
    with pytest.raises(SpecError):
        parse_spec(bad["spec"])


def test_unknown_stage_kind_is_rejected_by_schema_and_registry() -> None:
    bad = _set(minimal(), "spec.stage.kind", "translate")
    with pytest.raises(jsonschema.ValidationError):
        schema.validate(bad)
    with pytest.raises(ConfigError, match="unknown stage kind"):
        lag_target("translate", {})


def test_rules_beyond_the_schema() -> None:
    """What the CRD states as a CEL rule (which jsonschema does not evaluate), and typos."""
    spec = minimal()["spec"]
    with pytest.raises(SpecError, match="minReplicas"):
        parse_spec(_set(spec, "scaling", {"minReplicas": 5, "maxReplicas": 2}))
    with pytest.raises(SpecError, match="scaleTarget"):
        parse_spec(_set(spec, "scaleTarget", {"name": "x"}))


def test_lag_target_is_the_group_the_worker_commits() -> None:
    """The group comes from the stage's config through the registry: kafka.group_id for
    most stages, the per-pass, per-version group for density's two passes."""
    kafka = {"bootstrap_servers": "k:9092", "input_topic": "in", "group_id": "g"}
    scoring = lag_target("scoring", {"kafka": kafka})
    assert (scoring.bootstrap_servers, scoring.topic, scoring.group) == ("k:9092", "in", "g")
    density = {"kafka": kafka, "store": {"endpoint": "s3:9000"}, "sketch": {"version": 7}}
    assert lag_target("density", density).group == "g.sample.default.v7"
    density["sketch"] = {"name": "corpus", "version": 2}
    assert lag_target("density", density).group == "g.sample.corpus.v2"
    assert lag_target("density", {"kafka": kafka, "mode": "online"}).group == "g"
    # Pass 2 with no pinned version samples the latest merged one, which only the store
    # knows: the operator cannot name that group, and says so.
    with pytest.raises(ConfigError, match=r"sketch\.version"):
        lag_target("density", {"kafka": kafka})
    with pytest.raises(ConfigError, match="invalid scoring settings"):
        lag_target("scoring", {"kafka": {**kafka, "no_such_field": 1}})


def test_status_the_operator_writes_fits_the_schema() -> None:
    """Every status field the operator writes is in the CRD's status schema (the API server
    would otherwise prune it) and reads back as written."""
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    ready = set_condition([], Condition(type="Ready", status="True", reason="PodsReady"), now)
    status = ScalerStatus(
        observed_generation=3,
        consumer_group="sluice-density.sample.corpus.v1",
        topic="sluice.scored",
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
    dumped = status.dump()
    status_schema = schema.schema()["properties"]["status"]
    jsonschema.Draft7Validator(status_schema).validate(dumped)
    assert _covered(status_schema, dumped), "status has fields the CRD would prune"
    schema.validate({**minimal(), "status": dumped})
    assert parse_status(dumped) == status


def _covered(node: dict[str, Any], value: Any) -> bool:
    if isinstance(value, dict):
        props = node.get("properties") or {}
        return all(k in props and _covered(props[k], v) for k, v in value.items())
    if isinstance(value, list):
        return all(_covered(node["items"], v) for v in value)
    return True


def test_unreadable_status_is_forgotten_not_fatal() -> None:
    assert parse_status({"conditions": "garbage"}) == ScalerStatus()
    assert parse_status(None) == ScalerStatus()


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
