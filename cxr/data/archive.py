"""Safe, bounded zip extraction.

Every entry is checked before anything is written. Refused, with one line naming the entry:
absolute paths, ``..`` components, links and special files, names the file system cannot hold
(a component over 255 bytes, a NUL), an entry that is both a file and the folder of another entry
(``a`` and ``a/b.jpeg``) or appears twice, encrypted entries, compression methods Python cannot
read, and any entry over 1 MiB that expands more than ``max_ratio`` times (a zip bomb: a 255 KB
archive unpacking 256 MiB). The file count and the total uncompressed size are capped too, on the
sizes the archive declares and again on the bytes actually written. macOS resource forks, hidden
entries and the Kaggle archive's nested duplicate (``chest_xray/chest_xray/``) are skipped.

An entry without file-type bits in its Unix mode (what Python's own ``zipfile`` writes) is a regular
file. The caller extracts into a temporary folder and renames it into place only when this returns,
so an interrupted or refused run never leaves a half dataset.
"""

from __future__ import annotations

import logging
import lzma
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cxr.errors import FetchError
from cxr.safe_text import printable

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
NAME_MAX = 255  # bytes per path component (ext4, xfs, btrfs, APFS)
PATH_MAX = 4000  # bytes of a whole entry name (Linux: 4096 with the destination)
RATIO_MIN_BYTES = 1 << 20  # the ratio guard applies to entries larger than this
_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}
# what a damaged member raises while it is read (bzip2 reports bad data as OSError)
_CORRUPT = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError)


@dataclass(frozen=True)
class ExtractLimits:
    max_files: int = 100_000
    max_bytes: int = 20 * 1024**3  # the real Kaggle archive unpacks to ~1.2 GB
    max_ratio: float = 200.0  # uncompressed / compressed, per entry over RATIO_MIN_BYTES; JPEGs are ~1:1


@dataclass(frozen=True)
class ExtractResult:
    files: int
    bytes: int
    skipped: int


def _shown(name: str) -> str:
    text = printable(name)
    return text if len(text) <= 80 else f"{text[:60]}…({len(text)} characters)"


def _safe_parts(name: str, archive: Path) -> tuple[str, ...]:
    shown = _shown(name)
    if "\0" in name:
        raise FetchError(f"unsafe archive {archive.name}: entry {shown!r} has a NUL byte in its name")
    if "\\" in name:
        name = name.replace("\\", "/")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise FetchError(f"unsafe archive {archive.name}: entry {shown!r} has an absolute path")
    if ".." in path.parts:
        raise FetchError(f"unsafe archive {archive.name}: entry {shown!r} escapes with '..'")
    parts = tuple(p for p in path.parts if p not in ("", "."))
    longest = max((len(p.encode()) for p in parts), default=0)
    if longest > NAME_MAX or len(name.encode()) > PATH_MAX:
        raise FetchError(
            f"archive {archive.name}: entry {shown!r} has a name too long for the file system "
            f"({longest} bytes in one component, the limit is {NAME_MAX}): rename it in the archive"
        )
    return parts


def _is_link_or_special(info: zipfile.ZipInfo) -> bool:
    """A link, device, FIFO or socket by its Unix mode; no file-type bits at all means a plain file."""
    kind = stat.S_IFMT(info.external_attr >> 16)
    return kind not in (0, stat.S_IFREG, stat.S_IFDIR)


def _skip(parts: tuple[str, ...]) -> bool:
    if not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return True  # resource forks and hidden files (.DS_Store, ._*) are never data
    # Kaggle's chest-xray archive ships chest_xray/chest_xray/{train,val,test} as a duplicate.
    return len(parts) >= 2 and parts[0] == parts[1]


def _check_readable(info: zipfile.ZipInfo, archive: Path) -> None:
    if info.flag_bits & 0x1:
        raise FetchError(
            f"archive {archive.name}: entry {_shown(info.filename)!r} is encrypted; password-protected "
            "archives are not supported: use an unencrypted copy"
        )
    if info.compress_type not in _METHODS:
        raise FetchError(
            f"archive {archive.name}: entry {_shown(info.filename)!r} uses compression method "
            f"{info.compress_type}, which cannot be read (supported: {', '.join(_METHODS.values())}): "
            "repack the archive with deflate"
        )


def _check_ratio(info: zipfile.ZipInfo, archive: Path, limits: ExtractLimits) -> None:
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > RATIO_MIN_BYTES and ratio > limits.max_ratio:
        raise FetchError(
            f"archive {archive.name}: entry {_shown(info.filename)!r} expands {ratio:.0f}:1 "
            f"({info.compress_size} → {info.file_size} bytes), over the limit of {limits.max_ratio:g}:1 "
            "(data.max_ratio): a zip bomb, or raise data.max_ratio if you trust it"
        )


