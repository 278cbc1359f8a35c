"""Which symbolic links a dataset folder may be made of, and a walk that follows them safely.

Image folders on shared storage, and DVC-tracked folders checked out with ``cache.type: symlink``,
are links: to files in a store, to folders elsewhere. Refusing every link refused those whole
datasets; following every link would copy ``NORMAL/x.jpeg → /etc/shadow``. The rule:

A link (to a file or to a folder) is followed when its target, fully resolved, lies inside an
**allowed root**:

* the dataset folder itself (its real location);
* the DVC cache of the repository that holds the folder (``.dvc/cache``, or the ``cache.dir`` that
  ``.dvc/config`` or ``.dvc/config.local`` sets), found by walking up from the folder;
* a root the user lists in ``data.link_roots``.

Anything else is skipped with its reason: a target outside the roots, a broken link, a link loop,
and a link to a device, FIFO or socket (the reader checks that the target is a regular file).
Folder links are followed with loop protection: a folder already visited (same device and inode)
is not visited again.

DVC's config is read with :mod:`configparser` rather than by importing DVC: the domain package never
imports DVC, and the one key needed (``[cache] dir``) is plain INI.
"""

from __future__ import annotations

import configparser
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cxr.errors import DataError
from cxr.files import SMALL_FILE, read_bounded
from cxr.provenance.hashing import sha256_file, tree_digest
from cxr.safe_text import printable

OUTSIDE_FILE = "symbolic link to a file outside the dataset folder, its DVC cache and data.link_roots"
OUTSIDE_FOLDER = "symbolic link to a folder outside the dataset folder, its DVC cache and data.link_roots"
BROKEN_LINK = "broken symbolic link (or a link loop)"
LOOP = "folder already visited through another link (a loop): not visited twice"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass(frozen=True)
class LinkRoots:
    """The resolved folders inside which a link's target must lie to be followed."""

    roots: tuple[Path, ...]

    def admits(self, target: Path) -> bool:
        """Whether ``target`` (already resolved) lies inside one of the roots."""
        return any(_inside(target, root) for root in self.roots)


def dvc_cache_of(folder: Path) -> Path | None:
    """The DVC cache folder of the repository that holds ``folder``, or None outside any DVC repository."""
    here = Path(os.path.abspath(folder))
    for parent in (here, *here.parents):
        dvc_dir = parent / ".dvc"
        if not dvc_dir.is_dir():
            continue
        cache = dvc_dir / "cache"
        for name in ("config", "config.local"):  # config.local overrides config, as in DVC
            configured = _cache_dir(dvc_dir / name)
            if configured:
                cache = Path(configured) if os.path.isabs(configured) else dvc_dir / configured
        return cache
    return None


def _cache_dir(config_file: Path) -> str | None:
    if not config_file.is_file():
        return None
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        parser.read_string(read_bounded(config_file, "DVC config", SMALL_FILE).decode("utf-8", errors="replace"))
    except configparser.Error:
        return None
    return parser.get("cache", "dir", fallback=None)


def link_roots(dataset: Path, extra: Sequence[str | Path] = ()) -> LinkRoots:
    """The allowed roots of ``dataset``: itself, its repository's DVC cache, and ``extra`` (data.link_roots)."""
    roots = [dataset.resolve()]
    cache = dvc_cache_of(dataset)
    if cache is not None:
        roots.append(cache.resolve())
    roots.extend(Path(p).expanduser().resolve() for p in extra)
    return LinkRoots(tuple(dict.fromkeys(roots)))


def walk_files(folder: Path, roots: LinkRoots) -> Iterator[tuple[Path, str | None]]:
    """Every file below ``folder`` as ``(path, None)``, and what is left out as ``(path, reason)``.

    Paths are as reached through ``folder`` (a file under a followed folder link keeps the link's name
    in its path). Hidden entries are skipped silently; entries come in sorted order. A file link
    whose target is inside the roots is yielded as a file: the reader opens its target and checks it
    is a regular file.
    """
    seen: set[tuple[int, int]] = set()

    def visit(directory: Path) -> Iterator[tuple[Path, str | None]]:
        info = directory.stat()
        key = (info.st_dev, info.st_ino)
        if key in seen:
            yield directory, LOOP
            return
        seen.add(key)
        with os.scandir(directory) as entries:
            listed = sorted(entries, key=lambda e: e.name)
        for entry in listed:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    yield path, BROKEN_LINK
                    continue
                if target.is_dir():
                    if roots.admits(target):
                        yield from visit(path)
                    else:
                        yield path, OUTSIDE_FOLDER
                    continue
                yield path, None if roots.admits(target) else OUTSIDE_FILE
            elif entry.is_dir(follow_symlinks=False):
                yield from visit(path)
            else:
                yield path, None

    yield from visit(folder)


# Hashing only (a cache key): every link is followed, since reading a target to hash it copies nothing.
ANYWHERE = LinkRoots((Path("/"),))


def hash_linked_tree(folder: str | Path, roots: LinkRoots = ANYWHERE) -> str:
    """Content digest of the regular files below ``folder`` as :func:`walk_files` reaches them:
    links inside ``roots`` followed (so a folder checked out by DVC as links hashes like its copy),
    hidden entries and special files left out; relative paths as reached through ``folder``.

    Raises:
        DataError: ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{printable(folder)}: not a folder, nothing to hash")
    entries = []
    for path, reason in walk_files(folder, roots):
        if reason is None and stat.S_ISREG(path.stat().st_mode):
            entries.append((path.relative_to(folder).as_posix(), sha256_file(path)))
    return tree_digest(entries)
