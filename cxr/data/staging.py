"""Put a fetched tree and its record in place together, and clean up after a fetch that was killed.

A fetch builds everything in a scratch folder beside ``data/raw`` (``data/.fetch-XXXX/``): the new
tree (``raw/``) and its record (``fetch.json``), written before anything moves. Then, under the
fetch lock (:mod:`cxr.locks`):

1. the old ``data/fetch.json`` is removed: from here on ``data/raw`` has no record rather than one
   that describes other data;
2. the new tree and ``data/raw`` are swapped in one step (``renameat2(RENAME_EXCHANGE)`` on Linux;
   elsewhere two renames, the old tree set aside as ``data/.raw.old-<pid>`` in between);
3. the new record is renamed to ``data/fetch.json``.

A failure (or Ctrl-C) in steps 2-3 swaps the trees back and puts the old record back, so a refused,
failed or interrupted fetch leaves both as they were.
A process killed between steps leaves a tree without a record, never a record of other data; the
next fetch, under the lock, puts a set-aside ``data/raw`` back if the kill came between the two
renames, and deletes the scratch folders left behind. ``data/fetch.json`` and ``data/raw`` stay
where DVC declares them.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from cxr.files import write_json
from cxr.safe_text import printable

log = logging.getLogger(__name__)

SCRATCH_PREFIX = ".fetch-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _aside_prefix(raw_dir: Path) -> str:
    return f".{raw_dir.name}.old-"


def remove_tree(path: Path) -> None:
    """Delete a scratch folder; a warning line names it if something in it could not be deleted."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.warning("could not delete the scratch folder %s: delete it by hand", printable(path))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # an old kernel or a file system without exchange: two renames instead
    raise OSError(err, os.strerror(err), str(b))


def swap_dir(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``; the previous ``target`` (if any) ends up at ``new``'s path.

    Args:
        new: the complete new folder (in a scratch folder on the same file system).
        target: where it belongs (``data/raw``).
    """
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if _exchange(new, target):
        return
    aside = target.with_name(f"{_aside_prefix(target)}{os.getpid()}")
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    os.rename(aside, new)  # back into the scratch folder, deleted with it


def _put_back(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def install(work: Path, staged: Path, record: dict[str, Any], raw_dir: Path, record_path: Path) -> None:
    """Put ``staged`` at ``raw_dir`` and ``record`` at ``record_path`` together (call under the fetch lock).

    Args:
        work: the scratch folder holding ``staged`` (beside ``raw_dir``); the record is written into it
            first, and the old tree ends up in it (deleted with it).
        staged: the complete new tree.
        record: the fetch record describing ``staged``.
        raw_dir: ``data/raw``.
        record_path: ``data/fetch.json``.
    """
    same_folder = record_path.parent.resolve() == raw_dir.parent.resolve()
    new_record = (
        work / record_path.name if same_folder else record_path.with_name(f".{record_path.name}.tmp-{os.getpid()}")
    )
    try:
        write_json(new_record, record)  # the record exists, complete, before anything moves
        old = record_path.read_bytes() if record_path.is_file() else None
        record_path.unlink(missing_ok=True)
        swapped = False
        try:
            swap_dir(staged, raw_dir)
            swapped = True
            os.replace(new_record, record_path)
        except BaseException:  # a failure or Ctrl-C: the previous tree and record go back
            if swapped and os.path.lexists(staged):
                swap_dir(staged, raw_dir)  # the previous tree is at ``staged`` since the swap
            elif swapped:
                os.rename(raw_dir, staged)  # there was none: take the new one away again
            if old is not None:
                _put_back(record_path, old)
            raise
    finally:
        if not same_folder:
            new_record.unlink(missing_ok=True)


def recover(raw_dir: Path, record_path: Path) -> None:
    """Undo what a killed fetch left behind (call under the fetch lock, before fetching).

    A ``data/raw`` set aside between the two renames of :func:`swap_dir` is put back when ``data/raw``
    is missing; scratch folders (``.fetch-*``), other set-aside trees and temporary records are deleted.

    Args:
        raw_dir: ``data/raw``.
        record_path: ``data/fetch.json``.
    """
    parent = raw_dir.parent
    aside = sorted(parent.glob(_aside_prefix(raw_dir) + "*"), key=lambda p: p.lstat().st_mtime)
    if aside and not os.path.lexists(raw_dir) and aside[-1].is_dir():
        os.rename(aside.pop(), raw_dir)
        log.warning("put back %s, set aside by a fetch that was interrupted", printable(raw_dir))
    stale = [p for p in [*aside, *parent.glob(SCRATCH_PREFIX + "*")] if p.is_dir() and not p.is_symlink()]
    for path in stale:
        remove_tree(path)
    for path in record_path.parent.glob(f".{record_path.name}.tmp-*"):
        path.unlink(missing_ok=True)
        stale.append(path)
    if stale:
        log.info("deleted %d scratch file(s) left by an interrupted fetch", len(stale))
