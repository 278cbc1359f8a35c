"""Content-addressed task caching for Prefect 3, composed from the stage registry.

A task's cache policy is Prefect's own ``INPUTS`` (minus inputs that do not change the result)
plus three content policies: what the file that defines the task computes, the fingerprint of the
code the registry computes for its stage (the same value DVC's ``code`` stage writes for it), and
the content of the task's path inputs (the same data DVC hashes). A rerun with nothing changed is a
cache hit; a change to any byte of an input, a declared setting or a statement of the code is a
miss — the changes that make ``dvc repro`` rerun the stage. A comment, docstring, log line or error
message is not (:mod:`cxr.provenance.code_closure`). Before a cached result is trusted, the files
it names are re-hashed: a deleted or edited output forces the task to run.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from cxr.data.links import hash_linked_tree
from cxr.provenance.code_closure import source_fingerprint
from cxr.provenance.hashing import sha256_file
from cxr.stages import stage

log = logging.getLogger(__name__)


def digest_path(path: str | Path) -> str:
    """sha256 of a file, tree digest of a folder, 'missing' when absent."""
    path = Path(path)
    if path.is_dir():  # links followed: a folder DVC checked out as links keys like its copy
        return "tree:" + hash_linked_tree(path)
    if path.is_file():
        return sha256_file(path)
    return "missing"


def _digest_any(value: str | Path | list[str | Path] | tuple[str | Path, ...]) -> str | list[str]:
    if isinstance(value, list | tuple):
        return [digest_path(v) for v in value]
    return digest_path(value)


@dataclass
class TaskModule(CachePolicy):
    """What the file that defines the task computes (``inspect.getsource`` fails in flows a Prefect
    runner loads from an entrypoint, so the module file is fingerprinted, not the function's source)."""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        fn = task_ctx.task.fn
        module = sys.modules.get(fn.__module__)
        path = getattr(module, "__file__", None) or inspect.getsourcefile(fn)
        if path and Path(path).is_file():
            return hashlib.sha256(source_fingerprint(Path(path))).hexdigest()
        return hashlib.sha256(fn.__code__.co_code).hexdigest()


@dataclass
class StageCode(CachePolicy):
    """What the code a registered stage runs computes (:meth:`cxr.stages.Stage.fingerprint`)."""

    stage: str = ""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        return stage(self.stage).fingerprint()


@dataclass
class PathContent(CachePolicy):
    """Content of the files and folders named by some task inputs (a path or a list of paths)."""

    names: tuple[str, ...] = ()

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        return hash_objects({k: _digest_any(inputs[k]) for k in self.names if inputs.get(k)}, raise_on_failure=True)


def stage_policy(name: str, path_inputs: Sequence[str] = (), ignore: Sequence[str] = ("params_path",)) -> CachePolicy:
    """The cache policy of the task that runs registered stage ``name``.

    Args:
        name: the stage in :mod:`cxr.stages`.
        path_inputs: task inputs naming files or folders whose *content* keys the cache.
        ignore: task inputs that do not change the result (the parameters file's path: the values the
            stage reads arrive as its ``settings`` input).

    Returns:
        ``TaskModule + StageCode + PathContent + (INPUTS - ignored)``.
    """
    inputs: CachePolicy = INPUTS
    for item in ignore:
        inputs = inputs - item
    return TaskModule() + StageCode(stage=name) + PathContent(names=tuple(path_inputs)) + inputs


def outputs_intact(result: object) -> bool:
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
