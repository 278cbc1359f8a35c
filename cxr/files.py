"""Writing pipeline files so a reader never sees half of one, and reading the small ones with a bound.

Every file the pipeline reads whole (parameters, readers CSV, model cards, the lineage log,
operating points, JSON records) goes through :func:`read_bounded`: only a regular file (a device
such as ``/dev/zero`` or a FIFO would exhaust memory or block forever), and only up to a cap that
the one-line error names. :func:`load_json_bounded` adds a bound on nesting (200,000 ``[`` made
Python's parser raise ``RecursionError``). Hand-written: ``pathlib`` and ``json`` have neither bound.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxr.errors import CxrError
from cxr.safe_text import printable

MB = 1_000_000
SMALL_FILE = 10 * MB  # cards, records, operating points, parameters: a few kB in practice
TABLE_FILE = 500 * MB  # readers CSVs, manifests and split tables: 100 bytes a row
LOG_FILE = 500 * MB  # the lineage log: a few kB a model
MAX_JSON_DEPTH = 64  # cards nest 4 deep


def require_regular(path: str | Path, what: str, cap: int) -> int:
    """Check that ``path`` is a regular file of at most ``cap`` bytes (links followed); its size.

    Raises:
        CxrError: one line naming the file: missing, a folder, a device or FIFO, or over the cap.
    """
    shown = printable(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CxrError(f"{shown}: no such {what}") from None
    except OSError as exc:
        raise CxrError(f"{shown}: cannot read the {what} ({exc.strerror or type(exc).__name__})") from None
    if stat.S_ISDIR(info.st_mode):
        raise CxrError(f"{shown}: is a folder, not a {what} file")
    if not stat.S_ISREG(info.st_mode):
        raise CxrError(f"{shown}: not a regular file (a device, FIFO or socket); give a {what} file")
    if info.st_size > cap:
        raise CxrError(f"{shown}: {info.st_size / MB:.1f} MB, over the {cap / MB:g} MB a {what} may have")
    return info.st_size


def read_bounded(path: str | Path, what: str, cap: int = SMALL_FILE) -> bytes:
    """The bytes of a regular file of at most ``cap`` bytes (:func:`require_regular`), read with that bound."""
    require_regular(path, what, cap)
    try:
        with open(path, "rb") as handle:
            data = handle.read(cap + 1)
    except OSError as exc:
        raise CxrError(f"{printable(path)}: cannot read the {what} ({exc.strerror or type(exc).__name__})") from None
    if len(data) > cap:  # it grew while we read it
        raise CxrError(f"{printable(path)}: over the {cap / MB:g} MB a {what} may have")
    return data


def nesting_depth_over(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when JSON text opens more than ``limit`` arrays or objects at once (strings skipped)."""
    data = text.encode() if isinstance(text, str) else text
    if data.count(b"[") + data.count(b"{") <= limit:  # cannot nest deeper than it opens (cards: ~30)
        return False
    depth, in_string, escaped = 0, False, False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def parse_json_bounded(data: str | bytes, where: str) -> Any:
    """``json.loads`` that refuses nesting deeper than :data:`MAX_JSON_DEPTH` with a ValueError."""
    if nesting_depth_over(data):
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return json.loads(data)


def load_json_bounded(path: str | Path, what: str, cap: int = SMALL_FILE) -> Any:
    """Parsed JSON of a bounded regular file; CxrError naming the file when it is not valid, bounded JSON."""
    data = read_bounded(path, what, cap)
    try:
        return parse_json_bounded(data, str(path))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
        reason = printable(str(exc).splitlines()[0][:80]) if str(exc) else type(exc).__name__
        raise CxrError(f"{printable(path)}: the {what} is not valid JSON ({reason})") from None


def json_safe(obj: object) -> Any:
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


def dumps_json(payload: object, **kwargs: Any) -> str:
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
        # Neither name is written through a link: whatever sits at the temporary name is removed and
        # the file created anew (O_EXCL | O_NOFOLLOW), and the rename replaces a link at ``path``
        # itself, never its target.
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: object) -> None:
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


def write_csv_rows(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
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


def pid_alive(pid: int) -> bool:
    """Whether another process with this id exists (a scratch file of a live run is not stale)."""
    if pid == os.getpid():
        return False  # ours from before (a reused id): nothing of this run exists yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Delete ``folder/<prefix><pid><suffix>`` files and folders whose process is gone.

    Scratch names carry the writer's process id (``.ensemble.tmp-4242``): a killed writer leaves
    one, which the next run deletes here, while a running writer's stays.

    Returns:
        What was deleted.
    """
    removed = []
    for path in folder.glob(f"{prefix}*{suffix}") if folder.is_dir() else []:
        pid = path.name.removeprefix(prefix).removesuffix(suffix)
        if pid.isdigit() and not pid_alive(int(pid)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
