"""The ``cxr`` command: every pipeline step, callable by DVC, Prefect tasks or a person.

Bad input ends with one line on stderr (``cxr: error: …``) and exit status 1, never a traceback;
``CXR_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxr import __version__
from cxr.config import load_config, load_params
from cxr.errors import CxrError
from cxr.logs import setup_logging
from cxr.safe_text import printable
from cxr.workspace import HERE

log = logging.getLogger("cxr")


def _cmd_fetch(args: argparse.Namespace) -> int:
    from cxr.data.fetch import fetch

    cfg = load_config(args.params, args.set)
    record = fetch(cfg.data, raw_dir=args.out, record_path=args.record)
    print(json.dumps({k: record[k] for k in ("source", "files", "tree_sha256")}))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from cxr.data.prepare import prepare

    cfg = load_config(args.params, args.set)
    result = prepare(args.raw, cfg.split, cfg.prepare, prepared_dir=args.out, reports_dir=args.reports)
    print(json.dumps({k: result[k] for k in ("manifest_sha256", "splits_sha256")}))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from cxr.training.train import train

    cfg = load_config(args.params, args.set)
    models = args.model or list(cfg.train.models)
    if not models:
        raise CxrError("no model to train: pass --model NAME or list train.models in params.yaml")
    for name in models:
        card = train(name, cfg, splits_csv=args.splits, models_dir=args.models, reports_dir=args.reports)
        print(
            json.dumps(
                {
                    "model": name,
                    "model_sha256": card["model_sha256"],
                    "val_auc": card["validation"]["auc"],
                    "health": card["health"]["status"],
                }
            )
        )
    return 0


def _cmd_preview(args: argparse.Namespace) -> int:
    from cxr.training.preview import augmented_batch

    cfg = load_config(args.params, args.set)
    out = augmented_batch(cfg.input, cfg.train.common["seed"], splits_csv=args.splits, out=args.out)
    print(json.dumps({"plot": str(out)}))
    return 0


def _models(params: dict, given: list[str] | None) -> list[str]:
    from cxr.training.ensemble import evaluated_models

    models = given or evaluated_models(params)
    if not models:
        raise CxrError("no model given: pass --model NAME or list train.models in params.yaml")
    return models


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cxr.evaluation.evaluate import ci_text, evaluate_folder, evaluate_models

    cfg = load_config(args.params, args.set)
    params, eval_cfg = cfg.as_params(), cfg.evaluate
    if args.data:  # one saved model on any labelled folder
        if not args.model or len(args.model) != 1:
            raise CxrError("--data needs exactly one --model (a .keras file or a model name)")
        from cxr.inference.loading import model_file

        model = str(model_file(args.model[0]))
        fixed = eval_cfg.threshold_source == "fixed"
        result = evaluate_folder(
            model, args.data, eval_cfg.threshold if fixed else None, eval_cfg.bootstrap, eval_cfg.seed
        )
        if args.json:
            print(json.dumps(result))
        else:
            ci = result["ci95"]["auc"]
            print(
                f"{model} on {args.data}: n={result['n']} AUC {result['auc']:.4f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}) "
                if ci
                else f"{model} on {args.data}: AUC {result['auc']} ",
                end="",
            )
            print(
                " ".join(
                    f"{k}={result[k]:.4f}"
                    for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv")
                    if result[k] is not None
                )
            )
            if result["skipped"]:
                print(f"{len(result['skipped'])} unreadable file(s) skipped", file=sys.stderr)
        return 0
    summary = evaluate_models(_models(params, args.model), eval_cfg, cfg.input)
    if args.json:
        print(json.dumps(summary))
        return 0
    sets = [(f"external {name}", data["models"]) for name, data in summary["external"].items()]
    for label, by_model in [*sets, ("test split", summary["models"])]:
        for name, m in by_model.items():
            print(
                f"{name} on {label}: n={m['n']} AUC {_num(m['auc'])} (95% CI {ci_text(m['ci95'].get('auc'))}) "
                f"sensitivity {_num(m['sensitivity'])} specificity {_num(m['specificity'])} "
                f"accuracy {_num(m['accuracy'])} at threshold {m['threshold']:.3f}"
            )
    return 0


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cmd_external(args: argparse.Namespace) -> int:
    from cxr.data.external_sets import external_sets, index_external

    sets = external_sets(load_config(args.params, args.set).evaluate)
    names = args.name or list(sets)
    unknown = [n for n in names if n not in sets]
    if unknown:
        raise CxrError(
            f"no external set named {', '.join(unknown)} in evaluate.external (configured: {', '.join(sets) or 'none'})"
        )
    for name in names:
        summary = index_external(name, sets[name], out_dir=args.out)
        print(json.dumps({k: summary[k] for k in ("name", "images", "class_counts", "content_sha256")}))
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from cxr.training.ensemble import build_ensemble

    params = load_params(args.params, args.set)
    card = build_ensemble(params, splits_csv=args.splits, models_dir=args.models)
    print(
        json.dumps(
            {"model": "ensemble", "enabled": card is not None, "model_sha256": card["model_sha256"] if card else None}
        )
    )
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from cxr.evaluation.explain import explain_models

    cfg = load_config(args.params, args.set)
    models = _models({"train": {"models": list(cfg.train.models)}}, args.model)  # Grad-CAM: one network, no ensemble
    summary = explain_models(models, cfg.evaluate, cfg.input)
    print(json.dumps({m: v["border_to_uniform_ratio"] for m, v in summary["models"].items()}))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cxr.reporting.report import build

    cfg = load_config(args.params, args.set)
    result = build(_models(cfg.as_params(), args.model), cfg.report.readers, cfg.evaluate)
    print(json.dumps({"html": result["html"]}))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from cxr.inference.loading import model_file
    from cxr.inference.predict import predict

    failures = predict(
        model_file(args.model), args.paths, threshold=args.threshold, gradcam_dir=args.gradcam, as_json=args.json
    )
    return 1 if failures else 0


def _cmd_agreement(args: argparse.Namespace) -> int:
    from cxr.evaluation.agreement import agreement, read_readers

    _, readers = read_readers(args.readers)
    result = agreement(readers, n_boot=args.bootstrap)
    if args.json:
        print(json.dumps(result))
    else:
        for c in result["cohen"]:
            ci = c["ci95"]
            print(f"Cohen's kappa {c['pair']}: {c['kappa']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))
        if result["fleiss"]:
            print(f"Fleiss' kappa ({len(result['readers'])} readers): {result['fleiss']['kappa']:.3f}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from cxr.provenance.lineage_log import audit_model, models_for_data

    if args.data:
        found = models_for_data(args.data)
        if args.json:
            print(json.dumps(found))
        for r in found if not args.json else []:
            d = r.get("data", {})
            print(
                f"{r['model']}  {r['model_sha256'][:12]}  manifest {str(d.get('manifest_sha256'))[:12]}  "
                f"created {r.get('created')}  run {r.get('run', {}).get('driver')}"
            )
        if not found:
            print(f"no model in the lineage log was trained on data {args.data}", file=sys.stderr)
        return 0 if found else 1
    if not args.model_file:
        raise CxrError("give a MODEL_FILE, or --data HASH")
    if not Path(args.model_file).is_file():
        raise CxrError(f"{args.model_file}: file not found")
    result = audit_model(args.model_file)
    if args.json:
        print(json.dumps(result))
        return 0 if result["verified"] else 1
    status = "verified" if result["verified"] else "unverified: " + "; ".join(result["problems"])
    print(f"{result['model_file']}  sha256 {result['sha256'][:12]}  {status}")
    r = result["record"]
    if r:
        d = r.get("data", {})
        print(
            f"  data     source {d.get('source')} {d.get('origin') or ''}  kaggle version "
            f"{d.get('kaggle_version') or 'n/a'}  raw {str(d.get('raw_sha256'))[:12]}"
        )
        print(
            f"  manifest {str(d.get('manifest_sha256'))[:12]}  splits {str(d.get('splits_sha256'))[:12]}  "
            f"strategy {d.get('split_strategy')}"
        )
        for split, counts in (d.get("counts") or {}).items():
            print(f"  {split:<8} " + "  ".join(f"{c} {n}" for c, n in counts.items()))
        code = r.get("code", {})
        print(f"  code     {code.get('commit')}{' (dirty)' if code.get('dirty') else ''}")
        run = r.get("run", {})
        print(
            f"  run      {run.get('driver')} {run.get('flow_run_id') or run.get('stage') or ''}  created "
            f"{r.get('created')}"
        )
        val = r.get("metrics", {}).get("validation", {})
        print(
            f"  metrics  validation AUC {val.get('auc')}  sensitivity {val.get('sensitivity')}  "
            f"specificity {val.get('specificity')}"
        )
        t = r.get("params", {}).get("train", {})
        print(
            f"  params   epochs {t.get('epochs')} lr {t.get('learning_rate')} class_weight {t.get('class_weight')} "
            f"seed {t.get('seed')}"
        )
    return 0 if result["verified"] else 1


def _cmd_stages(args: argparse.Namespace) -> int:
    from cxr.stages import STAGES, dvc_yaml, dvc_yaml_drift

    if args.write:
        Path(args.dvc_yaml).write_text(dvc_yaml())
        print(f"wrote {args.dvc_yaml} from the stage registry")
        return 0
    if args.check:
        problems = dvc_yaml_drift(args.dvc_yaml)
        for line in problems:
            print(f"{args.dvc_yaml}: {line}", file=sys.stderr)
        if problems:
            print("run: cxr stages --write", file=sys.stderr)
        return 1 if problems else 0
    for st in STAGES:
        print(
            json.dumps(
                {
                    "stage": st.name,
                    "entry": st.entry,
                    "params": list(st.params),
                    "inputs": list(st.inputs),
                    "code": list(st.code()),
                }
            )
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cxr {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_steps(sub)
    _add_model_steps(sub)
    _add_tools(sub)
    return parser


def common(p: argparse.ArgumentParser) -> None:
    """Add the options every pipeline step takes: the parameters file and ``-S`` overrides.

    Args:
        p: a subcommand's parser.
    """
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, e.g. -S data.source=dir (repeatable)",
    )


def _add_data_steps(sub: Any) -> None:
    p = sub.add_parser("fetch", help="bring the configured data source into data/raw")
    common(p)
    p.add_argument("--out", default=str(HERE.raw))
    p.add_argument("--record", default=str(HERE.fetch_record))
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("prepare", help="manifest, quality report and split of data/raw")
    common(p)
    p.add_argument("--raw", default=str(HERE.raw))
    p.add_argument("--out", default=str(HERE.prepared))
    p.add_argument("--reports", default=str(HERE.reports))
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("external", help="index the external validation sets of evaluate.external")
    common(p)
    p.add_argument("--name", action="append", help="set name (repeatable); default: every configured set")
    p.add_argument("--out", default=str(HERE.external), help="index folder (default: data/external)")
    p.set_defaults(func=_cmd_external)


def _add_model_steps(sub: Any) -> None:
    p = sub.add_parser("train", help="train models of the registry (default: train.models)")
    common(p)
    p.add_argument("--model", action="append", help="model name (repeatable); default: train.models")
    p.add_argument("--splits", default=str(HERE.splits))
    p.add_argument("--models", default=str(HERE.models))
    p.add_argument("--reports", default=str(HERE.reports / "train"))
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("preview", help="plot one augmented training batch (and warm the image cache)")
    common(p)
    p.add_argument("--splits", default=str(HERE.splits))
    p.add_argument("--out", default=str(HERE.preview_plot))
    p.set_defaults(func=_cmd_preview)

    p = sub.add_parser("evaluate", help="test-split and external-set metrics of the models, or one model on a folder")
    common(p)
    p.add_argument("--model", action="append", help="model name or .keras file (repeatable)")
    p.add_argument("--data", help="a labelled folder in Kaggle layout to score --model on")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("ensemble", help="average the models of ensemble.members into ensemble/ensemble.keras")
    common(p)
    p.add_argument("--splits", default=str(HERE.splits))
    p.add_argument("--models", default=str(HERE.models))
    p.set_defaults(func=_cmd_ensemble)

    p = sub.add_parser("explain", help="Grad-CAM galleries and border-heat figures on the test split")
    common(p)
    p.add_argument("--model", action="append")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("report", help="write reports/report.html and reports/report.md")
    common(p)
    p.add_argument("--model", action="append")
    p.set_defaults(func=_cmd_report)


def _add_tools(sub: Any) -> None:
    p = sub.add_parser("predict", help="label and P(pneumonia) for images, folders or DICOM files")
    p.add_argument("--model", required=True, help="model name (models/NAME.keras) or a .keras file")
    p.add_argument("paths", nargs="+", help="image files or folders (JPEG, PNG, BMP, DICOM)")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="decision threshold (default: the model's shipped threshold, from evaluate or its card)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--gradcam", metavar="DIR", help="also write Grad-CAM overlays into DIR")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("stages", help="the stage registry: list each step's code and settings, or write dvc.yaml")
    p.add_argument("--write", action="store_true", help="regenerate dvc.yaml from the registry")
    p.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml disagrees with the registry")
    p.add_argument("--dvc-yaml", default=str(HERE.dvc_yaml))
    p.set_defaults(func=_cmd_stages)

    p = sub.add_parser("agreement", help="Cohen's and Fleiss' kappa for a readers CSV")
    p.add_argument("readers", help="CSV: a key column (path/image) and one 0/1 column per reader")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_agreement)

    p = sub.add_parser("audit", help="which data, params, code and run produced a model file")
    p.add_argument("model_file", nargs="?", help="a .keras file")
    p.add_argument("--data", metavar="HASH", help="list the models trained on data with this hash (prefix)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_audit)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``cxr`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 after a one-line error on stderr, 130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except CxrError as exc:
        if os.environ.get("CXR_DEBUG"):
            raise
        print(f"cxr: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # a read-only folder, a full disk, a vanished file: the system's own words, on one line
        if os.environ.get("CXR_DEBUG"):
            raise
        print(f"cxr: error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cxr: interrupted; outputs already in place are complete, partial ones were discarded", file=sys.stderr)
        return 130


def os_error_line(exc: OSError) -> str:
    """One line for an operating-system error: the file it concerns, what went wrong and the fix.

    Args:
        exc: the error (``PermissionError``, ``ENOSPC``, ``FileNotFoundError``...).

    Returns:
        ``"PATH: reason (fix)"``, the path with control characters escaped.
    """
    import errno

    where = printable(exc.filename) if exc.filename is not None else "file system"
    reason = exc.strerror or exc.__class__.__name__
    fixes = {
        errno.ENOSPC: "free disk space and rerun; completed outputs were kept",
        errno.EDQUOT: "free disk space and rerun; completed outputs were kept",
        errno.EACCES: "make it writable (or readable) for this user and rerun",
        errno.EPERM: "make it writable (or readable) for this user and rerun",
        errno.EROFS: "the file system is read-only; write the outputs elsewhere",
        errno.ENOENT: "check the path",
    }
    fix = fixes.get(exc.errno or 0)
    return f"{where}: {reason}" + (f" ({fix})" if fix else "")


if __name__ == "__main__":
    raise SystemExit(main())
