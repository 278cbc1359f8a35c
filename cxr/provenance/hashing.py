"""Content hashes: the identity of every file and folder the pipeline passes between steps."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (flat memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(entries: Iterable[tuple[str, str]]) -> str:
    """Digest of a folder from ``(relative_path, sha256)`` pairs, independent of listing order."""
    digest = hashlib.sha256()
    for rel, file_hash in sorted(entries):
        digest.update(f"{rel}\t{file_hash}\n".encode())
    return digest.hexdigest()


def hash_tree(root: str | Path) -> str:
    """Content digest of every regular file below ``root`` (paths relative, '/'-separated)."""
    root = Path(root)
    pairs = [
        (p.relative_to(root).as_posix(), sha256_file(p)) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
    ]
    return tree_digest(pairs)
