"""The ``report`` step: one self-contained HTML page (and the same summary in Markdown).

Everything the pipeline learned, for a clinician or an engineer, offline: data summary and
leakage check, the augmented batch, training curves, test metrics with confidence intervals,
confusion matrices, ROC / PR / calibration plots, the Grad-CAM gallery with its border-heat
numbers, reader agreement when a readers file is configured, and each model's lineage. Images are
embedded as data URIs; every string that comes from data is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cxr.inference.loading import card_path_for, model_file

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d2433;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem}h2{border-bottom:1px solid #d5dbe6;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}th,td{border:1px solid #d5dbe6;padding:.25rem .5rem;
text-align:left}th{background:#eef2f8}.warn{color:#a40000;font-weight:600}.ok{color:#146c2e}
figure{display:inline-block;margin:.4rem;vertical-align:top}figcaption{font-size:.8rem;color:#556}
img{max-width:100%;border:1px solid #e2e6ee}.small{font-size:.8rem;color:#556}code{font-size:.85rem}
"""

# Marks the page once every image has loaded (or lists the ones that did not): the browser test
# reads this attribute, and a person sees a warning instead of silently missing figures.
_IMAGE_CHECK = """
window.addEventListener('load', function () {
  var bad = Array.prototype.filter.call(document.images, function (i) { return !i.complete || !i.naturalWidth; });
  document.body.setAttribute('data-images', bad.length ? 'broken' : 'ok');
  if (bad.length) { var p = document.createElement('p'); p.className = 'warn';
    p.textContent = bad.length + ' figure(s) failed to load.'; document.body.prepend(p); }
});
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def _ci(pair: Sequence[float] | None) -> str:
    return f"{pair[0]:.3f}–{pair[1]:.3f}" if pair else "–"


def _img(path: Path, caption: str, width: int | None = None) -> str:
    if not path.is_file():
        return f'<p class="small">({esc(caption)}: not produced)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    style = f' style="width:{width}px"' if width else ""
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}"{style}>'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(models: Sequence[str], root: Path = Path(".")) -> dict[str, Any]:
    """Everything the report shows, read from the pipeline's files."""
    return {
        "fetch": _load(root / "data/fetch.json"),
        "quality": _load(root / "reports/data_quality.json"),
        "metrics": _load(root / "reports/metrics.json"),
        "gradcam": _load(root / "reports/gradcam/summary.json"),
        "cards": {m: _load(root / card_path_for(model_file(m))) for m in models},
        "external": {name: _load(root / "data/external" / f"{name}.json")
                     for name in (_load(root / "reports/metrics.json").get("external") or {})},
        "agreement": _load(root / "reports/agreement.json"),
    }


def _ci_to(pair: Sequence[float] | None) -> str:
    """A 95 % CI as "0.912 to 0.951" (a dash between negative numbers misreads)."""
    return f"{pair[0]:.3f} to {pair[1]:.3f}".replace("-", "−") if pair else "–"


