"""Model versions by content: every model that was ever trained (shipped or only challenged), kept
with its card, its domain statistics, its reports and the list of images it trained on.

Layout (``registry/`` at the workspace root; DVC tracks ``registry/<name>`` as the train stage's
output, so its files live in DVC's content-addressed cache too)::

    registry/<name>/<id>/<name>.keras        id = the first 12 hex digits of the model's sha256
                         <name>.card.json    the card, byte-identical to the one shipped with it
                         <name>.domain.npz   the content check's statistics (or the "none" file)
                         reports/            history.csv, metrics.json, curves.png, ...
                         data.csv            the images it trained and validated on: path, sha256,
                                             label, split, patient, width, height, mean intensity
    registry/<name>/LATEST                 the id of the newest trained version (the challenger)

The files keep the shipped names, so a version folder loads like ``models/`` (``cxr predict
--model registry/<name>/<id>/<name>.keras``). The shipped model — the *champion* — is the set of
files at ``models/<name>.keras``, ``models/<name>.card.json``, ``models/<name>.domain.npz`` and
``reports/train/<name>/``.
:func:`install` copies a version there (reports and statistics first, the card last: the card is
the commit record, as in training). A version is found by its id or any unique prefix of it.

Why a folder and not GTO or ``dvc artifacts``: GTO versions are git tags on commits, but a
challenger that loses is never committed, and scheduled runs and the Prefect flow need not run in
a git checkout at all. ``dvc artifacts`` names the shipped path (``dvc.yaml`` keeps declaring
them); DVC's cache stores the folder's bytes by content, so keeping every version costs one copy
of each distinct model.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.common.model_card import ModelCard, read_card
from cxr.errors import CxrError
from cxr.files import write_bytes_atomic
from cxr.provenance.hashing import sha256_file
from cxr.safe_text import printable
from cxr.workspace import HERE

log = logging.getLogger(__name__)

ID_LENGTH = 12
DATA_FILE, REPORTS_DIR = "data.csv", "reports"
LATEST = "LATEST"
DOMAIN_SUFFIX = ".domain.npz"


def model_file(name: str) -> str:
    return f"{name}.keras"


def card_file(name: str) -> str:
    return f"{name}.card.json"


def domain_file(name: str) -> str:
    return f"{name}{DOMAIN_SUFFIX}"


_ID = re.compile(r"^[0-9a-f]{4,64}$")


@dataclass(frozen=True)
class Version:
    """One stored model version."""

    name: str
    id: str
    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / model_file(self.name)

    @property
    def card_file(self) -> Path:
        return self.folder / card_file(self.name)

    @property
    def domain(self) -> Path:
        return self.folder / domain_file(self.name)

    @property
    def data(self) -> Path:
        return self.folder / DATA_FILE

    @property
    def reports(self) -> Path:
        return self.folder / REPORTS_DIR

    def card(self) -> ModelCard:
        return read_card(self.card_file)

    @property
    def sha256(self) -> str | None:
        return self.card().model_sha256

    def summary(self) -> dict[str, Any]:
        """What lists and decisions show of a version: id, sha256, creation time, health, validation AUC."""
        card = self.card()
        return {
            "id": self.id,
            "sha256": card.model_sha256,
            "created": card.created,
            "health": card.health.status if card.health else None,
            "val_auc": card.validation.get("auc"),
        }


@dataclass(frozen=True)
class Shipped:
    """Where model ``name``'s champion lives."""

    name: str
    models_dir: Path = HERE.models
    reports_root: Path = HERE.train_reports_root

    @property
    def model(self) -> Path:
        return self.models_dir / f"{self.name}.keras"

    @property
    def card_file(self) -> Path:
        return self.models_dir / f"{self.name}.card.json"

    @property
    def domain(self) -> Path:
        return self.models_dir / f"{self.name}{DOMAIN_SUFFIX}"

    @property
    def reports(self) -> Path:
        return self.reports_root / self.name


def registry_root() -> Path:
    """``registry/`` of the current workspace."""
    return HERE.registry


def add_version(
    name: str,
    model: Path,
    card: Path,
    domain: Path | None,
    reports: Iterable[Path],
    data_rows: Path | None,
    root: Path | None = None,
    move: bool = False,
    latest: bool = True,
) -> Version:
    """Store a trained model as a version (once: the same bytes again reuse their folder); mark it latest.

    The folder is assembled under a temporary name and renamed into place, so a reader never sees
    half of a version.

    Args:
        name: the model name.
        model: the ``.keras`` file; its sha256 gives the id.
        card: its card (must name that sha256).
        domain: its content-check statistics file, if any.
        reports: report files, stored under ``reports/``.
        data_rows: the CSV of images it trained on, if known.
        root: the registry (default ``registry/``).
        move: move the files in rather than copy them (training's own staged files).
        latest: mark it as the newest trained version (False: storing a shipped model after the fact).

    Returns:
        The stored version.
    """
    root = root or registry_root()
    sha = sha256_file(model)
    if read_card(card).model_sha256 != sha:
        raise CxrError(f"{printable(card)} names another model than {printable(model)}; not stored")
    version = Version(name, sha[:ID_LENGTH], root / name / sha[:ID_LENGTH])
    if not version.folder.is_dir():
        staging = root / name / f".tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / REPORTS_DIR).mkdir(parents=True)
        place = shutil.move if move else shutil.copyfile
        place(model, staging / model_file(name))
        place(card, staging / card_file(name))
        if domain is not None and domain.is_file():
            place(domain, staging / domain_file(name))
        for report in reports:
            place(report, staging / REPORTS_DIR / report.name)
        if data_rows is not None and data_rows.is_file():
            place(data_rows, staging / DATA_FILE)
        os.replace(staging, version.folder)
    if latest:
        write_bytes_atomic(root / name / LATEST, (version.id + "\n").encode())
    return version


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    """``name`` if it can be a model name (a folder under ``registry/``), else a one-line error."""
    if not _NAME.match(name) or ".." in name:
        raise CxrError(f"{printable(name)}: not a model name (letters, digits, '_', '-' and '.')")
    return name


