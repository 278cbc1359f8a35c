"""Content hashes: the identity of every file and folder the pipeline passes between steps."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from cxr.errors import DataError
from cxr.safe_text import printable

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (flat memory).

    Args:
        path: the file.

    Returns:
        The 64-character lowercase hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def name_bytes(name: str) -> bytes:
    """The bytes of a file name as the file system holds them, for hashing.

    A name that is not valid UTF-8 (say ``b"\\xff.jpeg"``) reaches Python with each bad byte as a
    lone surrogate (``os.fsdecode``); encoding it back with ``surrogateescape`` gives the original
    bytes, so such a name hashes the same on every run and machine instead of failing. Valid names
    give their plain UTF-8 bytes.

    Args:
        name: a relative path or file name, as ``os.listdir`` returns it.

    Returns:
        Its bytes.
    """
    return name.encode("utf-8", errors="surrogateescape")


def tree_digest(entries: Iterable[tuple[str, str]]) -> str:
    """Digest of a folder from ``(relative_path, sha256)`` pairs, independent of listing order.

    The pairs are sorted and hashed as one ``path<TAB>sha256`` line each, so a renamed file changes
    the digest as much as an edited one. Paths are hashed as their file-system bytes
    (:func:`name_bytes`), so a name that is not UTF-8 is hashed, deterministically, too.

    Args:
        entries: ``(relative path, file sha256)`` for every file, in any order.

    Returns:
        The hex sha256 of the sorted lines (the digest of empty input for no entries).
    """
    digest = hashlib.sha256()
    for rel, file_hash in sorted(entries):
        digest.update(name_bytes(rel) + f"\t{file_hash}\n".encode())
    return digest.hexdigest()


def _raise(exc: OSError) -> None:
    raise exc


def regular_files(root: Path) -> list[Path]:
    """Every regular file below ``root``, without following or listing symbolic links.

    Args:
        root: the folder to walk.

    Returns:
        The files (hidden ones included), sorted; links, sockets, FIFOs and devices are left out.

    Raises:
        OSError: a folder below ``root`` cannot be listed (no file is silently left out).
    """
    found = []
    for dirpath, _, filenames in os.walk(root, onerror=_raise):
        for name in filenames:
            path = Path(dirpath, name)
            if stat.S_ISREG(path.lstat().st_mode):
                found.append(path)
    return sorted(found)


def hash_tree(root: str | Path) -> str:
    """Content digest of every regular file below ``root`` (paths relative, '/'-separated).

    Symbolic links (to files or folders) and special files are left out, hidden files are not. The
    digest is :func:`tree_digest` of the files' paths and sha256s, so it is the same on any machine
    and any checkout location.

    Args:
        root: the folder to hash.

    Returns:
        The folder's hex digest; an empty folder gives the digest of no entries.

    Raises:
        DataError: ``root`` is missing or not a folder (hashing it as empty would claim content
            that is not there).
        OSError: a file or folder below ``root`` cannot be read.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{printable(root)}: not a folder, nothing to hash (check the path, or run the step that writes it)"
        )
    return tree_digest((p.relative_to(root).as_posix(), sha256_file(p)) for p in regular_files(root))
