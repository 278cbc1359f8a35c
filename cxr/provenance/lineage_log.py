"""Lineage: an append-only log of every model the pipeline shipped, and the ``cxr audit`` look-up.

Each healthy training run appends one JSON line to ``lineage/models.jsonl`` (kept in git): the
model file's sha256, the data it saw (raw-data digest, manifest and splits hashes, source and
Kaggle version when known, counts per split and class), the parameters, the code commit, the run
that produced it (Prefect flow run, DVC stage or the CLI) and its validation metrics. ``cxr audit
MODEL_FILE`` starts from the file's bytes alone; a file whose hash is in no record, or whose card
disagrees with its bytes, is reported as unverified.

The log is read defensively: a line that is not UTF-8, not JSON, not a JSON object or not shaped
like a record is skipped with one warning naming the file and line; a card that cannot be read or
parsed makes the model unverified, with the reason.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxr.common.model_card import card_digest, field_differences, parse_card, read_card
from cxr.errors import CxrError
from cxr.files import LOG_FILE, SMALL_FILE, dumps_json, load_json_bounded, parse_json_bounded, read_bounded
from cxr.provenance.hashing import sha256_file
from cxr.safe_text import printable
from cxr.workspace import HERE

log = logging.getLogger(__name__)

LINEAGE_LOG = HERE.lineage_log
MIN_PREFIX = 6  # hex digits of a data hash ``cxr audit --data`` needs (one digit matched a sixteenth of the log)
_OBJECT_FIELDS = ("data", "run", "metrics", "params", "code")


def current_run() -> dict[str, str | None]:
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
        ``source``, ``requested``, ``demo_sample``, ``origin``, ``kaggle_version``, ``origin_sha256``,
        ``raw_sha256`` (the fetched tree), ``manifest_sha256``, ``splits_sha256``, ``split_strategy``
        and ``counts`` (images per split and class of the chosen strategy).
    """
    record = load_json_bounded(fetch_record, "fetch record") if fetch_record.is_file() else {}
    report = load_json_bounded(quality, "data-quality report") if quality.is_file() else {}
    record = record if isinstance(record, dict) else {}
    report = report if isinstance(report, dict) else {}
    strategy = report.get("split_strategy")
    return {
        "source": record.get("source"),
        "requested": record.get("requested"),  # "auto" when the source was resolved (cxr.data.fetch.resolve_source)
        "demo_sample": bool(record.get("demo_sample")),  # the embedded demo sample: the report shows a banner
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
        dumps_json({**entry, "logged": datetime.now(timezone.utc).isoformat(timespec="seconds")}, sort_keys=True) + "\n"
    ).encode()
    fd = os.open(log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a writer died mid-line: start ours on a fresh line
        os.write(fd, line)
    finally:
        os.close(fd)


def shape_problem(record: object) -> str | None:
    """Why a parsed lineage line cannot be used as a record, or None when it can.

    Args:
        record: one parsed JSON line.

    Returns:
        A phrase such as ``"not a JSON object"`` or ``"'data' is not an object"``; None for a record
        with a ``model`` and ``model_sha256`` string whose nested sections are objects.
    """
    if not isinstance(record, dict):
        return f"not a JSON object (a JSON {type(record).__name__})"
    for key in ("model", "model_sha256"):
        if not isinstance(record.get(key), str):
            return f"{key!r} is missing or not a string"
    for key in _OBJECT_FIELDS:
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"{key!r} is not an object"
    nested = {"metrics": "validation", "params": "train"}
    for key, inner in nested.items():
        value = (record.get(key) or {}).get(inner)
        if value is not None and not isinstance(value, dict):
            return f"'{key}.{inner}' is not an object"
    counts = (record.get("data") or {}).get("counts")
    if counts is not None and not (isinstance(counts, dict) and all(isinstance(v, dict) for v in counts.values())):
        return "'data.counts' is not an object of objects"
    return None


def records(log_path: Path = LINEAGE_LOG) -> list[dict[str, Any]]:
    """Every usable record of the lineage log, oldest first; each unusable line skipped with a warning.

    Args:
        log_path: the JSON-lines log.

    Returns:
        The records; empty when the log does not exist. A line that is not UTF-8, not JSON (a torn
        line, say), or not shaped like a record (:func:`shape_problem`) is skipped with one warning
        naming the file and the line number, and never hides the others.
    """
    if not log_path.is_file():
        return []
    out: list[dict[str, Any]] = []
    for number, raw in enumerate(read_bounded(log_path, "lineage log", LOG_FILE).split(b"\n"), start=1):
        if not raw.strip():
            continue
        problem: str | None
        try:
            record = parse_json_bounded(raw.decode("utf-8"), str(log_path))
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except ValueError as exc:
            problem = str(exc) if str(exc).startswith("nested") else "not valid JSON (a torn line?)"
        else:
            problem = shape_problem(record)
        if problem:
            log.warning("%s line %d: skipped, %s", printable(log_path), number, problem)
            continue
        out.append(record)
    return out


def is_event(record: Mapping[str, Any]) -> bool:
    """A promotion, rollback or manual promotion event rather than a training record."""
    return bool(record.get("event"))


def training_records(log_path: Path = LINEAGE_LOG) -> list[dict[str, Any]]:
    """The records of trained models (every version), oldest first."""
    return [r for r in records(log_path) if not is_event(r)]


def events(model: str | None = None, log_path: Path = LINEAGE_LOG) -> list[dict[str, Any]]:
    """Promotion, rollback and manual promotion events (of ``model``, or all), oldest first."""
    return [r for r in records(log_path) if is_event(r) and (model is None or r.get("model") == model)]


def _read_card(card_file: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The card beside a model, or None with the reason it cannot be used."""
    if not card_file.exists():
        return None, "no model card beside it"
    if not card_file.is_file():
        return None, f"its card {printable(card_file)} is not a file"
    try:
        card = parse_json_bounded(read_bounded(card_file, "model card", SMALL_FILE).decode("utf-8"), str(card_file))
    except CxrError as exc:
        return None, f"its card cannot be used ({printable(str(exc).split(': ', 1)[-1])})"
    except UnicodeDecodeError:
        return None, f"its card {printable(card_file)} is not UTF-8 text"
    except ValueError as exc:
        return None, f"its card {printable(card_file)} is not valid JSON ({printable(exc)})"
    if not isinstance(card, dict):
        return None, f"its card {printable(card_file)} is not a JSON object (a JSON {type(card).__name__})"
    if not isinstance(card.get("model_sha256"), str):
        return None, f"its card {printable(card_file)} has no model_sha256 string"
    try:
        parse_card(card, card_file)
    except CxrError as exc:
        return None, f"its card does not follow the model card schema ({printable(str(exc).split(': ', 1)[-1])})"
    return card, None


def card_change(
    card_file: Path, model_sha256: str, log_path: Path = LINEAGE_LOG, known: list[dict[str, Any]] | None = None
) -> str | None:
    """Why the card is not the one recorded when ``model_sha256`` was trained, or None when it is.

    Training records the card's digest (of its canonical JSON) and its decisive fields
    (:func:`decisive_fields`) beside the model's sha256, so a card edited afterwards (a lowered
    threshold, another resize rule, a better AUC) is caught even though it still names the right
    model. A model with no record, or records written before cards were recorded, gives None:
    nothing to compare with (``audit`` reports the missing record on its own).

    Args:
        card_file: the card beside the model.
        model_sha256: the model file's own sha256.
        log_path: the lineage log.
        known: its records, when the caller has read them already (each broken line warns once).

    Returns:
        One phrase naming the fields that differ (or the digest, when no decisive field does), or None.
    """
    recorded = [
        r
        for r in (records(log_path) if known is None else known)
        if r["model_sha256"] == model_sha256 and not is_event(r) and isinstance(r.get("card_digest"), str)
    ]
    if not recorded or not card_file.is_file():
        return None
    try:
        digest = card_digest(card_file)
    except CxrError as exc:
        return f"its card cannot be read ({printable(str(exc).split(': ', 1)[-1])})"
    if any(r["card_digest"] == digest for r in recorded):
        return None
    fields = recorded[-1].get("card_fields")
    differs: list[str] = []
    if isinstance(fields, dict):
        try:
            differs = field_differences(read_card(card_file), fields)
        except CxrError:
            differs = []
    what = "; ".join(differs[:3]) + (f"; and {len(differs) - 3} more" if len(differs) > 3 else "")
    return (
        f"its card differs from the one recorded at training ({what})"
        if differs
        else f"its card's digest {digest[:12]}… is not the one recorded at training {recorded[-1]['card_digest'][:12]}…"
    )


def audit_model(model_file: str | Path, log_path: Path = LINEAGE_LOG) -> dict[str, Any]:
    """Everything known about a model file, found from its bytes; ``verified`` says if it checks out.

    A model checks out when its sha256 is in a lineage record and its card
    (``<name>.card.json`` beside it) names that same sha256.

    Args:
        model_file: the ``.keras`` file to audit.
        log_path: the lineage log to search.

    Returns:
        ``model_file``, ``sha256``, ``verified``, ``problems`` (one phrase per failed check: no
        record, no card, an unreadable or malformed card, a card naming other bytes) and
        ``record``: the latest lineage record with this sha256, or None.

    Raises:
        CxrError: ``model_file`` does not exist or is not a file.
    """
    model_file = Path(model_file)
    if not model_file.exists():
        raise CxrError(f"{printable(model_file)}: no such model file; give the path of a .keras file")
    if not model_file.is_file():
        raise CxrError(f"{printable(model_file)}: not a file; give the path of a .keras model file")
    digest = sha256_file(model_file)
    found = [r for r in records(log_path) if r["model_sha256"] == digest]
    matches = [r for r in found if not is_event(r)]
    card_file = model_file.with_name(model_file.name.removesuffix(".keras") + ".card.json")
    card, card_problem = _read_card(card_file)
    problems = []
    if not matches:
        problems.append("its sha256 matches no lineage record")
    if card_problem:
        problems.append(card_problem)
    elif card is not None and card["model_sha256"] != digest:
        problems.append("its card names another sha256 (file changed after training)")
    elif changed := card_change(card_file, digest, log_path, known=found):
        problems.append(changed)
    return {
        "model_file": str(model_file),
        "sha256": digest,
        "verified": not problems,
        "problems": problems,
        "record": matches[-1] if matches else None,
        "events": [r for r in found if is_event(r)],
    }


def models_for_data(prefix: str, log_path: Path = LINEAGE_LOG) -> list[dict[str, Any]]:
    """Records whose raw-data, manifest, splits or origin hash starts with ``prefix``.

    Args:
        prefix: the start of a hex digest (any case), at least ``MIN_PREFIX`` digits, e.g. the 12
            characters the logs print.

    Returns:
        The matching records, oldest first: every model trained on that data.

    Raises:
        CxrError: ``prefix`` is shorter than ``MIN_PREFIX`` hex digits or not hex.
    """
    if not re.fullmatch(rf"[0-9a-fA-F]{{{MIN_PREFIX},64}}", prefix):
        raise CxrError(
            f"--data {printable(prefix)}: give at least {MIN_PREFIX} hex digits (0-9, a-f) of a data hash, "
            "e.g. the 12 that the logs print"
        )
    prefix = prefix.lower()
    keys = ("raw_sha256", "manifest_sha256", "splits_sha256", "origin_sha256")
    return [
        r
        for r in training_records(log_path)
        if any(str((r.get("data") or {}).get(k) or "").startswith(prefix) for k in keys)
    ]
