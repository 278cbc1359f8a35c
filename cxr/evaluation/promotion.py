"""Champion and challenger: whether a newly trained model replaces the shipped one.

Training stores every model as a version (:mod:`cxr.provenance.model_store`); the newest is the
*challenger*, the shipped one the *champion*. :func:`promote` decides, under ``promotion.policy``:

- ``always``: the challenger ships (the behaviour before this step existed; for experiments);
- ``gate`` (default): the first model of a name ships when healthy. After that the challenger ships
  only if all of these hold on the **reference set**:

  - it passed the health check;
  - it is non-inferior in AUC: the lower bound of the paired patient-bootstrap 95 % CI of
    AUC(challenger) − AUC(champion) is ≥ −``promotion.auc_margin``;
  - its sensitivity at its own shipped threshold is at most ``promotion.sensitivity_margin`` below
    the champion's at the champion's;
  - where both have a content check, it flags no larger share of the reference images out of domain
    (beyond ``promotion.ood_margin``: between two trainings a few films cross the check's line);
  - with ``monitoring.on_drift: hold``, the data did not drift (:mod:`cxr.data.drift`).

The reference set is ``promotion.reference`` (an ``evaluate.external`` set: a fixed folder, indexed
and hash-checked by the external step), or, when none is configured, the current test split. Either
way every image either model trained or validated on (by sha256, from the versions' ``data.csv``)
is left out, and the decision says how many.

A challenger that loses leaves every shipped file byte-identical; it stays stored, with its reason.
Each decision is written to ``reports/train/<name>/promotion.json`` (a DVC metric: ``dvc exp show``
shows ``promoted`` and both AUCs), appended to ``lineage/models.jsonl`` as a ``promotion`` event, and
summarised in one log line such as ``cxrnet: challenger 3f2a… not promoted: AUC −0.024 (95 % CI
−0.041 to −0.008) on guangzhou_test_half; champion 9c1e… stays``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr.common.metrics import at_threshold, bootstrap, paired_auc_test, threshold_free
from cxr.config import Params
from cxr.data.drift import compare, new_or_changed
from cxr.data.external_sets import load_external
from cxr.errors import CxrError, DataError
from cxr.files import load_json_bounded, write_json
from cxr.formatting import num
from cxr.inference.loading import LoadedModel, load, load_image
from cxr.provenance import lineage_log as audit
from cxr.provenance import model_store
from cxr.provenance.model_store import Shipped, Version
from cxr.safe_text import printable
from cxr.workspace import HERE

log = logging.getLogger(__name__)

DECISION_FILE = "promotion.json"
MIN_REFERENCE = 20  # images; fewer (or one class only) cannot show non-inferiority
OOD_SAMPLE = 256  # new images scored by the champion's content check for the drift report


class NothingShipped(CxrError):
    """The first version of a model failed the gate: there is no champion to keep, and none to ship."""


@dataclass(frozen=True)
class Reference:
    """The images that decide, less those either model trained or validated on."""

    name: str
    paths: list[str]
    labels: np.ndarray
    groups: list[str]
    excluded: int
    fixed: bool  # a configured set (True) or the test split of the current data (False)


def reference_set(cfg: Params, versions: Sequence[Version], splits_csv: Path) -> Reference:
    """The reference set for ``versions`` (challenger and champion): configured, or the test split.

    Raises:
        DataError: the configured set cannot be read, or its files changed since it was indexed.
    """
    name = cfg.promotion.reference
    rows: list[dict[Hashable, Any]]  # one per image, as pandas' to_dict("records") gives them
    if name:
        ext = load_external(name, cfg.evaluate.external[name])
        rows = [
            {"path": p, "label": int(label), "patient_id": g, "sha256": h}
            for p, label, g, h in zip(ext.paths, ext.labels, ext.groups, ext.sha256, strict=True)
        ]
    else:
        import pandas as pd

        if not splits_csv.is_file():
            raise DataError(f"{splits_csv}: not found; the reference set is its test split (run prepare)")
        frame = pd.read_csv(splits_csv, keep_default_na=False, dtype={"patient_id": str})
        rows = frame[frame["split"] == "test"].to_dict("records")
        name = "test split"
    seen: set[str] = set()
    for version in versions:
        seen |= {str(r.get("sha256")) for r in model_store.read_data_rows(version)}
    kept = [r for r in rows if str(r.get("sha256")) not in seen]
    return Reference(
        name,
        [str(r["path"]) for r in kept],
        np.asarray([int(r["label"]) for r in kept], dtype=int),
        [str(r.get("patient_id") or "") for r in kept],
        len(rows) - len(kept),
        bool(cfg.promotion.reference),
    )


# the reference images decoded once per preprocessing: (image size, resize, interpolation, paths)
_DecodeKey = tuple[int, str, str, tuple[str, ...]]


@dataclass
class _Scores:
    probabilities: np.ndarray
    domain: np.ndarray | None
    threshold: float
    threshold_source: str


def _score(lm: LoadedModel, paths: Sequence[str], decoded: dict[_DecodeKey, np.ndarray]) -> _Scores:
    key = (lm.input.image_size, lm.input.resize, lm.input.interpolation, tuple(paths))
    if key not in decoded:
        decoded[key] = (
            np.stack([load_image(p, lm.input) for p in paths])
            if paths
            else np.zeros((0, lm.input.image_size, lm.input.image_size, 3), np.uint8)
        )
    probabilities, domain = lm.score(decoded[key]) if len(paths) else (np.zeros(0), None)
    threshold = lm.threshold()
    return _Scores(np.asarray(probabilities, dtype=float), domain, threshold.value, threshold.source)


def _figures(scores: _Scores, ref: Reference) -> dict[str, Any]:
    free = threshold_free(ref.labels, scores.probabilities) if len(ref.labels) else {}
    point = at_threshold(ref.labels, scores.probabilities, scores.threshold) if len(ref.labels) else {}
    return {
        "auc": free.get("auc"),
        "threshold": scores.threshold,
        "threshold_source": scores.threshold_source,
        "sensitivity": point.get("sensitivity"),
        "specificity": point.get("specificity"),
        "out_of_domain": (
            float(np.mean(scores.domain > 1.0)) if scores.domain is not None and len(scores.domain) else None
        ),
    }


def _model_entry(version: Version, figures: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**version.summary(), "reference": dict(figures) if figures is not None else None}


def _drift(cfg: Params, champion: Version, challenger: Version, champion_lm: LoadedModel | None) -> dict[str, Any]:
    old_rows, new_rows = model_store.read_data_rows(champion), model_store.read_data_rows(challenger)
    out_of_domain = None
    fresh = new_or_changed(old_rows, new_rows)
    if champion_lm is not None and champion_lm.domain is not None and fresh:
        rng = np.random.default_rng(cfg.promotion.seed)
        sample = [fresh[i] for i in sorted(rng.choice(len(fresh), min(OOD_SAMPLE, len(fresh)), replace=False))]
        readable = [p for p in sample if Path(p).is_file()]
        if readable:
            _, scores = champion_lm.score(np.stack([load_image(p, champion_lm.input) for p in readable]))
            out_of_domain = float(np.mean(scores > 1.0)) if scores is not None else None
    failures = [_decode_failures(v) for v in (champion, challenger)]
    return compare(old_rows, new_rows, cfg.monitoring, failures[0], failures[1], out_of_domain)


def _decode_failures(version: Version) -> int | None:
    quality = version.card().extra("data_quality") or {}
    value = quality.get("excluded_count") if isinstance(quality, dict) else None
    return int(value) if isinstance(value, int | float) else None


def gate(
    cfg: Params,
    champion: Mapping[str, Any],
    challenger: Mapping[str, Any],
    paired: Mapping[str, Any],
    drift: Mapping[str, Any] | None,
) -> list[str]:
    """The gate's failed conditions, as phrases (empty: the challenger may ship).

    Args:
        cfg: the parameters (``promotion``, ``monitoring``).
        champion, challenger: :func:`_model_entry` records with their reference figures.
        paired: :func:`cxr.common.metrics.paired_auc_test` of challenger − champion.
        drift: the drift report, or None.
    """
    failed = []
    if challenger.get("health") != "healthy":
        failed.append(f"health check: {challenger.get('health')}")
    ci = paired.get("ci95")
    diff = paired.get("auc_difference")
    if ci is None or diff is None:
        failed.append("AUC difference undefined on the reference set (one class, or too few images)")
    elif ci[0] < -cfg.promotion.auc_margin:
        failed.append(
            f"AUC {diff:+.3f} (95 % CI {ci[0]:+.3f} to {ci[1]:+.3f}; lower bound {ci[0]:+.4f} "
            f"below -{cfg.promotion.auc_margin:g})"
        )
    ours, theirs = (challenger["reference"] or {}).get("sensitivity"), (champion["reference"] or {}).get("sensitivity")
    if ours is not None and theirs is not None and ours < theirs - cfg.promotion.sensitivity_margin:
        failed.append(
            f"sensitivity {ours:.3f} vs the champion's {theirs:.3f} "
            f"(more than promotion.sensitivity_margin {cfg.promotion.sensitivity_margin:g} below)"
        )
    ood_new, ood_old = (
        (challenger["reference"] or {}).get("out_of_domain"),
        (champion["reference"] or {}).get("out_of_domain"),
    )
    if ood_new is not None and ood_old is not None and ood_new > ood_old + cfg.promotion.ood_margin:
        failed.append(
            f"out of domain on {ood_new * 100:.1f} % of the reference set vs {ood_old * 100:.1f} % "
            f"(more than promotion.ood_margin {cfg.promotion.ood_margin:g} above)"
        )
    if drift is not None and drift["warnings"] and cfg.monitoring.on_drift == "hold":
        failed.append("data drift with monitoring.on_drift: hold (" + "; ".join(drift["warnings"]) + ")")
    return failed


def promote(
    name: str,
    cfg: Params,
    splits_csv: str | Path = HERE.splits,
    shipped: Shipped | None = None,
    registry_dir: Path | None = None,
) -> dict[str, Any]:
    """Decide whether the newest stored version of ``name`` replaces the shipped one; act; record it.

    Args:
        name: the model name.
        cfg: the parameters (``promotion``, ``monitoring``, ``evaluate.external``).
        splits_csv: the current split file (the reference set when none is configured).
        shipped: where the champion lives (default ``models/`` and ``reports/train/``).
        registry_dir: the version store (default ``registry/``).

    Returns:
        The decision record (also written to ``reports/train/<name>/promotion.json``).

    Raises:
        CxrError: no version of ``name`` is stored (train it first), or the shipped files are damaged.
        NothingShipped: there is no champion and the challenger failed the health check (the decision
            is recorded first).
    """
    shipped = shipped or Shipped(name)
    challenger = model_store.latest(name, registry_dir)
    if challenger is None:
        raise CxrError(
            f"{name}: no trained version in {printable(registry_dir or HERE.registry)}; run `cxr train --model {name}`"
        )
    champion = model_store.champion(shipped, registry_dir)
    decision = _decide(name, cfg, champion, challenger, splits_csv)
    if decision["promoted"]:
        model_store.install(challenger, shipped)
    shipped_now = challenger if decision["promoted"] else champion
    decision["shipped"] = {"id": shipped_now.id} if shipped_now else None
    decision["line"] = decision_line(decision)
    previous = _previous_decision(shipped)
    if decision["outcome"] == "already champion" and (previous.get("challenger") or {}).get("id") == challenger.id:
        log.info("%s", decision["line"])
        return previous  # the decision that shipped it stays the record (nothing new was decided)
    _record(decision, shipped)
    (log.info if decision["promoted"] or decision["outcome"] == "already champion" else log.warning)(
        "%s", decision["line"]
    )
    if decision["shipped"] is None:
        raise NothingShipped(
            f"{decision['line']}; no {name} model is shipped. Fix its training (see the health problems in "
            f"registry/{name}/{challenger.id}/{name}.card.json), or ship it flagged with promotion.policy: always"
        )
    return decision


def _decide(
    name: str, cfg: Params, champion: Version | None, challenger: Version, splits_csv: str | Path
) -> dict[str, Any]:
    """The decision on ``challenger`` before anything is installed: ``model``, ``policy``, ``promoted``,
    ``outcome``, ``reasons`` and both models' entries (and, when they were compared, the comparison)."""
    policy = cfg.promotion.policy
    decision: dict[str, Any] = {"model": name, "policy": policy, "challenger": _model_entry(challenger, None)}
    rolled_back = [
        e for e in audit.events(name) if e.get("event") == "rollback" and e.get("rolled_back") == challenger.id
    ]
    if champion is not None and champion.id == challenger.id:
        decision.update(promoted=False, outcome="already champion", reasons=[], champion=decision["challenger"])
    elif rolled_back and policy == "gate":  # a person took it out of service: only a person puts it back
        decision.update(
            promoted=False,
            outcome="rolled back",
            reasons=[
                f"rolled back at {rolled_back[-1].get('logged')}; "
                f"ship it again with `cxr models promote {challenger.id}`"
            ],
            champion=_model_entry(champion, None) if champion else None,
        )
    elif champion is None:
        decision.update(_first_model(challenger, cfg, decision["challenger"]["health"]))
    else:
        decision.update(_compare(name, cfg, champion, challenger, Path(splits_csv)))
        if policy == "always":
            decision.update(promoted=True, outcome="promoted (policy always)")
    return decision


