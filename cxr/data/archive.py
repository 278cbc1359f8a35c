"""Safe, bounded zip extraction.

Refuses entries with absolute paths, ``..`` components or links, caps the total uncompressed
size and the file count (zip-bomb guard, enforced on the bytes actually written, not only on the
sizes the archive declares), and skips macOS resource forks and the Kaggle archive's nested
duplicate (``chest_xray/chest_xray/``). The caller extracts into a temporary folder and renames
it into place only when this returns, so an interrupted run never leaves a half dataset.
"""

from __future__ import annotations

import logging
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cxr.errors import FetchError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ExtractLimits:
    max_files: int = 100_000
    max_bytes: int = 20 * 1024**3  # the real Kaggle archive unpacks to ~1.2 GB


@dataclass(frozen=True)
class ExtractResult:
    files: int
    bytes: int
    skipped: int


def _safe_parts(name: str, archive: Path) -> tuple[str, ...]:
    if "\\" in name:
        name = name.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise FetchError(f"unsafe archive {archive.name}: entry {name!r} has an absolute path")
    if ".." in path.parts:
        raise FetchError(f"unsafe archive {archive.name}: entry {name!r} escapes with '..'")
    return tuple(p for p in path.parts if p not in ("", "."))


def _is_link_or_special(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    if not mode:
        return False
    return stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _skip(parts: tuple[str, ...]) -> bool:
    if not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return True  # resource forks and hidden files (.DS_Store, ._*) are never data
    # Kaggle's chest-xray archive ships chest_xray/chest_xray/{train,val,test} as a duplicate.
    return len(parts) >= 2 and parts[0] == parts[1]


def safe_extract(archive: str | Path, dest: str | Path, limits: ExtractLimits | None = None) -> ExtractResult:
    """Extract ``archive`` into the (empty or new) folder ``dest``; raise FetchError if unsafe.

    Every entry is checked before anything is written. Directory entries, ``__MACOSX/``, hidden
    entries and the nested duplicate (``a/a/...``) are skipped; the rest keep their paths below
    ``dest``.

    Args:
        archive: the zip file.
        dest: the folder to extract into; created if missing.
        limits: the caps on file count and on uncompressed bytes (default :class:`ExtractLimits`:
            100,000 files, 20 GiB).

    Returns:
        The files extracted, the bytes written and the entries skipped.

    Raises:
        FetchError: the file is not a readable zip; an entry has an absolute path, a ``..``
            component or is a link or special file; the file count or the declared or actual
            uncompressed size is over its cap; or the archive is corrupt.
    """
    archive, dest = Path(archive), Path(dest)
    limits = limits or ExtractLimits()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(f"{archive}: not a readable zip archive ({exc})") from exc
    with zf:
        infos = zf.infolist()
        plan: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
        skipped = 0
        for info in infos:  # validate everything before writing anything
            parts = _safe_parts(info.filename, archive)
            if _is_link_or_special(info):
                raise FetchError(f"unsafe archive {archive.name}: entry {info.filename!r} is a link or special file")
            if _skip(parts):
                skipped += 1
                continue
            if not info.is_dir():
                plan.append((info, parts))
        if len(plan) > limits.max_files:
            raise FetchError(
                f"archive {archive.name} holds {len(plan)} files, over the cap of {limits.max_files} (data.max_files)"
            )
        declared = sum(info.file_size for info, _ in plan)
        if declared > limits.max_bytes:
            raise FetchError(
                f"archive {archive.name} unpacks to {declared} bytes, over the cap of "
                f"{limits.max_bytes} (data.max_bytes)"
            )
        written = 0
        for info, parts in plan:
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        if written > limits.max_bytes:
                            raise FetchError(
                                f"archive {archive.name} unpacks past the cap of {limits.max_bytes} "
                                "bytes (its headers understate the sizes): refused"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
                raise FetchError(f"archive {archive.name} is corrupt at {info.filename!r}: {exc}") from exc
    log.info("extracted %d files (%d bytes) from %s, skipped %d entries", len(plan), written, archive.name, skipped)
    return ExtractResult(files=len(plan), bytes=written, skipped=skipped)
