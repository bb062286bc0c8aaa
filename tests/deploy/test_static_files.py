"""The deployment files checked without a cluster: the Tiltfile evaluates as Starlark with
Tilt's built-ins stubbed, the chart's values satisfy values.schema.json and are documented,
Chart.yaml matches the package; with a helm binary (PATH or $HELM) the rendered manifests
are checked for Restricted Pod Security settings, probes, ports and a config file the
service accepts."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.chart import STAGES, needs_helm, tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sluice"
TILTFILE = ROOT / "Tiltfile"

# Tilt built-ins the Tiltfile may call. Each stub records (name, args, kwargs) in _calls and
# returns the record, so values flow on (helm() -> k8s_yaml()) and stay inspectable.
# `read_yaml` returns its default: a developer's tilt-settings.yaml must not change the test.
TILT_BUILTINS = (
    "allow_k8s_contexts",
    "default_registry",
    "docker_build",
    "custom_build",
    "k8s_yaml",
    "helm",
    "k8s_resource",
    "local_resource",
    "local",
    "sync",
    "run",
    "fall_back_on",
    "initial_sync",
    "port_forward",
    "link",
    "watch_file",
    "update_settings",
    "include",
)


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _values() -> dict[str, Any]:
    return _load_yaml(CHART / "values.yaml")


def _schema() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.schema.json").read_text())


# -- Tiltfile ------------------------------------------------------------------------------


def _starlark_source(text: str) -> str:
    """The Tiltfile with stubs for Tilt's built-ins and its load()ed names.

    starlark-go has no load(): each load statement is blanked (keeping line numbers) and
    the names it imports become stubs. The stubs are lambdas on ONE line, joined to the
    Tiltfile's first line when that is a comment, so error line numbers match the file.
    """
    loaded: list[str] = []

    def _blank(m: re.Match[str]) -> str:
        literals = re.findall(r'(?:(\w+)\s*=\s*)?"([^"]*)"', m.group(1))
        # load("module", "name", alias = "name"): skip the module, bind names or aliases.
        loaded.extend(alias or name for alias, name in literals[1:])
        return "\n" * m.group(0).count("\n")

    body = re.sub(r"(?ms)^load\((.*?)\)[ \t]*$", _blank, text)
    names = sorted(set(TILT_BUILTINS) | set(loaded))
    stubs = "; ".join(
        f'{n} = lambda *a, **k: _record("{n}", a, k)' for n in names if n != "read_yaml"
    )
    prelude = (
        "_calls = []; "
        "_record = lambda n, a, k: _calls.append((n, a, k)) or (n, a, k); "
        f"{stubs}; "
        "read_yaml = lambda path, default = None: default"
    )
    first, _, rest = body.partition("\n")
    if not first.strip() or first.lstrip().startswith("#"):
        return f"{prelude}  {first}\n{rest}"
    return f"{prelude}\n{body}"  # line numbers in errors are then off by one


@pytest.fixture(scope="module")
def tilt() -> dict[str, Any]:
    starlark_go = pytest.importorskip(
        "starlark_go", reason="starlark-go (dev extra) is not installed: pip install -e '.[dev]'"
    )
    # Tilt's dialect: top-level if/for, global reassignment, sets, recursion.
    starlark_go.configure_starlark(allow_global_reassign=True, allow_set=True, allow_recursion=True)
    interp = starlark_go.Starlark()
    try:
        interp.exec(_starlark_source(TILTFILE.read_text()), filename="Tiltfile")
    except starlark_go.StarlarkError as exc:
        pytest.fail(f"Tiltfile does not evaluate: {exc}")
    calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}
    for name, args, kwargs in interp.get("_calls"):
        calls.setdefault(name, []).append((args, kwargs))
    return {
        "SERVICES": interp.get("SERVICES"),
        "CONTAINER_PORTS": interp.get("CONTAINER_PORTS"),
        "settings": interp.get("settings"),
        "globals": set(interp.globals()),
        "calls": calls,
    }


def test_tiltfile_defines_services_and_enable_service(tilt: dict[str, Any]) -> None:
    assert "enable_service" in tilt["globals"]
    services = tilt["SERVICES"]
    # Every stage the chart can run, and the operator.
    assert set(services) == set(STAGES) | {"operator"}
    container_ports = tilt["CONTAINER_PORTS"]
    for name, svc in services.items():
        assert {"target", "image", "entrypoint", "chart", "ports", "helm_set"} <= set(svc), name
        expected = {"metrics"} if name == "operator" else {"grpc", "metrics"}
        assert set(svc["ports"]) == expected, name
        assert set(svc["ports"]) <= set(container_ports), name
    local_ports = [p for svc in services.values() for p in svc["ports"].values()]
    assert len(local_ports) == len(set(local_ports)), "local port forwarded twice"
    # By default every service is enabled.
    assert sorted(tilt["settings"]["enable_services"]) == sorted(services)


def test_enable_service_runs_for_each_service(tilt: dict[str, Any]) -> None:
    services, calls = tilt["SERVICES"], tilt["calls"]
    builds = calls.get("docker_build_with_restart", []) + calls.get("docker_build", [])
    assert sorted(args[0] for args, _ in builds) == sorted(s["image"] for s in services.values())
    for args, kwargs in builds:
        name = next(n for n, s in services.items() if s["image"] == args[0])
        assert kwargs["target"] == services[name]["target"]
        assert kwargs["entrypoint"] == services[name]["entrypoint"]
        # Stage images default to their own service; the operator's runs its entrypoint.
        assert kwargs["build_args"].get("SERVICE") == (None if name == "operator" else name)
        # Code edits are synced into the editable install, not rebuilt.
        assert ("sync", ("services", "/app/services"), {}) in kwargs["live_update"]
        assert ("sync", ("operators", "/app/operators"), {}) in kwargs["live_update"]

    # One render for all services, so shared objects (the topics Job) appear once.
    ((args, kwargs),) = calls["helm"]
    assert args[0] == "charts/sluice"
    assert len(calls["k8s_yaml"]) == 1
    sets = kwargs["set"]
    enabled = {m.group(1) for s in sets if (m := re.fullmatch(r"(.+)\.enabled=true", s))}
    assert enabled == {svc["chart"] for svc in services.values()}
    assert "securityContext.readOnlyRootFilesystem=false" in sets  # live_update must write

    resources = {kwargs["new_name"]: (args, kwargs) for args, kwargs in calls["k8s_resource"]}
    assert set(resources) == set(services) | {"topics"}
    for name, (args, kwargs) in resources.items():
        assert args[0] == f"sluice-{name}"  # the chart's workload name for release "sluice"
        forwards = {(a[0], a[1]) for _, a, _ in kwargs.get("port_forwards", [])}
        ports = services[name]["ports"] if name in services else {}
        assert forwards == {(local, tilt["CONTAINER_PORTS"][p]) for p, local in ports.items()}


def test_tilt_services_exist_in_chart_and_code(tilt: dict[str, Any]) -> None:
    values = _values()
    allowed = _schema()["properties"]["stages"]["propertyNames"]["enum"]
    for name, svc in tilt["SERVICES"].items():
        module = svc["entrypoint"][2]  # python -m <module>
        assert svc["entrypoint"][:2] == ["python", "-m"], name
        assert (ROOT / module.replace(".", "/") / "__main__.py").is_file(), name
        if name == "operator":
            assert svc["chart"] == "operator" and "operator" in values
            continue
        assert svc["chart"] == f"stages.{name}", name
        assert module == f"services.{name}", name
        assert name in values["stages"], f"charts/sluice/values.yaml has no stages.{name}"
        assert name in allowed, f"values.schema.json does not accept stage {name!r}"


@needs_helm
def test_tilt_render_deploys_what_tilt_builds_and_forwards(tilt: dict[str, Any]) -> None:
    """helm renders the chart with exactly the values the Tiltfile passes: every resource
    Tilt names exists, runs the image Tilt builds, listens on the forwarded ports, and the
    operator's pod leaves the command to the restart wrapper."""
    ((_, kwargs),) = tilt["calls"]["helm"]
    assert kwargs["name"] == "sluice" and not kwargs["values"]
    objs = _render(*kwargs["set"], namespace=kwargs["namespace"])
    services = tilt["SERVICES"]
    workloads = {n: o for (k, n), o in objs.items() if k in ("Deployment", "Job")}
    for rargs, rkwargs in tilt["calls"]["k8s_resource"]:
        assert rargs[0] in workloads, rargs[0]
        pod = workloads[rargs[0]]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        image = container["image"].rsplit(":", 1)[0]
        name = rkwargs["new_name"]
        if name == "topics":
            assert image in {s["image"] for s in services.values()}  # one Tilt builds
            continue
        assert image == services[name]["image"], name
        assert container["securityContext"]["readOnlyRootFilesystem"] is False
        ports = {p["containerPort"] for p in container["ports"]}
        assert {a[1] for _, a, _ in rkwargs["port_forwards"]} <= ports, name
        if name == "operator":
            assert "command" not in container  # the image entrypoint: the restart wrapper
        else:
            assert "command" not in container and container["args"][0] == "all"
    config = yaml.safe_load(objs[("ConfigMap", "sluice-density")]["data"]["config.yaml"])
    assert config["mode"] == "online"  # runs without an object store in dev