def _first_model(challenger: Version, cfg: Params, health: str | None) -> dict[str, Any]:
    """No champion yet: a healthy model ships. An unhealthy one ships flagged only where the settings it
    was trained with say to keep one (``train.common.health.on_collapse: warn``, the only setting under
    which an unhealthy model is stored at all) or under ``policy: always``; otherwise nothing ships."""
    if health == "healthy":
        return {"promoted": True, "outcome": "first model", "reasons": [], "champion": None}
    if cfg.promotion.policy == "always" or _on_collapse(challenger) == "warn":
        return {
            "promoted": True,
            "outcome": "first model, flagged",
            "reasons": [],
            "warnings": [f"health check: {health}; shipped flagged (train.common.health.on_collapse: warn)"],
            "champion": None,
        }
    return {"promoted": False, "outcome": "rejected", "reasons": [f"health check: {health}"], "champion": None}


def _on_collapse(version: Version) -> str | None:
    """``health.on_collapse`` as the version was trained with (its card's training settings)."""
    settings = version.card().extra("train_config") or {}
    health = settings.get("health") if isinstance(settings, dict) else None
    return health.get("on_collapse") if isinstance(health, dict) else None


def _compare(name: str, cfg: Params, champion: Version, challenger: Version, splits_csv: Path) -> dict[str, Any]:
    ref = reference_set(cfg, [champion, challenger], splits_csv)
    decoded: dict[_DecodeKey, np.ndarray] = {}
    champion_lm = load(champion.model)
    challenger_lm = load(challenger.model)
    champion_scores, challenger_scores = (
        _score(champion_lm, ref.paths, decoded),
        _score(challenger_lm, ref.paths, decoded),
    )
    old, new = (
        _model_entry(champion, _figures(champion_scores, ref)),
        _model_entry(challenger, _figures(challenger_scores, ref)),
    )
    enough = len(ref.labels) >= MIN_REFERENCE and 0 < ref.labels.sum() < len(ref.labels)
    if enough:
        samples = bootstrap(
            ref.labels,
            [challenger_scores.probabilities, champion_scores.probabilities],
            ref.groups,
            0.5,
            cfg.promotion.bootstrap,
            cfg.promotion.seed,
        )
        paired = paired_auc_test(samples[0]["auc"], samples[1]["auc"], new["reference"]["auc"], old["reference"]["auc"])
    else:
        paired = {"auc_difference": None, "ci95": None, "p_value": None, "method": "paired bootstrap over patients"}
    drift = _drift(cfg, champion, challenger, champion_lm)
    for warning in drift["warnings"]:
        log.warning("%s: data drift: %s", name, warning)
    failed = gate(cfg, old, new, paired, drift)
    if not enough:
        failed.insert(0, f"reference set too small: {len(ref.labels)} images of {int(ref.labels.sum())} pneumonia")
    return {
        "promoted": not failed,
        "outcome": "promoted" if not failed else "not promoted",
        "reasons": failed,
        "champion": old,
        "challenger": new,
        "paired_auc": paired,
        "reference": {
            "name": ref.name,
            "fixed": ref.fixed,
            "images": len(ref.labels),
            "pneumonia": int(ref.labels.sum()),
            "patients": len(set(g for g in ref.groups if g)),
            "excluded_seen_in_training": ref.excluded,
        },
        "drift": drift,
        "margins": {
            "auc": cfg.promotion.auc_margin,
            "sensitivity": cfg.promotion.sensitivity_margin,
            "out_of_domain": cfg.promotion.ood_margin,
        },
    }


