"""``manifest.csv`` and ``splits.csv`` as one pair: each split file names the manifest it was cut from.

``prepare`` writes both files, and the report, in one commit (temporary files first, then the
renames, rolled back if one fails). A process killed between two renames can still leave a new
manifest beside old splits, so ``splits.csv`` carries a ``manifest_sha256`` column (the sha256 of
the ``manifest.csv`` bytes written with it, the same value on every row) and readers of the pair call
:func:`check_pair`, which refuses a split file whose manifest has changed under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cxr.errors import DataError
from cxr.provenance.hashing import sha256_file
from cxr.safe_text import printable

if TYPE_CHECKING:
    import pandas as pd

PAIR_COLUMN = "manifest_sha256"
MANIFEST_NAME = "manifest.csv"


def check_pair(splits_csv: str | Path, frame: pd.DataFrame) -> None:
    """Refuse ``splits.csv`` when the ``manifest.csv`` beside it is not the one it was cut from.

    A split file without the column (written by hand, or before the check existed) or without a
    manifest beside it is accepted as it is: there is no pair to compare.

    Args:
        splits_csv: the split file.
        frame: its rows as read (a pandas DataFrame).

    Raises:
        DataError: the manifest's sha256 differs from the one the split file names (one line, naming
            both files and the fix: rerun ``cxr prepare``).
    """
    splits_csv = Path(splits_csv)
    manifest = splits_csv.with_name(MANIFEST_NAME)
    if PAIR_COLUMN not in frame.columns or frame.empty or not manifest.is_file():
        return
    claimed = {str(v) for v in frame[PAIR_COLUMN].unique()}
    actual = sha256_file(manifest)
    if claimed != {actual}:
        raise DataError(
            f"{printable(splits_csv)} was cut from another {MANIFEST_NAME} than {printable(manifest)} "
            f"(sha256 {actual[:12]}; a prepare was interrupted between its writes?): rerun cxr prepare"
        )
