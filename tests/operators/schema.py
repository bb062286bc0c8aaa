"""The SluiceScaler CRD as the tests see it: its openAPIV3Schema, validation with jsonschema
(the API emulator validates nothing), and the API server's defaulting."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_PATH = (
    Path(__file__).resolve().parents[2]
    / "charts"
    / "sluice"
    / "crds"
    / "sluicescalers.sluice.dev.yaml"
)


@cache
def crd() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return doc


def schema() -> dict[str, Any]:
    (version,) = crd()["spec"]["versions"]
    return copy.deepcopy(version["schema"]["openAPIV3Schema"])


def validate(obj: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless ``obj`` is a valid SluiceScaler."""
    jsonschema.Draft7Validator(schema(), format_checker=jsonschema.FormatChecker()).validate(obj)


def with_defaults(node: dict[str, Any], value: Any) -> Any:
    """``value`` with the schema's defaults filled in, as the API server stores it."""
    if isinstance(value, dict) and node.get("type") == "object":
        out = dict(value)
        for key, sub in (node.get("properties") or {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = with_defaults(sub, out[key])
        return out
    if isinstance(value, list) and "items" in node:
        return [with_defaults(node["items"], v) for v in value]
    return value