def decision_line(decision: Mapping[str, Any]) -> str:
    """The decision in one line, as the run log and the CLI print it."""
    name, outcome = decision["model"], decision["outcome"]
    new = decision["challenger"]["id"]
    old = (decision.get("champion") or {}).get("id")
    ref = (decision.get("reference") or {}).get("name")
    paired = decision.get("paired_auc") or {}
    auc = ""
    if paired.get("auc_difference") is not None and paired.get("ci95"):
        low, high = paired["ci95"]
        auc = f"AUC {paired['auc_difference']:+.3f} (95 % CI {low:+.3f} to {high:+.3f}) on {ref}"
    if outcome == "already champion":
        return f"{name}: version {new} is already the champion; nothing to do"
    if outcome in ("first model", "first model, flagged", "rejected"):
        if decision["promoted"]:
            verb = "promoted (no champion yet)" + "".join(f"; {w}" for w in decision.get("warnings") or [])
        else:
            verb = "not promoted: " + "; ".join(decision["reasons"])
        return f"{name}: challenger {new} {verb}"
    if decision["promoted"]:
        tail = f" ({outcome})" if outcome != "promoted" else ""
        return f"{name}: challenger {new} promoted{tail}: {auc or 'no paired AUC'}; champion {old} retired"
    return f"{name}: challenger {new} not promoted: {'; '.join(decision['reasons'])}; champion {old} stays"


