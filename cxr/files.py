"""Writing pipeline files so a reader never sees half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename), sorted keys, trailing newline.

    The temporary file ``.<name>.tmp-<pid>`` sits beside ``path``, so the rename stays on one file
    system and a reader sees either the old file or the new one, never half of one.

    Args:
        path: the file to write; its parent folders are created.
        payload: anything ``json.dumps`` accepts; written with 2-space indentation.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_keras(model: Any, path: Path) -> None:
    """Save a Keras model atomically (temp file + rename): a reader never sees half a model.

    Args:
        model: the Keras model; saved with ``model.save`` in the native ``.keras`` format.
        path: the ``.keras`` file to write; its folder must exist.
    """
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)
