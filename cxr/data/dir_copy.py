"""Copy a local folder in Kaggle layout into the staged ``data/raw``, refusing what must not travel.

The folder is read, never written. What is copied, and what is left out (each with one log line and
an entry ``{"path", "reason"}`` in ``fetch.json``'s ``skipped`` list):

- regular files are copied by content. The copy's group and other permission bits are never wider
  than the source's (a 640 file stays 640, the umask applies too); the owner, the user running the
  pipeline, gets read and write on its own copy so later runs and DVC can replace it;
- a symbolic link to a regular file is followed only when its target lies inside the dataset folder
  (the folder holding the class or split folders, with links above it resolved). A link whose target
  leaves it (``NORMAL/shadow.jpeg → /etc/shadow``), a broken link and a link loop are left out;
- links to folders are never followed below a class folder (no cycles, no second copy of the data); a
  class folder that is itself a link is used when its target lies inside the dataset folder;
- sockets, FIFOs and devices are left out;
- a name that is not valid UTF-8 (``b"\\xff.jpeg"``) is left out: later steps, CSV and JSON files and
  DVC all need text names. The record shows it with its bad bytes escaped (``\\xff.jpeg``);
- hidden files and folders (``.DS_Store``) are never data and are left out silently, as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

from cxr.data.kaggle_layout import ClassFolder, find_class_folders
from cxr.safe_text import is_utf8, printable

log = logging.getLogger(__name__)

OUTSIDE_LINK = "symbolic link to a file outside the source folder: not copied"
FOLDER_LINK = "symbolic link to a folder: links to folders are not followed"
OUTSIDE_FOLDER = "class folder is a symbolic link to outside the source folder: not copied"
BROKEN_LINK = "broken symbolic link (or a link loop)"
NOT_REGULAR = "not a regular file (socket, FIFO or device)"
NOT_UTF8 = "file name is not valid UTF-8: rename it"


def _dest(raw: Path, folder: ClassFolder) -> Path:
    return raw / folder.split / folder.class_name if folder.split else raw / folder.class_name


def _dataset_root(folder: ClassFolder) -> Path:
    return folder.path.parent if folder.split is None else folder.path.parent.parent


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _raise(exc: OSError) -> None:
    raise exc


def _copy_file(path: Path, target: Path, base: Path) -> str | None:
    """Copy ``path`` to ``target`` (a new file); the reason it was left out instead, if any."""
    info = path.lstat()
    source = path
    if stat.S_ISLNK(info.st_mode):
        try:
            source = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return BROKEN_LINK
        if not _inside(source, base):
            return OUTSIDE_LINK
        info = source.stat()
    if not stat.S_ISREG(info.st_mode):
        return NOT_REGULAR
    # O_NOFOLLOW: a file swapped for a link since it was checked is not opened; O_NONBLOCK: nor a FIFO waited on
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            return NOT_REGULAR
        mode = stat.S_IRUSR | stat.S_IWUSR | (info.st_mode & 0o066)  # group/other: never wider than the source
        target.parent.mkdir(parents=True, exist_ok=True)
        out_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with open(out_fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return None


def copy_dataset_folder(src: str | Path, raw: str | Path) -> list[dict[str, str]]:
    """Copy the class folders of ``src`` (Kaggle layout) into ``raw``, file by file.

    Args:
        src: the dataset folder (``data.dir``); read, never written.
        raw: the staged tree to fill: ``[<split>/]<CLASS>/...``.

    Returns:
        The entries left out, ``{"path": <path below src, escaped>, "reason": ...}``, in listing order;
        each was also logged as one warning line.

    Raises:
        DataError: ``src`` is not a folder in Kaggle layout.
        OSError: a folder or file cannot be read, or the copy cannot be written.
    """
    src, raw = Path(src), Path(raw)
    folders = find_class_folders(src)
    base = _dataset_root(folders[0]).resolve()
    skipped: list[dict[str, str]] = []

    def skip(path: Path, reason: str) -> None:
        shown = printable(os.path.relpath(path, src))
        skipped.append({"path": shown, "reason": reason})
        log.warning("skipped %s: %s", shown, reason)

    for folder in folders:
        if not _inside(folder.path.resolve(), base):
            skip(folder.path, OUTSIDE_FOLDER)
            continue
        target_root = _dest(raw, folder)
        target_root.mkdir(parents=True, exist_ok=True)
        for dirpath, dirnames, filenames in os.walk(folder.path, onerror=_raise):
            here = Path(dirpath)
            for name in sorted(dirnames):
                if name.startswith(".") or os.path.islink(here / name):
                    dirnames.remove(name)
                    if not name.startswith("."):
                        skip(here / name, FOLDER_LINK)
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = here / name
                rel = path.relative_to(folder.path)
                reason = NOT_UTF8 if not is_utf8(str(rel)) else _copy_file(path, target_root / rel, base)
                if reason:
                    skip(path, reason)
    return skipped
