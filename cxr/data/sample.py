"""The embedded demo sample: a few hundred real chest X-rays shipped inside the package.

``cxr/data/sample_data/{NORMAL,PNEUMONIA}/`` is a patient-grouped, stratified subset of the official
Kaggle *train* split at 224 px (built by ``tools/make_sample.py``; composition in its ``README.md``,
every file in ``MANIFEST.csv``), licensed CC BY 4.0 (``LICENSE``). ``data.source: auto`` falls back
to it when no Kaggle credentials are configured, so a fresh machine runs the whole pipeline; models
trained on it are demonstrations, and the fetch record, cards and lineage say so
(``"source": "sample"``, ``"demo_sample": true``).
"""

from __future__ import annotations

import csv
from pathlib import Path

from cxr.errors import DataError
from cxr.provenance.hashing import sha256_file
from cxr.safe_text import printable

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
# The repository-relative folder DVC and the Prefect cache watch (cxr/stages.py: the fetch stage's inputs).
SAMPLE_INPUT = "cxr/data/sample_data"
LICENCE = "CC-BY-4.0"
CITATION = "Kermany, Zhang, Goldbaum (2018), Mendeley Data v2, doi:10.17632/rscbjbr9sj.2"

FALLBACK_WARNING = (
    "data.source=auto: no Kaggle credentials found, so the embedded demo sample is used (a few hundred "
    "images: models trained on it are demonstrations only); for the full data run 'kaggle auth login' or "
    "see docs/data-sources.md 'Kaggle credentials', or set data.source=dir with data.dir in Kaggle layout"
)


def sample_dir() -> Path:
    """The sample's folder, checked to hold both class folders.

    Returns:
        ``cxr/data/sample_data`` of the installed package.

    Raises:
        DataError: the package was installed without its sample (package data left out).
    """
    if not all((SAMPLE_DIR / name).is_dir() for name in ("NORMAL", "PNEUMONIA")):
        raise DataError(
            f"{SAMPLE_DIR}: the embedded demo sample is missing from this installation; reinstall the "
            "package with its data (pip install .) or use data.source=kaggle or data.source=dir"
        )
    return SAMPLE_DIR


def verify_sample(folder: Path = SAMPLE_DIR) -> int:
    """Check the sample's files against its own ``MANIFEST.csv``: none changed, added or missing.

    Returns:
        The number of files checked.

    Raises:
        DataError: one line with the counts and the first file of each kind; the fix is to reinstall.
    """
    manifest = folder / "MANIFEST.csv"
    if not manifest.is_file():
        raise DataError(f"{printable(manifest)}: missing; reinstall the package (pip install .)")
    with manifest.open(encoding="utf-8", newline="") as handle:
        listed = {row["path"]: row["sha256"] for row in csv.DictReader(handle)}
    present = {
        p.relative_to(folder).as_posix()
        for class_name in ("NORMAL", "PNEUMONIA")
        if (folder / class_name).is_dir()
        for p in (folder / class_name).rglob("*")
        if p.is_file() or p.is_symlink()
    }
    missing = sorted(set(listed) - present)
    added = sorted(present - set(listed))
    changed = sorted(
        name
        for name in set(listed) & present
        if (folder / name).is_symlink() or sha256_file(folder / name) != listed[name]
    )
    if missing or added or changed:
        parts = [
            f"{len(found)} {kind} (e.g. {printable(found[0])})"
            for kind, found in (("changed", changed), ("added", added), ("missing", missing))
            if found
        ]
        raise DataError(
            f"{printable(folder)}: the embedded demo sample does not match its MANIFEST.csv: "
            f"{', '.join(parts)}; reinstall the package (pip install .) rather than train on altered files"
        )
    return len(listed)