def summary_rows(info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per data set and model, at the shipped threshold: external sets first, then the test split."""
    metrics = info.get("metrics", {})
    rows = []
    sets = [(name, s, f"external: {name}") for name, s in (metrics.get("external") or {}).items()]
    sets.append(("test", {"models": metrics.get("models") or {}}, "test split"))
    for set_name, data, label in sets:
        for model, m in (data.get("models") or {}).items():
            ci = m.get("ci95") or {}
            point = (metrics.get("models") or {}).get(model, {}).get("operating_point") or {}
            rows.append({
                "data_set": label, "set": set_name, "model": model, "n": m.get("n"),
                "prevalence": data.get("prevalence", _prevalence(info, set_name)),
                "auc": m.get("auc"), "auc_ci95": ci.get("auc"),
                "sensitivity": m.get("sensitivity"), "sensitivity_ci95": ci.get("sensitivity"),
                "specificity": m.get("specificity"), "specificity_ci95": ci.get("specificity"),
                "accuracy": m.get("accuracy"), "brier": m.get("brier"),
                "ece": (m.get("calibration") or {}).get("ece"), "threshold": m.get("threshold"),
                "threshold_rule": point.get("rule"),
                "threshold_chosen_on_this_set": bool(m.get("threshold_chosen_on_this_set")),
                "at_youden": m.get("at_youden"),
            })
    return rows


def _prevalence(info: Mapping[str, Any], set_name: str) -> float | None:
    q = info.get("quality", {})
    counts = q.get("splits", {}).get(q.get("split_strategy"), {}).get("counts", {}).get(set_name, {})
    total = sum(counts.values()) if counts else 0
    return counts.get("PNEUMONIA", 0) / total if total else None


def _summary_html(info: Mapping[str, Any]) -> str:
    rows = summary_rows(info)
    if not rows:
        return ""
    out = ["<h2>Summary</h2><p>Every model on every data set at its <b>shipped threshold</b>; 95 % confidence "
           "intervals from bootstrap resamples of patients. External sets come first: a held-out slice of the "
           "training source is in-distribution and flatters every model.</p>"]
    table = []
    for r in rows:
        chosen = r["threshold_chosen_on_this_set"]
        marker = " <span class='warn'>(threshold chosen on this set)</span>" if chosen else ""
        youden = r.get("at_youden") or {}
        table.append([esc(r["data_set"]), esc(r["model"]), esc(r["n"]), _fmt(r["prevalence"]),
                      f"{_fmt(r['auc'])} ({_ci_to(r['auc_ci95'])})",
                      f"{_fmt(r['sensitivity'])} ({_ci_to(r['sensitivity_ci95'])})",
                      f"{_fmt(r['specificity'])} ({_ci_to(r['specificity_ci95'])})", _fmt(r["accuracy"]),
                      _fmt(r["brier"]), _fmt(r["ece"]), _fmt(r["threshold"]) + marker,
                      f"{_fmt(youden.get('sensitivity'))} / {_fmt(youden.get('specificity'))}"])
    out.append(_table(["data set", "model", "n", "prevalence", "AUC (95 % CI)", "sensitivity (95 % CI)",
                       "specificity (95 % CI)", "accuracy", "Brier", "ECE", "threshold",
                       "sens / spec at validation Youden"], table))
    rules = {r["model"]: r["threshold_rule"] for r in rows if r["threshold_rule"]}
    if rules:
        out.append("<p class='small'>Shipped thresholds: " + "; ".join(
            f"{esc(m)}: {esc(rule)}" for m, rule in rules.items()) + ".</p>")
    for name, ext in (info.get("external") or {}).items():
        overlap = ext.get("overlap_with_training") or {}
        if overlap.get("identical_files") or overlap.get("shared_patient_ids"):
            out.append(f"<p class='warn'>External set {esc(name)} shares {esc(overlap.get('identical_files'))} "
                       f"identical files and {esc(overlap.get('shared_patient_ids'))} patient ids with the training "
                       "data: its figures are not fully independent.</p>")
        if ext.get("excluded"):
            out.append(f"<p class='small'>External set {esc(name)}: {len(ext['excluded'])} unreadable file(s) "
                       "excluded.</p>")
    return "".join(out)


def metric_rows(info: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per model (also the Prefect table artifact)."""
    rows = []
    for name, m in (info.get("metrics", {}).get("models") or {}).items():
        rows.append({"model": name, "auc": m.get("auc"), "auc_ci95": _ci(m.get("ci95", {}).get("auc")),
                     "sensitivity": m.get("sensitivity"), "specificity": m.get("specificity"),
                     "ppv": m.get("ppv"), "npv": m.get("npv"), "f1": m.get("f1"),
                     "balanced_accuracy": m.get("balanced_accuracy"), "brier": m.get("brier"),
                     "youden_threshold": m.get("youden_threshold")})
    return rows


def markdown(info: Mapping[str, Any]) -> str:
    q, metrics = info.get("quality", {}), info.get("metrics", {})
    lines = ["# Chest X-ray pneumonia pipeline — report", ""]
    rows = summary_rows(info)
    if rows:
        lines += ["Every model on every data set at its shipped threshold (95 % CI over patients); external sets "
                  "first.", "", "| data set | model | n | prevalence | AUC (95 % CI) | sensitivity (95 % CI) | "
                  "specificity (95 % CI) | accuracy | Brier | threshold |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            chosen = " (chosen on this set)" if r["threshold_chosen_on_this_set"] else ""
            lines.append(f"| {r['data_set']} | {r['model']} | {r['n']} | {_fmt(r['prevalence'])} | {_fmt(r['auc'])} "
                         f"({_ci_to(r['auc_ci95'])}) | {_fmt(r['sensitivity'])} ({_ci_to(r['sensitivity_ci95'])}) | "
                         f"{_fmt(r['specificity'])} ({_ci_to(r['specificity_ci95'])}) | {_fmt(r['accuracy'])} | "
                         f"{_fmt(r['brier'])} | {_fmt(r['threshold'])}{chosen} |")
        lines.append("")
    if q:
        split = q.get("split_strategy")
        counts = q.get("splits", {}).get(split, {}).get("counts", {})
        leak = q.get("splits", {}).get(split, {}).get("leakage", {})
        lines += [f"Data: {q.get('images_usable')} usable images ({q.get('excluded_count')} excluded), "
                  f"split `{split}`, leakage clean: **{leak.get('clean')}**.", "",
                  "| split | NORMAL | PNEUMONIA |", "|---|---|---|"]
        lines += [f"| {s} | {c.get('NORMAL', 0)} | {c.get('PNEUMONIA', 0)} |" for s, c in counts.items()]
        lines.append("")
    if metrics:
        lines += [f"Test metrics at threshold {metrics.get('threshold')} (95 % CI over patients):", "",
                  "| model | AUC (95 % CI) | sensitivity | specificity | PPV | NPV | F1 | Brier |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in metric_rows(info):
            lines.append(f"| {r['model']} | {_fmt(r['auc'])} ({r['auc_ci95']}) | {_fmt(r['sensitivity'])} | "
                         f"{_fmt(r['specificity'])} | {_fmt(r['ppv'])} | {_fmt(r['npv'])} | {_fmt(r['f1'])} | "
                         f"{_fmt(r['brier'])} |")
        for c in metrics.get("comparison", []):
            lines.append(f"\nAUC {c['a']} − {c['b']}: {c['auc_difference']:+.3f} (95 % CI {_ci(c['ci95'])}, "
                         f"p = {_fmt(c['p_value'])}, {c['method']}).")
    for name, card in info.get("cards", {}).items():
        health = card.get("health", {})
        if health.get("status") not in (None, "healthy"):
            lines.append(f"\n**Warning: {name} is {health['status']}: {'; '.join(health.get('problems', []))}**")
    return "\n".join(lines) + "\n"


def render(models: Sequence[str], root: Path = Path("."), out: Path = Path("reports/report.html"),
           markdown_out: Path = Path("reports/report.md")) -> dict[str, Any]:
    info = collect(models, root)
    q, metrics, cam = info["quality"], info["metrics"], info["gradcam"]
    parts = ["<h1>Chest X-ray pneumonia classifiers — report</h1><p class='small'>Data: Kermany, Zhang & "
             "Goldbaum (2018), doi:10.17632/rscbjbr9sj.2, CC BY 4.0. Research software, not a medical device.</p>"]
    parts.append(_summary_html(info))

    parts.append("<h2>Data</h2>")
    if q:
        fetch = info["fetch"]
        parts.append(f"<p>Source <code>{esc(fetch.get('source'))}</code> ({esc(fetch.get('origin'))}), "
                     f"{esc(q.get('images_usable'))} usable images, {esc(q.get('excluded_count'))} excluded; "
                     f"split strategy <code>{esc(q.get('split_strategy'))}</code>.</p>")
        rows = []
        for strategy, s in q.get("splits", {}).items():
            leak = s.get("leakage", {})
            cls = "ok" if leak.get("clean") else "warn"
            rows.append([esc(strategy), *(esc(sum(s["counts"].get(k, {}).values())) for k in ("train", "val", "test")),
                         esc(leak.get("patients_shared", {}).get("train-test")),
                         esc(leak.get("hashes_shared", {}).get("train-test")),
                         f"<span class='{cls}'>{'clean' if leak.get('clean') else 'leaks'}</span>"])
        parts.append(_table(["strategy", "train", "val", "test", "patients shared train–test",
                             "identical files train–test", "leakage"], rows))
        excluded = q.get("excluded", [])
        if excluded:
            parts.append("<details><summary>Excluded files</summary>" + _table(
                ["file", "reason"], [[esc(e["path"]), esc(e["reason"])] for e in excluded[:500]]) + "</details>")
        parts.append(_img(root / "reports/plots/class_distribution.png", "class distribution per split"))
        parts.append(_img(root / "reports/plots/augmented_batch.png", "one augmented training batch", 520))

    parts.append("<h2>Training</h2>")
    for name, card in info["cards"].items():
        if not card:
            continue
        health = card.get("health", {})
        cls = "ok" if health.get("status") == "healthy" else "warn"
        problems = "; ".join(health.get("problems", []))
        parts.append(f"<h3>{esc(name)}</h3><p>Health: <span class='{cls}'>{esc(health.get('status'))}</span>"
                     f"{' — ' + esc(problems) if problems else ''}. Epochs {esc(card.get('epochs_run'))}, best "
                     f"{esc(card.get('best_epoch'))}, validation AUC {_fmt(card.get('validation', {}).get('auc'))}, "
                     f"{esc(card.get('parameters', {}).get('total'))} parameters.</p>")
        parts.append(_img(root / f"reports/train/{name}/curves.png", f"{name}: training curves"))

    parts.append("<h2>Test metrics</h2>")
    if metrics:
        parts.append(f"<p>At each model's shipped threshold (rule <code>{esc(metrics.get('threshold_source'))}"
                     "</code>); 95 % confidence intervals from bootstrap resamples of patients; Youden threshold "
                     "chosen on the validation split.</p>")
        parts.append(_table(
            ["model", "AUC", "AUC 95 % CI", "sensitivity", "specificity", "PPV", "NPV", "F1", "balanced acc.",
             "Brier", "Youden thr."],
            [[esc(r["model"]), _fmt(r["auc"]), esc(r["auc_ci95"]), _fmt(r["sensitivity"]), _fmt(r["specificity"]),
              _fmt(r["ppv"]), _fmt(r["npv"]), _fmt(r["f1"]), _fmt(r["balanced_accuracy"]), _fmt(r["brier"]),
              _fmt(r["youden_threshold"])] for r in metric_rows(info)]))
        if metrics.get("comparison"):
            parts.append(_table(["models", "AUC difference", "95 % CI", "p", "method"], [
                [f"{esc(c['a'])} − {esc(c['b'])}", f"{c['auc_difference']:+.3f}", _ci(c["ci95"]),
                 _fmt(c["p_value"]), esc(c["method"])] for c in metrics["comparison"]]))
        for name in metrics.get("models", {}):
            base = root / "reports/eval" / name
            kinds = ("confusion", "roc", "pr", "calibration")
            parts.append(f"<h3>{esc(name)}</h3>" + "".join(_img(base / f"{k}.png", f"{name}: {k}", 300) for k in kinds))

    parts.append("<h2>Grad-CAM</h2>")
    if cam:
        parts.append(f"<p>Share of heat in the outer {cam.get('border_margin', 0) * 100:.1f} % border band of every "
                     f"test image (uniform heat: {_fmt(cam.get('uniform_border_fraction'))}); a ratio above 1 means "
                     "attention to markers and edges rather than the lung field.</p>")
        parts.append(_table(["model", "layer", "border heat", "ratio to uniform", "images"], [
            [esc(n), esc(m["layer"]), _fmt(m["border_fraction_mean"]), _fmt(m["border_to_uniform_ratio"]),
             esc(m["images"])] for n, m in cam.get("models", {}).items()]))
        for name in cam.get("models", {}):
            parts.append(_img(root / "reports/gradcam" / f"{name}.png", f"{name}: Grad-CAM gallery"))

    agreement = info["agreement"]
    if agreement:
        parts.append("<h2>Reader agreement</h2>")
        parts.append(_table(["pair", "Cohen's kappa", "95 % CI"], [
            [esc(c["pair"]), _fmt(c["kappa"]), _ci(c["ci95"])] for c in agreement.get("cohen", [])]))
        if agreement.get("fleiss"):
            parts.append(f"<p>Fleiss' kappa across readers: {_fmt(agreement['fleiss']['kappa'])} "
                         f"(95 % CI {_ci(agreement['fleiss']['ci95'])}).</p>")

    parts.append("<h2>Lineage</h2>")
    parts.append(_table(["model", "model sha256", "manifest sha256", "splits sha256", "code commit", "created"], [
        [esc(n), f"<code>{esc(str(c.get('model_sha256'))[:16])}</code>",
         f"<code>{esc(str(c.get('data', {}).get('manifest_sha256'))[:16])}</code>",
         f"<code>{esc(str(c.get('data', {}).get('splits_sha256'))[:16])}</code>",
         f"<code>{esc(str(c.get('code', {}).get('commit'))[:12])}{' (dirty)' if c.get('code', {}).get('dirty') else ''}"
         "</code>", esc(c.get("created"))] for n, c in info["cards"].items() if c]))

    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>CXR pipeline report</title>"
            f"<style>{_CSS}</style><script>{_IMAGE_CHECK}</script></head><body>{''.join(parts)}</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    md = markdown(info)
    markdown_out.write_text(md)
    log.info("report: %s (%d KB), %s", out, len(page) // 1024, markdown_out)
    return {"html": out.as_posix(), "markdown": md, "rows": metric_rows(info)}


def build(models: Sequence[str], readers: str, eval_params: Mapping[str, Any],
          agreement_file: Path = Path("reports/agreement.json")) -> dict[str, Any]:
    """The report step: reader agreement when a readers CSV is configured (a stale one removed
    otherwise), then :func:`render`. Shared by the CLI and the Prefect task."""
    if readers:
        from cxr.evaluation.agreement import agreement_for_report

        agreement_for_report(readers, models[0], eval_params, agreement_file)
    else:
        agreement_file.unlink(missing_ok=True)
    return render(models)
