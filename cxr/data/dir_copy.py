"""Copy a local folder in Kaggle layout into the staged ``data/raw``, refusing what must not travel.

The folder is read, never written. What is copied, and what is left out (each with one log line and
an entry ``{"path", "reason"}`` in ``fetch.json``'s ``skipped`` list):

- regular files are copied by content. The copy's group and other permission bits are never wider
  than the source's (a 640 file stays 640, the umask applies too); the owner, the user running the
  pipeline, gets read and write on its own copy so later runs and DVC can replace it;
- a symbolic link, to a file or to a folder (a split or class folder too), is followed only when its
  target lies inside an allowed root: the dataset folder, the DVC cache of the repository that holds
  it, or a folder of ``data.link_roots`` (:mod:`cxr.data.links`). A link whose target leaves them
  (``NORMAL/shadow.jpeg → /etc/shadow``), a broken link and a link loop are left out; a folder reached
  twice through links is copied once;
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
from collections.abc import Sequence
from pathlib import Path

from cxr.data.kaggle_layout import ClassFolder, find_class_folders
from cxr.data.links import BROKEN_LINK, OUTSIDE_FILE, LinkRoots, link_roots, walk_files
from cxr.safe_text import is_utf8, printable

log = logging.getLogger(__name__)

OUTSIDE_CLASS_FOLDER = (
    "class folder is a symbolic link to outside the dataset folder, its DVC cache and data.link_roots: not copied"
)
NOT_REGULAR = "not a regular file (socket, FIFO or device)"
NOT_UTF8 = "file name is not valid UTF-8: rename it"


def _dest(raw: Path, folder: ClassFolder) -> Path:
    return raw / folder.split / folder.class_name if folder.split else raw / folder.class_name


def _dataset_root(folder: ClassFolder) -> Path:
    return folder.path.parent if folder.split is None else folder.path.parent.parent


def _copy_file(path: Path, target: Path, roots: LinkRoots) -> str | None:
    """Copy ``path`` to ``target`` (a new file); the reason it was left out instead, if any."""
    info = path.lstat()
    source = path
    if stat.S_ISLNK(info.st_mode):  # checked again here: the link may have changed since the walk
        try:
            source = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return BROKEN_LINK
        if not roots.admits(source):
            return OUTSIDE_FILE
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


def copy_dataset_folder(
    src: str | Path, raw: str | Path, extra_roots: Sequence[str | Path] = ()
) -> list[dict[str, str]]:
    """Copy the class folders of ``src`` (Kaggle layout) into ``raw``, file by file.

    Args:
        src: the dataset folder (``data.dir``); read, never written.
        raw: the staged tree to fill: ``[<split>/]<CLASS>/...``.
        extra_roots: ``data.link_roots``: folders links may lead into, besides the dataset folder and
            its DVC cache.

    Returns:
        The entries left out, ``{"path": <path below src, escaped>, "reason": ...}``, in listing order;
        each was also logged as one warning line.

    Raises:
        DataError: ``src`` is not a folder in Kaggle layout.
        OSError: a folder or file cannot be read, or the copy cannot be written.
    """
    src, raw = Path(src), Path(raw)
    folders = find_class_folders(src)
    roots = link_roots(_dataset_root(folders[0]), extra_roots)
    skipped: list[dict[str, str]] = []

    def skip(path: Path, reason: str) -> None:
        shown = printable(os.path.relpath(path, src))
        skipped.append({"path": shown, "reason": reason})
        log.warning("skipped %s: %s", shown, reason)

    for folder in folders:
        if not roots.admits(folder.path.resolve()):
            skip(folder.path, OUTSIDE_CLASS_FOLDER)
            continue
        target_root = _dest(raw, folder)
        target_root.mkdir(parents=True, exist_ok=True)
        for path, why in walk_files(folder.path, roots):
            rel = path.relative_to(folder.path)
            reason = why or (NOT_UTF8 if not is_utf8(str(rel)) else _copy_file(path, target_root / rel, roots))
            if reason:
                skip(path, reason)
    return skipped
