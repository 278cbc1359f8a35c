"""Content-addressed task caching for Prefect 3.

A task's cache key is the hash of (its own source, the source of the ``cxr`` modules it runs, its
parameters, and the *content* digest of its input files): a rerun with nothing changed is a cache
hit; a change to any byte of an input, a parameter or the code is a miss. Results are small
dicts of paths and hashes, persisted so later runs can reuse them. Before a cached result is
trusted, the files it names are re-hashed: a deleted or edited output forces the task to run.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.utilities.hashing import hash_objects

from cxr.provenance.hashing import hash_tree, sha256_file

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def digest_path(path: str | Path) -> str:
    """sha256 of a file, tree digest of a folder, 'missing' when absent."""
    path = Path(path)
    if path.is_dir():
        return "tree:" + hash_tree(path)
    if path.is_file():
        return sha256_file(path)
    return "missing"


def _task_source_digest(fn: Any) -> str:
    """Digest of the file that defines the task (``inspect.getsource`` fails in flows that a
    Prefect runner loads from an entrypoint, so the module file is hashed instead)."""
    module = sys.modules.get(fn.__module__)
    path = getattr(module, "__file__", None) or inspect.getsourcefile(fn)
    if path and Path(path).is_file():
        return sha256_file(path)
    return hashlib.sha256(fn.__code__.co_code).hexdigest()


def _digest_any(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [digest_path(v) for v in value]
    return digest_path(value)


@dataclass
class ContentPolicy(CachePolicy):
    """Cache key over task source, named code files, inputs, and the content of path inputs."""

    code: tuple[str, ...] = ()
    path_inputs: tuple[str, ...] = ()
    exclude: tuple[str, ...] = field(default_factory=tuple)

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        key: dict[str, Any] = {
            "task": _task_source_digest(task_ctx.task.fn),
            "code": {c: sha256_file(REPO_ROOT / c) for c in self.code},
            "inputs": {k: v for k, v in sorted(inputs.items()) if k not in self.exclude},
            "content": {k: _digest_any(inputs[k]) for k in self.path_inputs if inputs.get(k)},
        }
        return hash_objects(key, raise_on_failure=True)


def outputs_intact(result: Any) -> bool:
    """True when every ``<name>`` path in a result dict still has its ``<name>_sha256``."""
    if not isinstance(result, dict):
        return False
    for name, value in result.items():
        expected = result.get(f"{name}_sha256")
        if expected is None or not isinstance(value, str):
            continue
        actual = digest_path(value)
        if actual.removeprefix("tree:") != expected:
            log.warning("cached output %s changed or vanished: rerunning its task", value)
            return False
    return True
