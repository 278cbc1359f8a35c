"""Content hashes: the identity of every file and folder the pipeline passes between steps."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

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


def tree_digest(entries: Iterable[tuple[str, str]]) -> str:
    """Digest of a folder from ``(relative_path, sha256)`` pairs, independent of listing order.

    The pairs are sorted and hashed as one ``path<TAB>sha256`` line each, so a renamed file changes
    the digest as much as an edited one.

    Args:
        entries: ``(relative path, file sha256)`` for every file, in any order.

    Returns:
        The hex sha256 of the sorted lines (the digest of empty input for no entries).
    """
    digest = hashlib.sha256()
    for rel, file_hash in sorted(entries):
        digest.update(f"{rel}\t{file_hash}\n".encode())
    return digest.hexdigest()


def hash_tree(root: str | Path) -> str:
    """Content digest of every regular file below ``root`` (paths relative, '/'-separated).

    Symbolic links are left out, hidden files are not. The digest is :func:`tree_digest` of the
    files' paths and sha256s, so it is the same on any machine and any checkout location.

    Args:
        root: the folder to hash.

    Returns:
        The folder's hex digest; a missing or empty folder gives the digest of no entries.
    """
    root = Path(root)
    pairs = [
        (p.relative_to(root).as_posix(), sha256_file(p)) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
    ]
    return tree_digest(pairs)
