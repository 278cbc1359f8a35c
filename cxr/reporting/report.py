"""The ``report`` step: one self-contained HTML page (and the same summary in Markdown).

Everything the pipeline learned, for a clinician or an engineer, offline. At the top: a "demo
sample" banner when the models were trained on the embedded sample, the summary (per model and data
set: n, prevalence, AUC / sensitivity / specificity with 95 % CIs at the shipped threshold, and the
figures at Youden's threshold), the provenance (generation date, code commit, package version, data
source) and the intended use and limitations (:mod:`cxr.common.intended_use`, the text the
model cards carry). Then the data summary and leakage check, the augmented batch, training curves,
test metrics, confusion matrices, ROC / PR / calibration plots, the Grad-CAM gallery with its
border-heat numbers, reader agreement when a readers file is configured, and each model's lineage.
Images are embedded as data URIs. Figures are rounded and intervals read "−0.038 to −0.010"
(:mod:`cxr.formatting`).

The page is laid out by the Jinja2 template ``templates/report.html.j2``; the functions here only
prepare plain data for it (dicts, lists, numbers formatted as strings). The template renders with
autoescaping on, so every string that comes from data is HTML-escaped without asking; the only
values marked safe are the base64 image data URIs (see :func:`_figure`).
"""

from __future__ import annotations

import base64
import functools
import html
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

import cxr
from cxr.common.intended_use import DATA_CITATION, INTENDED_USE, LIMITATIONS
from cxr.common.model_card import card_path_for, read_card_if_any
from cxr.config import EvaluateConfig
from cxr.files import load_json_bounded
from cxr.formatting import MINUS, interval, num
from cxr.inference.loading import model_file
from cxr.provenance.versions import code_version
from cxr.workspace import HERE, Workspace

log = logging.getLogger(__name__)

_TEMPLATE = "report.html.j2"
_EVAL_PLOTS = ("confusion", "roc", "pr", "calibration")


