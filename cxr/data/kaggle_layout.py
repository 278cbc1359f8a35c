"""Recognise a chest X-ray folder in Kaggle layout.

Accepted: ``{train,val,test}/{NORMAL,PNEUMONIA}/…`` or just ``{NORMAL,PNEUMONIA}/…``, possibly
inside single wrapper folders (``chest_xray/``). Names are matched case-insensitively. The Kaggle
archive's ``__MACOSX/`` resource forks and its nested duplicate ``chest_xray/chest_xray/`` are
ignored, as are hidden entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxr import CLASS_NAMES, SPLITS
from cxr.errors import DataError

IGNORED_DIRS = {"__macosx"}
_MAX_WRAPPER_DEPTH = 3


@dataclass(frozen=True)
class ClassFolder:
    split: str | None  # train / val / test, or None when the source has no splits
    class_name: str  # canonical: NORMAL or PNEUMONIA
    path: Path


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name.lower() not in IGNORED_DIRS
    )


def _class_folders(folder: Path) -> dict[str, Path]:
    wanted = {c.lower(): c for c in CLASS_NAMES}
    return {wanted[p.name.lower()]: p for p in _visible_dirs(folder) if p.name.lower() in wanted}


def find_class_folders(root: str | Path) -> list[ClassFolder]:
    """Return the class folders of a dataset rooted at (or wrapped below) ``root``.

    Class folders directly under ``root`` win over split folders; otherwise a folder holding a
    single visible sub-folder is treated as a wrapper and descended, up to 3 levels.

    Args:
        root: the dataset folder.

    Returns:
        One :class:`ClassFolder` per class folder found: per split in train, val, test order, then
        by class name; ``split`` is None when the classes are not under split folders.

    Raises:
        DataError: ``root`` is not a folder, or no class folders were found; the one-line message
            names what was expected and what was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected a folder in Kaggle layout)")
    folder = root
    for _ in range(_MAX_WRAPPER_DEPTH + 1):
        classes = _class_folders(folder)
        if classes:
            return [ClassFolder(None, name, path) for name, path in sorted(classes.items())]
        split_dirs = {p.name.lower(): p for p in _visible_dirs(folder) if p.name.lower() in SPLITS}
        found = [
            ClassFolder(split, name, path)
            for split in SPLITS
            if split in split_dirs
            for name, path in sorted(_class_folders(split_dirs[split]).items())
        ]
        if found:
            return found
        children = _visible_dirs(folder)
        if len(children) != 1:
            break
        folder = children[0]  # a wrapper such as chest_xray/
    seen = ", ".join(p.name + "/" for p in _visible_dirs(folder)[:8]) or "no sub-folders"
    raise DataError(
        f"{root}: expected class folders NORMAL/ and PNEUMONIA/ (optionally under train/, val/, test/); found {seen}"
    )