# -- values.yaml and its schema ------------------------------------------------------------


def test_schema_is_valid_draft7() -> None:
    jsonschema.Draft7Validator.check_schema(_schema())


def test_values_validate_against_schema() -> None:
    jsonschema.Draft7Validator(_schema()).validate(_values())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("stages", "scoring", "mode"), "batch"),
        (("stages", "scoring", "replica"), 2),  # typo
        (("stages", "scoring", "gpus"), -1),
        (("stages", "scoring", "topics", "input"), "has space"),
        (("stages", "scoring", "image", "pullPolicy"), "Sometimes"),
        (("stages", "training"), {}),  # no such service in the image
        (("stages", "density", "gpuResource"), "gpu"),  # not an extended resource name
        (("stages", "synth", "alerts", "retention", "min"), -0.1),
        (("s3", "accessKey"), "AKIA..."),  # credentials only by Secret reference
        (("prometheusRule", "alertLabels"), {"severity": "page"}),  # the chart sets it
        (("prometheusRule", "stageDown", "for"), "5 minutes"),
        (("networkPolicy", "egress", "kafka", "ports"), [0]),
        (("podDisruptionBudget", "maxUnavailable"), "150%"),
        (("kafka", "bootstrapServers"), "kafka"),  # no port
        (("stages", "scoring", "resources", "limits", "memory"), "lots"),
    ],
)
def test_schema_rejects(path: tuple[str, ...], value: Any) -> None:
    values = copy.deepcopy(_values())
    node = values
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(_schema()).validate(values)


