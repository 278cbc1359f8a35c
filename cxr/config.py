"""``params.yaml``: the one place every knob is read from (DVC reads the same file)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from cxr.errors import CxrError

DEFAULT_PATH = Path("params.yaml")


def load_params(path: str | Path = DEFAULT_PATH, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read ``params.yaml`` and apply ``key.sub=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise CxrError(f"{path}: not found (run from the repository root or pass --params)") from exc
    except yaml.YAMLError as exc:
        raise CxrError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(params, dict):
        raise CxrError(f"{path}: expected a mapping at the top level")
    return apply_overrides(params, overrides)


def apply_overrides(params: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    result = copy.deepcopy(dict(params))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CxrError(f"override {item!r}: expected key.sub=value")
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CxrError(f"override {item!r}: {part} is not a section")
            node = child
        node[leaf] = _parse_value(raw)
    return result


def _parse_value(raw: str) -> Any:
    """JSON first (``1e-06`` is a number there, a string to YAML 1.1), then YAML (``[a, b]``, ``true``)."""
    if not raw:
        return ""
    try:
        return json.loads(raw)
    except ValueError:
        return yaml.safe_load(raw)


def section(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = params.get(name)
    if not isinstance(value, dict):
        raise CxrError(f"params.yaml: missing section {name!r}")
    return value
