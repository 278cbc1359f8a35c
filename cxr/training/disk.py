"""A full disk during training: check for room before the first epoch, and turn a checkpoint write
that fails mid-run into one line that leaves no partial file behind.

Keras writes its epoch backups and best checkpoint through HDF5 (h5py). When a write fails (no
space, a file-size limit, a quota), HDF5 reports it as an ``OSError`` or a ``RuntimeError`` whose
text spans lines, leaves a half-written ``.h5`` that later reads as a valid file with broken
addresses, and crashes the interpreter at exit while it retries the flush. So: refuse to start
without room for the checkpoints; on a failed write, delete every checkpoint that no longer reads
back whole, close HDF5's open files, and report one line. A complete earlier backup is kept, so
the run resumes from it after space is freed.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
import sys
from pathlib import Path
from types import TracebackType

from cxr.errors import CxrError
from cxr.safe_text import printable

log = logging.getLogger(__name__)


class CheckpointWriteFailed(CxrError):
    """A checkpoint write failed for lack of space. HDF5 may crash while the interpreter exits after
    one, so ``cxr``'s entry point ends the process without the interpreter's teardown (``os._exit``)
    once the line is printed."""


# A checkpoint holds the weights and Adam's two moments (3×); two backups (Keras keeps the previous
# one while it writes the next), the best checkpoint, the shipped model and its stored version.
CHECKPOINT_COPIES = 12
MARGIN_BYTES = 64 * 2**20

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_HDF5_WRITE = re.compile(r"write failed|Unable to (extend|write|flush|create)|File too large|No space left", re.I)


def check_room(folder: Path, weights_bytes: int) -> None:
    """Refuse to train when ``folder``'s file system has no room for the run's checkpoints.

    Raises:
        CxrError: one line naming the folder, the free and the needed space.
    """
    need = CHECKPOINT_COPIES * weights_bytes + MARGIN_BYTES
    target = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    free = shutil.disk_usage(target).free
    if free < need:
        raise CxrError(
            f"{printable(folder)}: {free / 2**20:.0f} MB free, about {need / 2**20:.0f} MB needed for this run's "
            "checkpoints and model; free disk space and rerun (nothing was trained or changed)"
        )


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a file write that failed for lack of space (or a size limit or quota)."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return True
    return isinstance(exc, (OSError, RuntimeError)) and bool(_HDF5_WRITE.search(str(exc)))


def readable_h5(path: Path) -> bool:
    """True when ``path`` is an HDF5 file whose every object reads back (a torn write does not)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            handle.visititems(lambda _name, item: getattr(item, "shape", None))
            return True
    except (OSError, ValueError, RuntimeError, KeyError):
        return False


def discard_torn(backup_dir: Path, best_path: Path) -> list[Path]:
    """Delete the checkpoints a failed write left unreadable; the folder too when none is left.

    Returns:
        The files deleted.
    """
    close_hdf5_files()
    removed = []
    candidates = sorted(backup_dir.glob("*.h5*")) if backup_dir.is_dir() else []
    for path in [*candidates, best_path]:
        if path.is_file() and not (readable_h5(path) if ".h5" in path.name else _readable_keras(path)):
            path.unlink(missing_ok=True)
            removed.append(path)
    if backup_dir.is_dir() and not any(readable_h5(p) for p in backup_dir.glob("*.weights.h5*")):
        shutil.rmtree(backup_dir, ignore_errors=True)
    return removed


def _readable_keras(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def close_hdf5_files() -> None:
    """Close every file HDF5 still holds open: a file whose write failed would otherwise be flushed
    again, and fail again, when the interpreter exits."""
    import h5py

    for ident in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        try:
            while ident.valid:
                ident.close()
        except Exception as exc:  # its last flush fails too: the file is being discarded anyway
            log.debug("closing a failed HDF5 file: %s", printable(str(exc).splitlines()[0][:120] if str(exc) else exc))


def quiet_hdf5_teardown() -> None:
    """Call before training. Objects of a failed file complain when garbage-collected ("Exception ignored in ...
    __dealloc__", a traceback): those go to the debug log, other unraisable errors as before."""
    previous = sys.unraisablehook
    if getattr(previous, "cxr_hdf5", False):
        return

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if "h5py" in repr(getattr(unraisable, "object", "")) or "ref count" in str(unraisable.exc_value):
            log.debug("HDF5 teardown after a failed write: %s", printable(str(unraisable.exc_value).splitlines()[0]))
            return
        previous(unraisable)

    # Cython prints the traceback of an error in __dealloc__ through sys.excepthook, then reports it
    # as unraisable: both hooks pass on everything but these.
    previous_excepthook = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if isinstance(value, RuntimeError) and "decrement id ref count" in str(value):
            log.debug("HDF5 teardown after a failed write: %s", printable(str(value).splitlines()[0]))
            return
        previous_excepthook(kind, value, tb)

    hook.cxr_hdf5 = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    sys.excepthook = excepthook


def failure(exc: BaseException, folder: Path) -> CheckpointWriteFailed:
    """The one-line error for a checkpoint write that failed: where, the system's reason, the fix."""
    return CheckpointWriteFailed(failure_line(exc, folder))


def failure_line(exc: BaseException, folder: Path) -> str:
    """One line for a checkpoint write that failed: where, the system's reason, the fix."""
    text = str(exc)
    found = re.search(r"error message = '([^']+)'", text)
    reason = found.group(1) if found else (getattr(exc, "strerror", None) or text.splitlines()[0][:100])
    return (
        f"{printable(folder)}: writing a training checkpoint failed ({printable(reason)}); free disk space and rerun: "
        "the shipped model is unchanged and the run resumes from its last complete backup, if any"
    )