def versions(name: str | None = None, root: Path | None = None) -> list[Version]:
    """Stored versions (of ``name``, or of every model), oldest first by their card's creation time."""
    if name:
        check_name(name)
    root = root or registry_root()
    if not root.is_dir():
        return []
    names = [name] if name else sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = []
    for model_name in names:
        folder = root / model_name
        if not folder.is_dir():
            continue
        for sub in folder.iterdir():
            if sub.is_dir() and _ID.match(sub.name) and (sub / card_file(model_name)).is_file():
                found.append(Version(model_name, sub.name, sub))
    return sorted(found, key=_created)


def _created(version: Version) -> tuple[str, str]:
    try:
        created = json.loads(version.card_file.read_text(encoding="utf-8")).get("created") or ""
    except (OSError, ValueError):
        created = ""
    return (str(created), version.id)


def find(ref: str, root: Path | None = None) -> Version:
    """The version whose id starts with ``ref`` (``name/id`` or ``name@id`` narrows to one model).

    Raises:
        CxrError: no version, or several, match.
    """
    name, _, vid = ref.replace("@", "/").rpartition("/")
    vid = vid.lower()
    if not _ID.match(vid):
        raise CxrError(f"{printable(ref)}: give a version id (4 or more hex digits, as `cxr models list` prints)")
    matches = [v for v in versions(name or None, root) if v.id.startswith(vid) or vid.startswith(v.id)]
    if not matches:
        raise CxrError(f"{printable(ref)}: no stored model version has this id (`cxr models list` shows them)")
    if len(matches) > 1:
        raise CxrError(
            f"{printable(ref)}: matches {len(matches)} versions ({', '.join(f'{v.name}/{v.id}' for v in matches)}); "
            "give more digits"
        )
    return matches[0]


def latest(name: str, root: Path | None = None) -> Version | None:
    """The newest trained version of ``name`` (the challenger), or None when none is stored."""
    check_name(name)
    root = root or registry_root()
    marker = root / name / LATEST
    if marker.is_file():
        vid = marker.read_text(encoding="utf-8", errors="replace").strip()
        if _ID.match(vid) and (root / name / vid / card_file(name)).is_file():
            return Version(name, vid, root / name / vid)
    stored = versions(name, root)
    return stored[-1] if stored else None


def shipped_sha256(shipped: Shipped) -> str | None:
    """The sha256 of the champion's model file, or None when nothing is shipped."""
    return sha256_file(shipped.model) if shipped.model.is_file() else None


def champion(shipped: Shipped, root: Path | None = None) -> Version | None:
    """The stored version whose bytes are shipped now; a shipped model not yet stored is stored first.

    Returns None when nothing is shipped. A shipped model whose card names other bytes is refused:
    it cannot be compared, kept or rolled back to.
    """
    sha = shipped_sha256(shipped)
    if sha is None:
        return None
    root = root or registry_root()
    folder = root / shipped.name / sha[:ID_LENGTH]
    if (folder / card_file(shipped.name)).is_file():
        return Version(shipped.name, sha[:ID_LENGTH], folder)
    card = read_card(shipped.card_file)
    if card.model_sha256 != sha:
        raise CxrError(
            f"{printable(shipped.model)}: its bytes differ from its card (sha256 {sha[:12]} vs "
            f"{str(card.model_sha256)[:12]}); restore it (`cxr models rollback {shipped.name}`) before promoting"
        )
    reports = [p for p in sorted(shipped.reports.glob("*")) if p.is_file()] if shipped.reports.is_dir() else []
    # storing the champion does not make it the newest trained version
    version = add_version(
        shipped.name, shipped.model, shipped.card_file, shipped.domain, reports, None, root, latest=False
    )
    log.info("%s: stored the shipped model as version %s (it predates the registry)", shipped.name, version.id)
    return version


def install(version: Version, shipped: Shipped) -> None:
    """Make ``version`` the shipped model: reports and statistics first, the model, the card last.

    Each file is copied beside its destination and renamed into place; report files the version does
    not have are removed, so the shipped reports are exactly the version's.
    """
    if sha256_file(version.model) != version.sha256:
        raise CxrError(f"{printable(version.model)}: its bytes differ from its card; the stored version is damaged")
    shipped.reports.mkdir(parents=True, exist_ok=True)
    shipped.models_dir.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in version.reports.glob("*") if p.is_file()} if version.reports.is_dir() else set()
    for report_name in sorted(names):
        _copy_atomic(version.reports / report_name, shipped.reports / report_name)
    for stale in shipped.reports.glob("*"):
        if stale.is_file() and stale.name not in names and not stale.name.startswith(("promotion", ".")):
            stale.unlink()
    if version.domain.is_file():
        _copy_atomic(version.domain, shipped.domain)
    _copy_atomic(version.model, shipped.model)
    _copy_atomic(version.card_file, shipped.card_file)


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def read_data_rows(version: Version) -> list[dict[str, Any]]:
    """The images a version trained and validated on (empty when not recorded)."""
    if not version.data.is_file():
        return []
    with version.data.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))
