"""What changed in the data between the run that trained the champion and this one.

Both sides are the ``data.csv`` a trained version stores (:mod:`cxr.provenance.model_store`): one
row per image the model trained or validated on, with its path, sha256, label, patient id,
geometry and mean intensity. The report covers counts per class and prevalence; new, removed and
changed files (by path: a path whose sha256 differs is changed); patients; image size; channels
and formats where recorded; mean intensity; decode failures (the prepare step's excluded files);
and, when the champion has a content check, the share of the new images it finds out of domain
(computed by the caller, which holds the model).

A shift beyond a ``monitoring`` threshold is a *warning*: the promotion step logs it, shows it in
its decision and, with ``monitoring.on_drift: hold``, does not promote.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from cxr.config import MonitoringConfig


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _numbers(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    out = []
    for row in rows:
        try:
            value = float(row.get(key, ""))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            out.append(value)
    return out


def profile(rows: Sequence[Mapping[str, Any]], decode_failures: int | None = None) -> dict[str, Any]:
    """Summary of one side: counts, prevalence, patients, geometry, intensity, formats.

    Args:
        rows: ``data.csv`` rows (``label`` 0/1 as text or numbers).
        decode_failures: files the prepare step excluded as unreadable, when known.
    """
    labels = [int(float(r.get("label") or 0)) for r in rows]
    n = len(labels)
    patients = {str(r.get("patient_id") or "") for r in rows} - {""}
    return {
        "images": n,
        "normal": labels.count(0),
        "pneumonia": labels.count(1),
        "prevalence": (sum(labels) / n) if n else None,
        "patients": len(patients),
        "median_width": _median(_numbers(rows, "width")),
        "median_height": _median(_numbers(rows, "height")),
        "median_intensity": _median(_numbers(rows, "mean_intensity")),
        "channels": dict(Counter(str(r.get("channels") or "?") for r in rows))
        if rows and "channels" in rows[0]
        else {},
        "formats": dict(Counter(str(r.get("format") or "?") for r in rows)) if rows and "format" in rows[0] else {},
        "decode_failures": decode_failures,
    }


def _relative(old: float | None, new: float | None) -> float | None:
    if old is None or new is None or old == 0:
        return None
    return (new - old) / old


def compare(
    old_rows: Sequence[Mapping[str, Any]],
    new_rows: Sequence[Mapping[str, Any]],
    cfg: MonitoringConfig,
    old_failures: int | None = None,
    new_failures: int | None = None,
    out_of_domain: float | None = None,
) -> dict[str, Any]:
    """The drift report between the champion's data (``old``) and the challenger's (``new``).

    Args:
        old_rows, new_rows: the two versions' ``data.csv`` rows.
        cfg: the ``monitoring`` thresholds.
        old_failures, new_failures: decode failures of each run's prepare step, when known.
        out_of_domain: the share of the new images outside the champion's content check, or None.

    Returns:
        ``old`` and ``new`` profiles, ``files`` (new, removed, changed, unchanged counts and a few
        examples), ``patients`` (new, removed), ``shifts`` (the measured changes) and ``warnings``
        (one sentence per threshold crossed; empty when nothing moved beyond ``monitoring``).
    """
    old_p, new_p = profile(old_rows, old_failures), profile(new_rows, new_failures)
    shifts = _shifts(old_p, new_p, out_of_domain)
    return {
        "old": old_p,
        "new": new_p,
        "files": _files(old_rows, new_rows),
        "patients": _patients(old_rows, new_rows),
        "shifts": shifts,
        "warnings": _warnings(old_p, new_p, shifts, cfg),
    }


def _files(old_rows: Sequence[Mapping[str, Any]], new_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """New, removed, changed (same path, other sha256) and unchanged file counts, with up to five examples each."""
    old_by_path = {str(r.get("path")): str(r.get("sha256")) for r in old_rows}
    new_by_path = {str(r.get("path")): str(r.get("sha256")) for r in new_rows}
    added = sorted(set(new_by_path) - set(old_by_path))
    removed = sorted(set(old_by_path) - set(new_by_path))
    changed = sorted(p for p in set(new_by_path) & set(old_by_path) if new_by_path[p] != old_by_path[p])
    return {
        "new": len(added),
        "removed": len(removed),
        "changed": len(changed),
        "unchanged": len(set(new_by_path) & set(old_by_path)) - len(changed),
        "examples": {"new": added[:5], "removed": removed[:5], "changed": changed[:5]},
    }


def _patients(old_rows: Sequence[Mapping[str, Any]], new_rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many patient ids are new, and how many are gone."""
    old_patients = {str(r.get("patient_id") or "") for r in old_rows} - {""}
    new_patients = {str(r.get("patient_id") or "") for r in new_rows} - {""}
    return {"new": len(new_patients - old_patients), "removed": len(old_patients - new_patients)}


def _shifts(old_p: Mapping[str, Any], new_p: Mapping[str, Any], out_of_domain: float | None) -> dict[str, float | None]:
    """The measured changes: prevalence and median intensity as differences, median size as relative changes."""
    return {
        "prevalence": (
            new_p["prevalence"] - old_p["prevalence"]
            if old_p["prevalence"] is not None and new_p["prevalence"] is not None
            else None
        ),
        "median_width": _relative(old_p["median_width"], new_p["median_width"]),
        "median_height": _relative(old_p["median_height"], new_p["median_height"]),
        "median_intensity": (
            new_p["median_intensity"] - old_p["median_intensity"]
            if old_p["median_intensity"] is not None and new_p["median_intensity"] is not None
            else None
        ),
        "out_of_domain": out_of_domain,
    }


def _warnings(
    old_p: Mapping[str, Any], new_p: Mapping[str, Any], shifts: Mapping[str, float | None], cfg: MonitoringConfig
) -> list[str]:
    """One sentence per ``monitoring`` threshold that a shift crosses."""
    warnings = []
    if shifts["prevalence"] is not None and abs(shifts["prevalence"]) > cfg.max_prevalence_shift:
        warnings.append(
            f"prevalence moved {old_p['prevalence']:.3f} → {new_p['prevalence']:.3f} "
            f"({shifts['prevalence'] * 100:+.1f} points; monitoring.max_prevalence_shift {cfg.max_prevalence_shift:g})"
        )
    for side in ("width", "height"):
        change = shifts[f"median_{side}"]
        if change is not None and abs(change) > cfg.max_size_change:
            warnings.append(
                f"median image {side} {old_p[f'median_{side}']:.0f} → {new_p[f'median_{side}']:.0f} px "
                f"({change * 100:+.0f} %; monitoring.max_size_change {cfg.max_size_change:g})"
            )
    if shifts["median_intensity"] is not None and abs(shifts["median_intensity"]) > cfg.max_intensity_shift:
        warnings.append(
            f"median mean intensity {old_p['median_intensity']:.3f} → {new_p['median_intensity']:.3f} "
            f"(monitoring.max_intensity_shift {cfg.max_intensity_shift:g})"
        )
    out_of_domain = shifts["out_of_domain"]
    if out_of_domain is not None and out_of_domain > cfg.max_out_of_domain:
        warnings.append(
            f"{out_of_domain * 100:.1f} % of the new images are outside the champion's content check "
            f"(monitoring.max_out_of_domain {cfg.max_out_of_domain:g})"
        )
    return warnings


def new_or_changed(old_rows: Sequence[Mapping[str, Any]], new_rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Paths of the new images whose bytes the champion never saw (by sha256)."""
    seen = {str(r.get("sha256")) for r in old_rows}
    return [str(r.get("path")) for r in new_rows if str(r.get("sha256")) not in seen]