def _escape(value: object) -> object:
    """The environment's ``finalize`` hook: escape every ``{{ value }}`` with :func:`html.escape`.

    Autoescaping would escape these anyway (with MarkupSafe); doing it here first keeps the entities the
    page has always used (``&quot;`` and ``&#x27;``, not ``&#34;`` and ``&#39;``), which readers of the page
    and the tests match on. Values already marked safe (:class:`Markup`, macro output) pass unchanged.
    """
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(str(value), quote=True))


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("cxr.reporting", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_escape,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _fmt(value: object, digits: int = 3) -> str:
    """A figure as shown: a float rounded with a real minus sign (:func:`cxr.formatting.num`), "–" when absent."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return num(value, digits)
    return str(value)


def _ci(pair: Sequence[float] | None) -> str:
    """A 95 % CI as "0.912 to 0.951" or "−0.038 to −0.010" (:func:`cxr.formatting.interval`); "–" when absent."""
    return interval(pair[0], pair[1]) if pair else "–"


def _signed(value: float | None) -> str:
    """A difference with its sign: "+0.012", "−0.038"."""
    text = num(value)
    return text if text.startswith((MINUS, "n/a")) else "+" + text


def _cell(text: Any, *, code: bool = False, cls: str | None = None, warn: str | None = None) -> dict[str, Any]:
    """A table cell with markup around its text: in ``<code>``, in a ``<span class=cls>``, or followed by a warning."""
    return {"text": text, "code": code, "cls": cls, "warn": warn}


def _figure(path: Path, caption: str, width: int | None = None) -> dict[str, Any]:
    """A PNG embedded as a data URI (``src`` is None when the file was not produced)."""
    if not path.is_file():
        return {"caption": caption, "src": None, "width": width}
    # Marked safe because it cannot carry markup: a constant prefix plus base64, whose alphabet
    # (A-Z a-z 0-9 + / =) has no character HTML gives a meaning to. Escaping it would only copy megabytes.
    src = Markup("data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"))
    return {"caption": caption, "src": src, "width": width}


def _load(path: Path) -> dict[str, Any]:
    return load_json_bounded(path, "pipeline record") if path.is_file() else {}


def _card(path: Path) -> dict[str, Any]:
    """A model card through the one reader, as the JSON the templates show (``{}``: none usable)."""
    card = read_card_if_any(path)
    return card.to_json() if card is not None else {}


def collect(models: Sequence[str], root: Path = HERE.root) -> dict[str, Any]:
    """Everything the report shows, read from the pipeline's files (a missing file reads as ``{}``).

    Args:
        models: The model names whose cards to read.
        root: The project folder the pipeline's relative paths start from.

    Returns:
        A dict with keys ``fetch``, ``quality``, ``metrics``, ``gradcam``, ``cards`` (per model),
        ``external`` (per external set in the metrics), ``agreement``, ``promotions`` (the last
        champion/challenger decision per model) and ``provenance`` (:func:`provenance`).
    """
    return {
        "provenance": provenance(root),
        "fetch": _load(Workspace(root).fetch_record),
        "quality": _load(Workspace(root).quality),
        "metrics": _load(Workspace(root).metrics),
        "gradcam": _load(Workspace(root).gradcam_summary),
        "cards": {m: _card(root / card_path_for(model_file(m))) for m in models},
        "external": {
            name: _load(Workspace(root).external / f"{name}.json")
            for name in (_load(Workspace(root).metrics).get("external") or {})
        },
        "agreement": _load(Workspace(root).agreement),
        "promotions": {
            m: _load(Workspace(root).train_reports(m) / "promotion.json")
            for m in models
            if (Workspace(root).train_reports(m) / "promotion.json").is_file()
        },
    }


def provenance(root: Path = HERE.root) -> dict[str, Any]:
    """What produced this report: when, from which code, with which package version.

    Args:
        root: The project folder (its git checkout names the code commit).

    Returns:
        ``generated`` (UTC, ISO 8601), ``commit`` (None outside git), ``dirty`` (uncommitted changes to
        tracked files; None outside git) and ``version`` (``cxr.__version__``).
    """
    code = code_version(root)
    return {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": code.get("commit") or None,
        "dirty": code.get("dirty"),
        "version": cxr.__version__,
    }


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def demo_sample(info: Mapping[str, Any]) -> bool:
    """Whether the data, or any reported model, came from the embedded demo sample.

    Read defensively from ``data/fetch.json`` (``"source": "sample"`` or ``"demo_sample": true``) and
    from each card's data records (``data``, ``lineage_data``), so a banner shows whichever records it.

    Args:
        info: What :func:`collect` returns.

    Returns:
        True when any record says so.
    """
    records = [_mapping(info.get("fetch"))]
    for card in _mapping(info.get("cards")).values():
        records += [_mapping(_mapping(card).get("data")), _mapping(_mapping(card).get("lineage_data"))]
    return any(r.get("demo_sample") is True or r.get("source") == "sample" for r in records)


def _commit_text(prov: Mapping[str, Any]) -> str:
    commit = prov.get("commit")
    if not commit:
        return "unknown (not a git checkout)"
    return str(commit)[:12] + (" (dirty: uncommitted changes)" if prov.get("dirty") else "")


def provenance_rows(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The provenance table: generated, code commit, package version, data source and origin.

    Args:
        info: What :func:`collect` returns.

    Returns:
        ``(label, value)`` pairs, as shown.
    """
    prov, fetch = _mapping(info.get("provenance")), _mapping(info.get("fetch"))
    source = fetch.get("source")
    if source and fetch.get("requested") and fetch.get("requested") != source:
        source = f"{source} (resolved from {fetch.get('requested')})"
    rows = [
        ("generated", str(prov.get("generated") or "unknown")),
        ("code commit", _commit_text(prov)),
        ("package", f"cxr {prov.get('version') or 'unknown'}"),
        ("data source", str(source or "unknown (no data/fetch.json)")),
    ]
    if fetch.get("origin"):
        rows.append(("data origin", str(fetch["origin"])))
    if demo_sample(info):
        rows.append(("demo sample", "yes: models trained on the embedded demo sample"))
    return rows


DOMAIN_WARN_SHARE = 0.05  # more flagged than this: a warning in the summary


def summary_rows(info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per data set and model, at the shipped threshold: external sets first, then the test split.

    Args:
        info: What :func:`collect` returns.

    Returns:
        One dict per data set and model: the set's label and name, the model, n, prevalence, AUC,
        sensitivity and specificity with their 95 % CIs, accuracy, Brier score, ECE, the threshold, its
        rule, whether it was chosen on this very set, the validation Youden threshold and the metrics
        at it, and (external sets) the metrics at the set's own Youden threshold (optimistic).
    """
    metrics = info.get("metrics", {})
    rows = []
    sets = [(name, s, f"external: {name}") for name, s in (metrics.get("external") or {}).items()]
    sets.append(("test", {"models": metrics.get("models") or {}}, "test split"))
    for set_name, data, label in sets:
        for model, m in (data.get("models") or {}).items():
            ci = m.get("ci95") or {}
            point = (metrics.get("models") or {}).get(model, {}).get("operating_point") or {}
            rows.append(
                {
                    "data_set": label,
                    "set": set_name,
                    "model": model,
                    "n": m.get("n"),
                    "prevalence": data.get("prevalence", _prevalence(info, set_name)),
                    "auc": m.get("auc"),
                    "auc_ci95": ci.get("auc"),
                    "sensitivity": m.get("sensitivity"),
                    "sensitivity_ci95": ci.get("sensitivity"),
                    "specificity": m.get("specificity"),
                    "specificity_ci95": ci.get("specificity"),
                    "accuracy": m.get("accuracy"),
                    "brier": m.get("brier"),
                    "ece": (m.get("calibration") or {}).get("ece"),
                    "threshold": m.get("threshold"),
                    "threshold_rule": point.get("rule"),
                    "threshold_chosen_on_this_set": bool(m.get("threshold_chosen_on_this_set")),
                    "youden_threshold": m.get("youden_threshold"),
                    "at_youden": m.get("at_youden"),
                    "at_own_youden": m.get("at_own_youden"),
                }
            )
    return rows


def _prevalence(info: Mapping[str, Any], set_name: str) -> float | None:
    q = info.get("quality", {})
    counts = q.get("splits", {}).get(q.get("split_strategy"), {}).get("counts", {}).get(set_name, {})
    total = sum(counts.values()) if counts else 0
    return counts.get("PNEUMONIA", 0) / total if total else None


def metric_rows(info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per model on the test split (also the Prefect table artifact).

    Args:
        info: What :func:`collect` returns.

    Returns:
        One dict per model, every figure as shown (rounded, :func:`cxr.formatting.num`): AUC and its
        95 % CI, sensitivity, specificity, PPV, NPV, F1, balanced accuracy, Brier score, the shipped
        threshold and the validation Youden threshold.
    """
    rows = []
    for name, m in (info.get("metrics", {}).get("models") or {}).items():
        row: dict[str, Any] = {"model": name}
        for key in ("auc", "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy", "brier"):
            row[key] = _fmt(m.get(key))
            if key == "auc":
                row["auc_ci95"] = _ci((m.get("ci95") or {}).get("auc"))
        row["threshold"] = _fmt(m.get("threshold"))
        row["youden_threshold"] = _fmt(m.get("youden_threshold"))
        rows.append(row)
    return rows


def youden_rows(info: Mapping[str, Any]) -> list[list[str]]:
    """Per data set and model, the figures at Youden's threshold (shown beside the shipped ones).

    Args:
        info: What :func:`collect` returns.

    Returns:
        ``[data set, model, validation Youden threshold, sensitivity, specificity, accuracy at it,
        the set's own Youden threshold, sensitivity / specificity at it]``; the last two are "–" on
        the test split (a set's own threshold is only computed on external sets, and is optimistic).
    """
    rows = []
    for r in summary_rows(info):
        at = _mapping(r.get("at_youden"))
        own = _mapping(r.get("at_own_youden"))
        rows.append(
            [
                r["data_set"],
                r["model"],
                _fmt(r.get("youden_threshold")),
                _fmt(at.get("sensitivity")),
                _fmt(at.get("specificity")),
                _fmt(at.get("accuracy")),
                _fmt(own.get("threshold")),
                f"{_fmt(own.get('sensitivity'))} / {_fmt(own.get('specificity'))}" if own else "–",
            ]
        )
    return rows


YOUDEN_HEADER = (
    "data set",
    "model",
    "Youden threshold (validation)",
    "sensitivity",
    "specificity",
    "accuracy",
    "the set's own Youden threshold (optimistic)",
    "sens / spec at it",
)


def _markdown_summary(info: Mapping[str, Any]) -> list[str]:
    rows = summary_rows(info)
    if not rows:
        return []
    lines = [
        "Every model on every data set at its shipped threshold (95 % CI over patients); external sets first.",
        "",
        "| data set | model | n | prevalence | AUC (95 % CI) | sensitivity (95 % CI) | specificity (95 % CI) | "
        "accuracy | Brier | threshold |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chosen = " (chosen on this set)" if r["threshold_chosen_on_this_set"] else ""
        lines.append(
            f"| {r['data_set']} | {r['model']} | {r['n']} | {_fmt(r['prevalence'])} | {_fmt(r['auc'])} "
            f"({_ci(r['auc_ci95'])}) | {_fmt(r['sensitivity'])} ({_ci(r['sensitivity_ci95'])}) | "
            f"{_fmt(r['specificity'])} ({_ci(r['specificity_ci95'])}) | {_fmt(r['accuracy'])} | "
            f"{_fmt(r['brier'])} | {_fmt(r['threshold'])}{chosen} |"
        )
    lines += [
        "",
        "At Youden's threshold (chosen on the validation split; no confidence intervals):",
        "",
        "| " + " | ".join(YOUDEN_HEADER) + " |",
        "|" + "---|" * len(YOUDEN_HEADER),
        *("| " + " | ".join(row) + " |" for row in youden_rows(info)),
    ]
    return [*lines, "", *_markdown_roles(info)]


def _markdown_roles(info: Mapping[str, Any]) -> list[str]:
    """One line per external set: what its figures may claim (selection or confirmation)."""
    lines = []
    for name, data in ((info.get("metrics") or {}).get("external") or {}).items():
        if data.get("role") == "confirmation":
            when = (data.get("first_scored") or {}).get("first_scored")
            state = (
                f"settings changed after its first scoring ({when}): no longer confirmatory"
                if data.get("changed_after_first_scored")
                else f"scored with the settings of its first scoring ({when})"
            )
            lines.append(f"- {name}: confirmation set, {state}.")
        else:
            count = data.get("configurations_compared")
            compared = f", {count} configurations compared on it" if count else ""
            lines.append(f"- {name}: selection set{compared}; its figures are optimistic.")
    return [*lines, ""] if lines else []


DEMO_BANNER = (
    "Demo sample: these models were trained on the small sample of the data embedded in the repository "
    "(a few hundred images), to show the pipeline working. Their figures are a demonstration, not a "
    "result: fetch the full data set (data.source: kaggle or dir) before reading anything into them."
)


def _markdown_provenance(info: Mapping[str, Any]) -> list[str]:
    """The provenance and the intended use, in Markdown."""
    lines = ["## Provenance", "", *(f"- {label}: {value}" for label, value in provenance_rows(info)), ""]
    lines += ["## Intended use and limitations", "", INTENDED_USE, "", *(f"- {x}" for x in LIMITATIONS), ""]
    return lines


def markdown(info: Mapping[str, Any]) -> str:
    """The report's summary in Markdown: data sets and models, the splits, test metrics and health warnings.

    Args:
        info: What :func:`collect` returns.

    Returns:
        The Markdown text, ending in a newline.
    """
    q, metrics = info.get("quality", {}), info.get("metrics", {})
    lines = ["# Chest X-ray pneumonia pipeline — report", ""]
    if demo_sample(info):
        lines += [f"> **{DEMO_BANNER}**", ""]
    lines += [*_markdown_summary(info), *_markdown_provenance(info), *_markdown_promotions(info)]
    if q:
        split = q.get("split_strategy")
        counts = q.get("splits", {}).get(split, {}).get("counts", {})
        leak = q.get("splits", {}).get(split, {}).get("leakage", {})
        lines += [
            f"Data: {q.get('images_usable')} usable images ({q.get('excluded_count')} excluded), "
            f"split `{split}`, leakage clean: **{leak.get('clean')}**.",
            "",
            "| split | NORMAL | PNEUMONIA |",
            "|---|---|---|",
        ]
        lines += [f"| {s} | {c.get('NORMAL', 0)} | {c.get('PNEUMONIA', 0)} |" for s, c in counts.items()]
        lines.append("")
    if metrics:
        lines += [
            f"Test metrics at each model's shipped threshold (rule `{metrics.get('threshold_source')}`; "
            "95 % CI over patients):",
            "",
            "| model | AUC (95 % CI) | sensitivity | specificity | PPV | NPV | F1 | Brier |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in metric_rows(info):
            lines.append(
                f"| {r['model']} | {_fmt(r['auc'])} ({r['auc_ci95']}) | {_fmt(r['sensitivity'])} | "
                f"{_fmt(r['specificity'])} | {_fmt(r['ppv'])} | {_fmt(r['npv'])} | {_fmt(r['f1'])} | "
                f"{_fmt(r['brier'])} |"
            )
        for c in metrics.get("comparison", []):
            lines.append(
                f"\nAUC {c['a']} − {c['b']}: {_signed(c['auc_difference'])} (95 % CI {_ci(c['ci95'])}, "
                f"p = {_fmt(c['p_value'])}, {c['method']})."
            )
    for name, card in info.get("cards", {}).items():
        health = card.get("health", {})
        if health.get("status") not in (None, "healthy"):
            lines.append(f"\n**Warning: {name} is {health['status']}: {'; '.join(health.get('problems', []))}**")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ the HTML page's sections


def _summary_section(info: Mapping[str, Any]) -> dict[str, Any] | None:
    rows = summary_rows(info)
    if not rows:
        return None
    table = []
    for r in rows:
        chosen = "(threshold chosen on this set)" if r["threshold_chosen_on_this_set"] else None
        table.append(
            [
                r["data_set"],
                r["model"],
                r["n"],
                _fmt(r["prevalence"]),
                f"{_fmt(r['auc'])} ({_ci(r['auc_ci95'])})",
                f"{_fmt(r['sensitivity'])} ({_ci(r['sensitivity_ci95'])})",
                f"{_fmt(r['specificity'])} ({_ci(r['specificity_ci95'])})",
                _fmt(r["accuracy"]),
                _fmt(r["brier"]),
                _fmt(r["ece"]),
                _cell(_fmt(r["threshold"]), warn=chosen),
            ]
        )
    rules = {r["model"]: r["threshold_rule"] for r in rows if r["threshold_rule"]}
    external = []
    scored_sets = (info.get("metrics") or {}).get("external") or {}
    for name, ext in (info.get("external") or {}).items():
        overlap = ext.get("overlap_with_training") or {}
        role = scored_sets.get(name) or {}
        flagged = {
            model: m["domain"]
            for model, m in (role.get("models") or {}).items()
            if isinstance(m.get("domain"), dict) and m["domain"].get("share_flagged", 0) > DOMAIN_WARN_SHARE
        }
        external.append(
            {
                "name": name,
                "role": role.get("role", "selection"),
                "out_of_domain": [
                    {"model": model, "flagged": d["flagged"], "n": d["n"], "share": _fmt(d["share_flagged"])}
                    for model, d in flagged.items()
                ],
                "compared": role.get("configurations_compared"),
                "changed_after_first_scored": bool(role.get("changed_after_first_scored")),
                "first_scored": (role.get("first_scored") or {}).get("first_scored"),
                "overlap": bool(overlap.get("identical_files") or overlap.get("shared_patient_ids")),
                "identical_files": overlap.get("identical_files"),
                "shared_patient_ids": overlap.get("shared_patient_ids"),
                "excluded": len(ext.get("excluded") or []),
            }
        )
    return {
        "rows": table,
        "youden_header": list(YOUDEN_HEADER),
        "youden": youden_rows(info),
        "rules": [{"model": m, "rule": rule} for m, rule in rules.items()],
        "external": external,
    }


def _top_section(info: Mapping[str, Any]) -> dict[str, Any]:
    """The banner, provenance and intended use shown right below the summary."""
    return {
        "demo_banner": DEMO_BANNER if demo_sample(info) else None,
        "provenance": [list(row) for row in provenance_rows(info)],
        "intended_use": INTENDED_USE,
        "limitations": list(LIMITATIONS),
        "citation": DATA_CITATION,
    }


def _data_section(info: Mapping[str, Any], root: Path) -> dict[str, Any] | None:
    q, fetch = info["quality"], info["fetch"]
    if not q:
        return None
    splits = []
    for strategy, s in q.get("splits", {}).items():
        leak = s.get("leakage", {})
        clean = bool(leak.get("clean"))
        splits.append(
            [
                strategy,
                *(sum(s["counts"].get(k, {}).values()) for k in ("train", "val", "test")),
                leak.get("patients_shared", {}).get("train-test"),
                leak.get("hashes_shared", {}).get("train-test"),
                _cell("clean" if clean else "leaks", cls="ok" if clean else "warn"),
            ]
        )
    return {
        "source": fetch.get("source"),
        "origin": fetch.get("origin"),
        "images_usable": q.get("images_usable"),
        "excluded_count": q.get("excluded_count"),
        "split_strategy": q.get("split_strategy"),
        "splits": splits,
        "excluded": [[e["path"], e["reason"]] for e in q.get("excluded", [])[:500]],
        "figures": [
            _figure(Workspace(root).class_plot, "class distribution per split"),
            _figure(Workspace(root).preview_plot, "one augmented training batch", 520),
        ],
    }


def _training_section(info: Mapping[str, Any], root: Path) -> list[dict[str, Any]]:
    models = []
    for name, card in info["cards"].items():
        if not card:
            continue
        health = card.get("health", {})
        models.append(
            {
                "name": name,
                "status": health.get("status"),
                "status_class": "ok" if health.get("status") == "healthy" else "warn",
                "problems": "; ".join(health.get("problems", [])),
                "epochs_run": card.get("epochs_run"),
                "best_epoch": card.get("best_epoch"),
                "validation_auc": _fmt(card.get("validation", {}).get("auc")),
                "parameters": card.get("parameters", {}).get("total"),
                "curves": _figure(Workspace(root).train_reports(name) / "curves.png", f"{name}: training curves"),
            }
        )
    return models


_PROMOTION_ROWS = (
    ("version", lambda m: m.get("id")),
    ("health", lambda m: m.get("health")),
    ("validation AUC", lambda m: _fmt(m.get("val_auc"))),
    ("reference AUC", lambda m: _fmt((m.get("reference") or {}).get("auc"))),
    ("shipped threshold", lambda m: _fmt((m.get("reference") or {}).get("threshold"))),
    ("sensitivity", lambda m: _fmt((m.get("reference") or {}).get("sensitivity"))),
    ("specificity", lambda m: _fmt((m.get("reference") or {}).get("specificity"))),
    ("out of domain", lambda m: _fmt((m.get("reference") or {}).get("out_of_domain"))),
)


def promotion_section(info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per model, its last champion/challenger decision: both models' figures, the reasons, drift warnings."""
    out = []
    for name, decision in (info.get("promotions") or {}).items():
        if not isinstance(decision, Mapping) or not isinstance(decision.get("challenger"), Mapping):
            continue
        champion = decision.get("champion") if isinstance(decision.get("champion"), Mapping) else None
        ref = decision.get("reference") if isinstance(decision.get("reference"), Mapping) else {}
        drift = given if isinstance(given := decision.get("drift"), Mapping) else {}
        out.append(
            {
                "name": name,
                "outcome": decision.get("outcome"),
                "promoted": bool(decision.get("promoted")),
                "line": decision.get("line"),
                "reference": (
                    f"{ref.get('name')}: {ref.get('images')} images, {ref.get('pneumonia')} pneumonia, "
                    f"{ref.get('excluded_seen_in_training')} left out as seen in training"
                    if ref
                    else None
                ),
                "rows": [
                    [label, get(decision["challenger"]), get(champion) if champion else "—"]
                    for label, get in _PROMOTION_ROWS
                ],
                "reasons": [str(r) for r in decision.get("reasons") or []],
                "drift": [str(w) for w in drift.get("warnings") or []],
            }
        )
    return out


def _markdown_promotions(info: Mapping[str, Any]) -> list[str]:
    lines = []
    for p in promotion_section(info):
        lines += [f"## Champion versus challenger: {p['name']}", "", str(p["line"]), ""]
        if p["reference"]:
            lines += [f"Reference set {p['reference']}.", ""]
        lines += ["| | challenger | champion |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in p["rows"])]
        lines += ["", *(f"- not promoted because: {r}" for r in p["reasons"])]
        lines += [*(f"- **data drift:** {w}" for w in p["drift"]), ""]
    return lines


def _metrics_section(info: Mapping[str, Any], root: Path) -> dict[str, Any] | None:
    metrics = info["metrics"]
    if not metrics:
        return None
    rows = [
        [
            r["model"],
            _fmt(r["auc"]),
            r["auc_ci95"],
            _fmt(r["sensitivity"]),
            _fmt(r["specificity"]),
            _fmt(r["ppv"]),
            _fmt(r["npv"]),
            _fmt(r["f1"]),
            _fmt(r["balanced_accuracy"]),
            _fmt(r["brier"]),
            _fmt(r["youden_threshold"]),
        ]
        for r in metric_rows(info)
    ]
    comparison = [
        [f"{c['a']} − {c['b']}", _signed(c["auc_difference"]), _ci(c["ci95"]), _fmt(c["p_value"]), c["method"]]
        for c in metrics.get("comparison") or []
    ]
    plots = [
        {
            "name": name,
            "figures": [_figure(Workspace(root).eval / name / f"{k}.png", f"{name}: {k}", 300) for k in _EVAL_PLOTS],
        }
        for name in metrics.get("models", {})
    ]
    return {"threshold_source": metrics.get("threshold_source"), "rows": rows, "comparison": comparison, "plots": plots}


def _gradcam_section(info: Mapping[str, Any], root: Path) -> dict[str, Any] | None:
    cam = info["gradcam"]
    if not cam:
        return None
    models = cam.get("models", {})
    return {
        "border_percent": f"{cam.get('border_margin', 0) * 100:.1f}",
        "uniform_border_fraction": _fmt(cam.get("uniform_border_fraction")),
        "rows": [
            [n, m["layer"], _fmt(m["border_fraction_mean"]), _fmt(m["border_to_uniform_ratio"]), m["images"]]
            for n, m in models.items()
        ],
        "galleries": [_figure(Workspace(root).gradcam / f"{n}.png", f"{n}: Grad-CAM gallery") for n in models],
    }


def _agreement_section(info: Mapping[str, Any]) -> dict[str, Any] | None:
    agreement = info["agreement"]
    if not agreement:
        return None
    fleiss = agreement.get("fleiss")
    return {
        "cohen": [[c["pair"], _fmt(c["kappa"]), _ci(c["ci95"])] for c in agreement.get("cohen", [])],
        "fleiss": {"kappa": _fmt(fleiss["kappa"]), "ci95": _ci(fleiss["ci95"])} if fleiss else None,
    }


def _lineage_rows(info: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for name, card in info["cards"].items():
        if not card:
            continue
        data, code = card.get("data", {}), card.get("code", {})
        commit = str(code.get("commit"))[:12] + (" (dirty)" if code.get("dirty") else "")
        rows.append(
            [
                name,
                _cell(str(card.get("model_sha256"))[:16], code=True),
                _cell(str(data.get("manifest_sha256"))[:16], code=True),
                _cell(str(data.get("splits_sha256"))[:16], code=True),
                _cell(commit, code=True),
                card.get("created"),
            ]
        )
    return rows


def _page(info: Mapping[str, Any], root: Path) -> str:
    """The HTML page: each section's data, laid out by the template."""
    return (
        _environment()
        .get_template(_TEMPLATE)
        .render(
            summary=_summary_section(info),
            top=_top_section(info),
            data=_data_section(info, root),
            training=_training_section(info, root),
            promotions=promotion_section(info),
            metrics=_metrics_section(info, root),
            gradcam=_gradcam_section(info, root),
            agreement=_agreement_section(info),
            lineage=_lineage_rows(info),
        )
    )


def render(
    models: Sequence[str],
    root: Path = HERE.root,
    out: Path = HERE.report_html,
    markdown_out: Path = HERE.report_md,
) -> dict[str, Any]:
    """Write the HTML report and its Markdown summary.

    Args:
        models: The models to report on (their cards; metrics cover whatever ``reports/metrics.json`` holds).
        root: The project folder the pipeline's files are read from.
        out: Where to write the HTML page (its folder is created).
        markdown_out: Where to write the Markdown summary.

    Returns:
        ``{"html": out as a POSIX path, "markdown": the Markdown text, "rows": metric_rows(...)}``.
    """
    info = collect(models, root)
    page = _page(info, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    md = markdown(info)
    markdown_out.write_text(md)
    log.info("report: %s (%d KB), %s", out, len(page) // 1024, markdown_out)
    return {"html": out.as_posix(), "markdown": md, "rows": metric_rows(info)}


def build(
    models: Sequence[str],
    readers: str,
    eval_params: EvaluateConfig,
    agreement_file: Path = HERE.agreement,
) -> dict[str, Any]:
    """The report step, shared by the CLI and the Prefect task.

    Reader agreement is computed first when a readers CSV is configured (a stale agreement file is
    removed otherwise), then :func:`render` writes the page.

    Args:
        models: The models to report on; the first one is compared with the readers.
        readers: Path of the readers CSV, or ``""`` for none.
        eval_params: The ``evaluate`` section (bootstrap resamples, seed) for the agreement CIs.
        agreement_file: Where the agreement JSON is written (or removed).

    Returns:
        What :func:`render` returns.
    """
    if readers:
        from cxr.evaluation.agreement import agreement_for_report

        agreement_for_report(readers, models[0], eval_params, agreement_file)
    else:
        agreement_file.unlink(missing_ok=True)
    return render(models)
