"""Rendering charts/sluice with the pinned helm binary, for the chart tests.

`make install` puts helm (scripts/install_helm.py), promtool and prometheus
(scripts/install_prometheus.sh) next to the venv's python; $HELM / $PROMTOOL or PATH are the
fallbacks. Tests that need a binary skip with a reason when it is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.runtime.registry import KINDS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sluice"
GPU_VALUES = CHART / "ci" / "gpu-values.yaml"
RELEASE = "sluice"
NAMESPACE = "curation"

# Every service the chart can run: the registry's kinds (values.schema.json's allowed stage
# names, checked equal by tests/unit/runtime/test_registry.py).
STAGES = KINDS


def tool(name: str) -> str | None:
    """A pinned binary beside the venv's python, else $<NAME>, else PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    return os.environ.get(name.upper()) or shutil.which(name)


needs_helm = pytest.mark.skipif(
    tool("helm") is None, reason="helm not found (make install, $HELM or PATH)"
)
needs_promtool = pytest.mark.skipif(
    tool("promtool") is None, reason="promtool not found (make install, $PROMTOOL or PATH)"
)

# (kind, name): the name alone for objects in the release namespace, else "<namespace>/<name>".
Key = tuple[str, str]


def render_docs(*set_values: str, values_files: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """`helm template` of the chart as parsed objects (hooks included, NOTES excluded)."""
    cmd = [str(tool("helm")), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for f in values_files:
        cmd += ["--values", str(f)]
    for s in set_values:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode:  # helm's own message, not the subprocess call, in the test report
        raise HelmError(out.returncode, cmd, out.stdout, out.stderr)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


class HelmError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"helm exited {self.returncode}: {self.stderr.strip()}"


def render(*set_values: str, values_files: tuple[Path, ...] = ()) -> dict[Key, dict[str, Any]]:
    """Rendered objects by Key; a repeated key is an error (names must be unique)."""
    objs: dict[Key, dict[str, Any]] = {}
    for d in render_docs(*set_values, values_files=values_files):
        meta = d["metadata"]
        ns = meta.get("namespace", NAMESPACE)
        key = (d["kind"], meta["name"] if ns == NAMESPACE else f"{ns}/{meta['name']}")
        assert key not in objs, f"rendered twice: {key}"
        objs[key] = d
    return objs


def pod_specs(objs: dict[Key, dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """The pod spec of every workload (Deployment, Job) among the rendered objects."""
    return {
        k: o["spec"]["template"]["spec"]
        for k, o in objs.items()
        if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")
    }
