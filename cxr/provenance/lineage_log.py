"""Lineage: an append-only log of every model the pipeline shipped, and the ``cxr audit`` look-up.

Each healthy training run appends one JSON line to ``lineage/models.jsonl`` (kept in git): the
model file's sha256, the data it saw (raw-data digest, manifest and splits hashes, source and
Kaggle version when known, counts per split and class), the parameters, the code commit, the run
that produced it (Prefect flow run, DVC stage or the CLI) and its validation metrics. ``cxr audit
MODEL_FILE`` starts from the file's bytes alone; a file whose hash is in no record, or whose card
disagrees with its bytes, is reported as unverified.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxr.provenance.hashing import sha256_file
from cxr.workspace import HERE

LINEAGE_LOG = HERE.lineage_log


def current_run() -> dict[str, Any]:
    """Which driver is running us: a Prefect flow run, a DVC stage, or a person at the CLI.

    Read from the environment: ``CXR_PREFECT_FLOW_RUN`` (set by our Prefect tasks) first, then
    DVC's ``DVC_STAGE`` / ``DVC_ROOT``.

    Returns:
        ``{"driver": "prefect", "flow_run_id", "flow_run_name"}``, ``{"driver": "dvc", "stage",
        "lock": "dvc.lock"}`` or ``{"driver": "cli"}``.
    """
    if os.environ.get("CXR_PREFECT_FLOW_RUN"):
        return {
            "driver": "prefect",
            "flow_run_id": os.environ["CXR_PREFECT_FLOW_RUN"],
            "flow_run_name": os.environ.get("CXR_PREFECT_FLOW_RUN_NAME"),
        }
    if os.environ.get("DVC_STAGE") or os.environ.get("DVC_ROOT"):
        return {"driver": "dvc", "stage": os.environ.get("DVC_STAGE"), "lock": "dvc.lock"}
    return {"driver": "cli"}


def data_lineage(
    splits_csv: Path, fetch_record: Path = HERE.fetch_record, quality: Path = HERE.quality
) -> dict[str, Any]:
    """The data a model was trained on, for its card and lineage record.

    Args:
        splits_csv: the split file the model was trained from (hashed here, as read now).
        fetch_record: ``data/fetch.json`` written by the fetch step; a missing one leaves the source
            fields None.
        quality: ``reports/data_quality.json`` written by prepare; a missing one leaves the manifest
            hash, split strategy and counts None.

    Returns:
        ``source``, ``origin``, ``kaggle_version``, ``origin_sha256``, ``raw_sha256`` (the fetched
        tree), ``manifest_sha256``, ``splits_sha256``, ``split_strategy`` and ``counts`` (images per
        split and class of the chosen strategy).
    """
    record = json.loads(fetch_record.read_text()) if fetch_record.is_file() else {}
    report = json.loads(quality.read_text()) if quality.is_file() else {}
    strategy = report.get("split_strategy")
    return {
        "source": record.get("source"),
        "origin": record.get("origin"),
        "kaggle_version": record.get("kaggle_version"),
        "origin_sha256": record.get("origin_sha256"),
        "raw_sha256": record.get("tree_sha256"),
        "manifest_sha256": report.get("manifest_sha256"),
        "splits_sha256": sha256_file(splits_csv),
        "split_strategy": strategy,
        "counts": (report.get("splits", {}).get(strategy, {}) or {}).get("counts"),
    }


def append(entry: Mapping[str, Any], log_path: Path = LINEAGE_LOG) -> None:
    """Append one record as a single write (O_APPEND keeps concurrent writers' lines whole).

    The record is written as one sorted-key JSON line with a ``logged`` UTC timestamp added. If the
    log's last line was left unfinished (a writer died mid-line), ours starts on a fresh line.

    Args:
        entry: the record (model sha256, data lineage, parameters, commit, run, metrics...).
        log_path: the JSON-lines log (``lineage/models.jsonl``); created with its folder if missing.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    line = (
        json.dumps({**entry, "logged": datetime.now(timezone.utc).isoformat(timespec="seconds")}, sort_keys=True) + "\n"
    ).encode()
    fd = os.open(log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a writer died mid-line: start ours on a fresh line
        os.write(fd, line)
    finally:
        os.close(fd)


def records(log_path: Path = LINEAGE_LOG) -> list[dict[str, Any]]:
    """Every readable record of the lineage log, oldest first.

    Args:
        log_path: the JSON-lines log.

    Returns:
        The records; empty when the log does not exist. Torn or unparsable lines are skipped.
    """
    if not log_path.is_file():
        return []
    out = []
    for line in log_path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn line never hides the others
    return out


def audit_model(model_file: str | Path, log_path: Path = LINEAGE_LOG) -> dict[str, Any]:
    """Everything known about a model file, found from its bytes; ``verified`` says if it checks out.

    A model checks out when its sha256 is in a lineage record and its card
    (``<name>.card.json`` beside it) names that same sha256.

    Args:
        model_file: the ``.keras`` file to audit.
        log_path: the lineage log to search.

    Returns:
        ``model_file``, ``sha256``, ``verified``, ``problems`` (one phrase per failed check) and
        ``record``: the latest lineage record with this sha256, or None.
    """
    model_file = Path(model_file)
    digest = sha256_file(model_file)
    matches = [r for r in records(log_path) if r.get("model_sha256") == digest]
    card_file = model_file.with_name(model_file.name.removesuffix(".keras") + ".card.json")
    card = json.loads(card_file.read_text()) if card_file.is_file() else None
    problems = []
    if not matches:
        problems.append("its sha256 matches no lineage record")
    if card is None:
        problems.append("no model card beside it")
    elif card.get("model_sha256") != digest:
        problems.append("its card names another sha256 (file changed after training)")
    return {
        "model_file": str(model_file),
        "sha256": digest,
        "verified": not problems,
        "problems": problems,
        "record": matches[-1] if matches else None,
    }


def models_for_data(prefix: str, log_path: Path = LINEAGE_LOG) -> list[dict[str, Any]]:
    """Records whose raw-data, manifest, splits or origin hash starts with ``prefix``.

    Args:
        prefix: the start of a hex digest (any case), e.g. the 12 characters the logs print.

    Returns:
        The matching records, oldest first: every model trained on that data.
    """
    prefix = prefix.lower()
    keys = ("raw_sha256", "manifest_sha256", "splits_sha256", "origin_sha256")
    return [r for r in records(log_path) if any(str(r.get("data", {}).get(k) or "").startswith(prefix) for k in keys)]