def _previous_decision(shipped: Shipped) -> dict[str, Any]:
    path = shipped.reports / DECISION_FILE
    try:
        previous = load_json_bounded(path, "promotion decision") if path.is_file() else {}
    except CxrError:
        return {}
    return previous if isinstance(previous, dict) else {}


def _record(decision: dict[str, Any], shipped: Shipped) -> None:
    """``promotion.json`` beside the shipped reports, and a ``promotion`` event in the lineage log."""
    write_json(shipped.reports / DECISION_FILE, decision)
    event = {
        "event": "promotion",
        "model": decision["model"],
        "model_sha256": decision["challenger"]["sha256"] or "",
        "version": decision["challenger"]["id"],
        "promoted": decision["promoted"],
        "outcome": decision["outcome"],
        "reasons": decision["reasons"],
        "champion": (decision.get("champion") or {}).get("id"),
        "shipped": (decision.get("shipped") or {}).get("id"),
        "run": audit.current_run(),
    }
    audit.append(event)


def markdown(decision: Mapping[str, Any]) -> str:
    """The decision as a markdown table of both models' figures (Prefect artifact, report)."""
    lines = [f"### {decision['model']}: {decision['outcome']}", "", decision.get("line", ""), ""]
    champion, challenger = decision.get("champion"), decision["challenger"]
    ref = decision.get("reference")
    if ref:
        lines += [
            f"Reference set: **{ref['name']}**, {ref['images']} images ({ref['pneumonia']} pneumonia, "
            f"{ref['patients']} patients); {ref['excluded_seen_in_training']} left out as seen in training.",
            "",
        ]
    lines += ["| | challenger | champion |", "|---|---|---|"]
    rows = [
        ("version", lambda m: m.get("id")),
        ("health", lambda m: m.get("health")),
        ("validation AUC", lambda m: num(m.get("val_auc"), 3)),
        ("reference AUC", lambda m: num((m.get("reference") or {}).get("auc"), 3)),
        ("threshold", lambda m: num((m.get("reference") or {}).get("threshold"), 3)),
        ("sensitivity", lambda m: num((m.get("reference") or {}).get("sensitivity"), 3)),
        ("specificity", lambda m: num((m.get("reference") or {}).get("specificity"), 3)),
        ("out of domain", lambda m: num((m.get("reference") or {}).get("out_of_domain"), 3)),
    ]
    for label, get in rows:
        lines.append(f"| {label} | {get(challenger)} | {get(champion) if champion else '—'} |")
    if decision.get("reasons"):
        lines += ["", "Not promoted because:", *[f"- {r}" for r in decision["reasons"]]]
    drift = decision.get("drift")
    if drift:
        files = drift["files"]
        lines += [
            "",
            f"Data: {files['new']} new, {files['removed']} removed, {files['changed']} changed files; "
            f"{drift['patients']['new']} new patients; prevalence "
            f"{num(drift['old']['prevalence'], 3)} → {num(drift['new']['prevalence'], 3)}.",
        ]
        lines += [f"- drift warning: {w}" for w in drift["warnings"]]
    return "\n".join(lines) + "\n"