def _check_layout(
    plan: list[tuple[zipfile.ZipInfo, tuple[str, ...]]], folders: set[tuple[str, ...]], archive: Path
) -> None:
    """Refuse an entry that is a file and another entry's folder, or that appears twice."""
    files: dict[tuple[str, ...], str] = {}
    for info, parts in plan:
        if parts in files:
            raise FetchError(
                f"archive {archive.name}: entry {_shown(info.filename)!r} appears twice: repack the archive"
            )
        files[parts] = info.filename
        folders.update(parts[:i] for i in range(1, len(parts)))
    for parts, name in files.items():
        if parts in folders:
            raise FetchError(
                f"archive {archive.name}: entry {_shown(name)!r} is a file and also the folder of other "
                "entries: repack the archive"
            )


def _plan(
    zf: zipfile.ZipFile, archive: Path, limits: ExtractLimits
) -> tuple[list[tuple[zipfile.ZipInfo, tuple[str, ...]]], int]:
    """The file entries to write with their path parts, and the count of skipped entries; raises if unsafe."""
    plan: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    folders: set[tuple[str, ...]] = set()
    skipped = 0
    for info in zf.infolist():  # validate everything before writing anything
        parts = _safe_parts(info.filename, archive)
        if _is_link_or_special(info):
            raise FetchError(
                f"unsafe archive {archive.name}: entry {_shown(info.filename)!r} is a link or special file"
            )
        if _skip(parts):
            skipped += 1
        elif info.is_dir():
            folders.add(parts)
        else:
            _check_readable(info, archive)
            plan.append((info, parts))
    _check_layout(plan, folders, archive)
    if len(plan) > limits.max_files:
        raise FetchError(
            f"archive {archive.name} holds {len(plan)} files, over the cap of {limits.max_files} (data.max_files)"
        )
    declared = sum(info.file_size for info, _ in plan)
    if declared > limits.max_bytes:
        raise FetchError(
            f"archive {archive.name} unpacks to {declared} bytes, over the cap of {limits.max_bytes} (data.max_bytes)"
        )
    for info, _ in plan:
        _check_ratio(info, archive, limits)
    return plan, skipped


def _write_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive: Path, budget: int) -> int:
    """Write one entry to ``target``; the bytes written, never more than ``budget``."""
    written = 0
    try:
        src = zf.open(info)
    except (NotImplementedError, RuntimeError, *_CORRUPT) as exc:
        raise FetchError(f"archive {archive.name}: entry {_shown(info.filename)!r} cannot be read: {exc}") from exc
    with src, open(target, "wb") as out:
        while True:
            try:
                chunk = src.read(_CHUNK)
            except _CORRUPT as exc:
                raise FetchError(f"archive {archive.name} is corrupt at {_shown(info.filename)!r}: {exc}") from exc
            if not chunk:
                return written
            written += len(chunk)
            if written > budget:
                raise FetchError(
                    f"archive {archive.name} unpacks past the cap of its declared sizes at "
                    f"{_shown(info.filename)!r} (data.max_bytes): refused"
                )
            out.write(chunk)


def safe_extract(archive: str | Path, dest: str | Path, limits: ExtractLimits | None = None) -> ExtractResult:
    """Extract ``archive`` into the (empty or new) folder ``dest``; raise FetchError if unsafe.

    Every entry is checked before anything is written. Directory entries, ``__MACOSX/``, hidden
    entries and the nested duplicate (``a/a/...``) are skipped; the rest keep their paths below
    ``dest``.

    Args:
        archive: the zip file.
        dest: the folder to extract into; created if missing.
        limits: the caps on file count, uncompressed bytes and compression ratio (default
            :class:`ExtractLimits`: 100,000 files, 20 GiB, 200:1).

    Returns:
        The files extracted, the bytes written and the entries skipped.

    Raises:
        FetchError: the file is not a readable zip; an entry has an absolute path, a ``..``
            component, a name the file system cannot hold, is a link or special file, is both a file
            and a folder, appears twice, is encrypted or uses an unreadable compression method; the
            file count, the declared or actual uncompressed size or an entry's compression ratio is
            over its cap; or the archive is corrupt. The message is one line naming the entry.
    """
    archive, dest = Path(archive), Path(dest)
    limits = limits or ExtractLimits()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise FetchError(f"{printable(archive)}: not a readable zip archive ({exc})") from exc
    with zf:
        plan, skipped = _plan(zf, archive, limits)
        dest.mkdir(parents=True, exist_ok=True)
        written = 0
        for info, parts in plan:
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            # never past the entry's declared size (Python checks it too) nor the total cap
            budget = min(info.file_size, limits.max_bytes - written)
            written += _write_entry(zf, info, target, archive, budget)
    log.info("extracted %d files (%d bytes) from %s, skipped %d entries", len(plan), written, archive.name, skipped)
    return ExtractResult(files=len(plan), bytes=written, skipped=skipped)