def test_every_value_is_documented() -> None:
    """Each leaf value has a `# --` comment block above it or above one of its parents."""
    key_re = re.compile(r"^(\s*)([\w.\-/]+):(.*)$")
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    comment: list[str] = []
    missing = []
    for lineno, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        m = key_re.match(line)
        if not m:
            comment = []
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).split(" #")[0].strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = any(c.startswith("# --") for c in comment) or any(d for _, d in stack)
        if rest and not documented:
            missing.append(f"values.yaml:{lineno}: {key}")
        stack.append((indent, documented))
        comment = []
    assert not missing, "undocumented values:\n" + "\n".join(missing)


# -- Chart.yaml ----------------------------------------------------------------------------


def test_dashboard_json_is_built_from_its_script() -> None:
    """The shipped dashboard is what scripts/build_dashboard.py writes: a panel added there
    (and tested against Prometheus) without regenerating the JSON would never reach Grafana."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def test_chart_yaml() -> None:
    chart = _load_yaml(CHART / "Chart.yaml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "sluice"
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"] == "0.1.0" == project["version"]
    assert chart["description"]
    for template in (
        "_helpers.tpl",
        "deployment.yaml",
        "service.yaml",
        "configmap.yaml",
        "NOTES.txt",
    ):
        assert (CHART / "templates" / template).is_file(), template


# -- rendered manifests (needs helm) ---------------------------------------------------------


def _render(*set_values: str, namespace: str = "curation") -> dict[tuple[str, str], dict[str, Any]]:
    cmd = [str(tool("helm")), "template", "sluice", str(CHART), "--namespace", namespace]
    for s in set_values:
        cmd += ["--set", s]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@needs_helm
def test_rendered_deployment_is_restricted_and_probed() -> None:
    objs = _render()
    assert set(objs) == {
        ("ConfigMap", "sluice-scoring"),
        ("Service", "sluice-scoring"),
        ("Deployment", "sluice-scoring"),
        ("Job", "sluice-topics"),
        ("NetworkPolicy", "sluice-scoring"),
        ("NetworkPolicy", "sluice-topics"),
    }
    deploy = objs[("Deployment", "sluice-scoring")]
    assert deploy["metadata"]["namespace"] == "curation"
    pod = deploy["spec"]["template"]["spec"]
    assert (
        deploy["spec"]["selector"]["matchLabels"].items()
        <= deploy["spec"]["template"]["metadata"]["labels"].items()
    )

    # Restricted Pod Security Standard.
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not any("hostPath" in v for v in pod["volumes"])

    # Native gRPC health probes on the service port; metrics port named for scraping.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}, probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9100}

    # The config file is mounted where --config points; the writable paths are volumes.
    assert container["args"] == ["all", "--config", "/etc/sluice/config.yaml"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert mounts["/etc/sluice"] == "config"
    assert {"/tmp", env["HOME"], env["XDG_CACHE_HOME"]} <= set(mounts)
    assert env["SLUICE_SERVICE"] == "scoring"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "sluice-scoring"

    service = objs[("Service", "sluice-scoring")]
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports


@needs_helm
def test_rendered_config_is_accepted_by_the_service(tmp_path: Path) -> None:
    from services.runtime.settings import load_settings
    from services.scoring.settings import ScoringSettings

    objs = _render(
        "kafka.bootstrapServers=b1:9092\\,b2:9092",
        "stages.scoring.config.kafka.max_poll_records=2",
        "stages.scoring.config.grpc.port=1",
    )  # chart-owned: overridden
    path = tmp_path / "config.yaml"
    path.write_text(objs[("ConfigMap", "sluice-scoring")]["data"]["config.yaml"])
    settings = load_settings(ScoringSettings, path)
    assert settings.kafka.bootstrap_servers == "b1:9092,b2:9092"
    assert settings.kafka.input_topic == "sluice.ingest"
    assert settings.kafka.output_topic == "sluice.scored"
    assert settings.kafka.group_id == "sluice-scoring"
    assert settings.kafka.max_poll_records == 2
    assert (settings.grpc.port, settings.metrics.port) == (50051, 9100)


@needs_helm
def test_rendered_worker_mode_and_gpu() -> None:
    objs = _render(
        "stages.scoring.mode=worker",
        "stages.scoring.gpus=1",
        "stages.scoring.modelCache.existingClaim=models",
    )
    pod = objs[("Deployment", "sluice-scoring")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # No gRPC server in worker mode: probed over the metrics endpoint instead.
    assert [p["name"] for p in container["ports"]] == ["metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics", probe
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "models"
    service = objs[("Service", "sluice-scoring")]
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]


@needs_helm
def test_helm_enforces_the_schema() -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        _render("stages.scoring.mode=batch")
    assert "mode" in err.value.stderr


@needs_helm
def test_helm_lint_passes() -> None:
    out = subprocess.run(
        [str(tool("helm")), "lint", "--strict", str(CHART)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@needs_helm
@pytest.mark.parametrize(
    "values",
    [
        (),
        ("stages.scoring.gpus=1", "stages.scoring.mode=worker", "stages.scoring.replicas=3"),
    ],
    ids=["default", "gpu-worker"],
)
def test_rendered_manifests_validate_strictly(values: tuple[str, ...]) -> None:
    """Every rendered object against the offline Kubernetes 1.33 schemas, unknown fields
    rejected (custom resources excepted: their schema is the chart's own CRD)."""
    import kubernetes_validate

    objs = _render(*values)
    assert objs
    for obj in objs.values():
        if "." in obj["apiVersion"].split("/")[0] and not obj["apiVersion"].startswith(
            ("apps/", "rbac.authorization.k8s.io/", "policy/", "networking.k8s.io/", "batch/")
        ):
            continue  # a custom resource (e.g. ServiceMonitor): no upstream schema
        kubernetes_validate.validate(obj, "1.33.0", strict=True)
