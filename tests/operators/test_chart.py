"""The operator's part of the chart, rendered by helm: valid Kubernetes objects, least-privilege
RBAC, and settings the operator process accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from operators.settings import LagClientSettings, OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sluice"


def _helm() -> str | None:
    beside_python = Path(sys.executable).parent / "helm"  # where `make install` puts it
    if beside_python.is_file():
        return str(beside_python)
    return os.environ.get("HELM") or shutil.which("helm")


pytestmark = pytest.mark.skipif(_helm() is None, reason="helm not found (make install)")


def render(*set_values: str) -> list[dict[str, Any]]:
    cmd = [str(_helm()), "template", "sluice", str(CHART), "--namespace", "curation"]
    for s in set_values:
        cmd += ["--set", s]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def operator_objects(*set_values: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {
        (d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]): d
        for d in render("operator.enabled=true", *set_values)
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"
    }


def test_operator_is_off_by_default() -> None:
    assert not [
        d
        for d in render()
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"
    ]


def test_rendered_operator_objects_validate_strictly() -> None:
    import kubernetes_validate

    objs = operator_objects()
    assert {k[0] for k in objs} == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "NetworkPolicy",  # on by default: metrics in, DNS, brokers and the API server out
    }
    for obj in objs.values():
        kubernetes_validate.validate(obj, "1.33.0", strict=True)


def test_crd_validates_strictly() -> None:
    import kubernetes_validate

    crd = yaml.safe_load((CHART / "crds" / "sluicescalers.sluice.dev.yaml").read_text())
    kubernetes_validate.validate(crd, "1.33.0", strict=True)


# What operators/ calls, and nothing more: (apiGroup, resource) -> verbs. The operator reads
# its target and sets replicas through the scale subresource, as the HPA does; it creates,
# patches and deletes no workload.
NEEDED = {
    ("sluice.dev", "sluicescalers"): {"get", "list", "watch", "patch"},  # kopf: watch, progress
    ("sluice.dev", "sluicescalers/status"): {"get", "patch"},
    ("apps", "deployments"): {"get"},
    ("apps", "deployments/scale"): {"patch"},
    ("", "events"): {"create"},
}


def test_rbac_is_least_privilege_per_watched_namespace() -> None:
    objs = operator_objects("operator.watchNamespaces={curation,research}")
    roles = {k[1]: v for k, v in objs.items() if k[0] == "Role"}
    bindings = {k[1]: v for k, v in objs.items() if k[0] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"curation", "research"}
    assert not [k for k in objs if k[0].startswith("Cluster")]
    for ns, role in roles.items():
        granted: dict[tuple[str, str], set[str]] = {}
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            assert "resourceNames" not in rule
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
        assert granted == NEEDED, ns
        (subject,) = bindings[ns]["subjects"]
        assert subject == {
            "kind": "ServiceAccount",
            "name": "sluice-operator",
            "namespace": "curation",
        }
        assert bindings[ns]["roleRef"]["name"] == role["metadata"]["name"]


def test_operator_deployment_runs_the_operator_with_accepted_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objs = operator_objects(
        "operator.watchNamespaces={curation,research}",
        "operator.reconcileIntervalSeconds=5",
        "operator.kafka.retryMaxSeconds=120",
    )
    deploy = objs[("Deployment", "curation", "sluice-operator")]
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}  # never two reconcilers
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "sluice-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["command"] == ["python", "-m", "operators"]
    assert c["args"] == ["--namespace", "curation", "--namespace", "research"]
    for e in c["env"]:
        monkeypatch.setenv(e["name"], e["value"])
    settings = OperatorSettings()  # unknown SLUICE_OPERATOR_* names would be ignored: check below
    names = {e["name"] for e in c["env"] if e["name"].startswith("SLUICE_OPERATOR_")}
    known = {f"SLUICE_OPERATOR_{f.upper()}" for f in OperatorSettings.model_fields} | {
        f"SLUICE_OPERATOR_KAFKA__{f.upper()}" for f in LagClientSettings.model_fields
    }
    assert names <= known, names - known
    assert settings.reconcile_interval_seconds == 5
    assert settings.kafka.retry_max_seconds == 120
    assert settings.metrics_port == 9100
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": settings.metrics_port, "healthz": settings.liveness_port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    service = objs[("Service", "curation", "sluice-operator")]
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]


def test_values_schema_rejects_a_bad_operator_block() -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        render("operator.enabled=true", "operator.watchNamespaces={Not_A_Namespace}")
    assert "watchNamespaces" in err.value.stderr


EXAMPLES = ROOT / "operators" / "examples"


def test_example_values_render_what_the_operator_can_scale() -> None:
    """operators/examples/values.yaml: valid objects, a scaler per autoscaled stage whose
    config loads as the stage's settings and names the group its workers commit, and the
    density sketch build Job that pass 2 waits for."""
    import kubernetes_validate

    from operators.crd import parse_spec
    from operators.lag import lag_target
    from services.runtime.registry import load_stage_settings
    from tests.deploy.chart import render_docs
    from tests.operators import schema

    lint = subprocess.run(
        [str(_helm()), "lint", "--strict", str(CHART), "--values", str(EXAMPLES / "values.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    objs = render_docs(values_files=(EXAMPLES / "values.yaml",))
    scalers = {}
    for obj in objs:
        if obj["kind"] == "SluiceScaler":
            schema.validate(obj)
            scalers[obj["metadata"]["name"]] = parse_spec(obj["spec"])
        elif obj["apiVersion"] != "monitoring.coreos.com/v1":
            kubernetes_validate.validate(obj, "1.33.0", strict=True)
    groups = {n: lag_target(s.stage.kind, s.stage.config).group for n, s in scalers.items()}
    assert groups == {
        "sluice-scoring": "sluice-scoring",
        "sluice-density": "sluice-density.sample.corpus.v1",
    }
    deployments = {o["metadata"]["name"] for o in objs if o["kind"] == "Deployment"}
    assert {s.scale_target_ref.name for s in scalers.values()} <= deployments
    jobs = {o["metadata"]["name"] for o in objs if o["kind"] == "Job"}
    assert "sluice-density-build-v1" in jobs
    for cm in (o for o in objs if o["kind"] == "ConfigMap" and "config.yaml" in o["data"]):
        kind = cm["metadata"]["labels"]["app.kubernetes.io/component"]
        for key in ("config.yaml", "build.yaml"):
            if key in cm["data"]:
                load_stage_settings(kind, yaml.safe_load(cm["data"][key]))


def test_example_scaler_is_valid() -> None:
    from operators.crd import parse_spec
    from operators.lag import lag_target
    from tests.operators import schema

    obj = yaml.safe_load((EXAMPLES / "scaler.yaml").read_text())
    schema.validate(obj)
    spec = parse_spec(schema.with_defaults(schema.schema(), obj)["spec"])
    assert lag_target(spec.stage.kind, spec.stage.config).group == "my-scoring"
    assert spec.scaling.policy().max_replicas == 8
