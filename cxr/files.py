"""Writing pipeline files so a reader never sees half of one."""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite number replaced by None, ready for strict JSON.

    JSON has no NaN: ``json.dumps`` writes a bare ``NaN`` that other readers refuse. Mappings,
    lists and tuples are walked; NumPy scalars become plain ``int`` / ``float``; anything else is
    returned unchanged.

    Args:
        obj: a JSON-like value (dicts, lists, numbers, strings, None).

    Returns:
        The same structure with non-finite numbers as None.
    """
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(value) for value in obj]
    if isinstance(obj, bool | str) or obj is None:
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def dumps_json(payload: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(payload)`` with ``allow_nan=False``: never a bare NaN.

    Args:
        payload: a JSON-like value.
        **kwargs: passed to ``json.dumps`` (``indent``, ``sort_keys``...).

    Returns:
        The JSON text.
    """
    return json.dumps(json_safe(payload), allow_nan=False, **kwargs)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write bytes atomically: a temporary file ``.<name>.tmp-<pid>`` beside ``path``, then a rename.

    Args:
        path: the file to write; its parent folders are created.
        data: the bytes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename), sorted keys, trailing newline, never NaN.

    The temporary file ``.<name>.tmp-<pid>`` sits beside ``path``, so the rename stays on one file
    system and a reader sees either the old file or the new one, never half of one; it is removed
    when the write fails (a full disk, say). Non-finite numbers are written as ``null``.

    Args:
        path: the file to write; its parent folders are created.
        payload: anything ``json.dumps`` accepts; written with 2-space indentation.
    """
    write_bytes_atomic(path, (dumps_json(payload, indent=2, sort_keys=True) + "\n").encode())


def save_keras(model: Any, path: Path) -> None:
    """Save a Keras model atomically (temp file + rename): a reader never sees half a model.

    Args:
        model: the Keras model; saved with ``model.save`` in the native ``.keras`` format.
        path: the ``.keras`` file to write; its folder must exist.
    """
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)


def write_csv_rows(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a small CSV table (a header, then ``rows``), ``\\n`` line ends; its folder is created.

    Args:
        path: the file to write.
        header: the column names.
        rows: one sequence of values per row.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
