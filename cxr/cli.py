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

from cxr import __version__, models_cli
from cxr.config import Params, load_config
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
    result = prepare(
        args.raw, cfg.split, cfg.prepare, prepared_dir=args.out, reports_dir=args.reports, input_params=cfg.input
    )
    print(json.dumps({k: result[k] for k in ("manifest_sha256", "splits_sha256")}))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from cxr.provenance.model_store import Shipped
    from cxr.training.train import train

    cfg = load_config(args.params, args.set)
    models = args.model or list(cfg.train.models)
    if not models:
        raise CxrError("no model to train: pass --model NAME or list train.models in params.yaml")
    for name in models:
        card = train(name, cfg, splits_csv=args.splits, models_dir=args.models, reports_dir=args.reports, install=False)
        line = {
            "model": name,
            "model_sha256": card["model_sha256"],
            "val_auc": card["validation"].get("auc"),
            "health": card["health"]["status"],
        }
        if not args.no_promote:
            from cxr.evaluation.promotion import promote

            decision = promote(name, cfg, args.splits, Shipped(name, Path(args.models), Path(args.reports)))
            line.update(promoted=decision["promoted"], promotion=decision["outcome"])
        print(json.dumps(line))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from cxr.evaluation.promotion import promote
    from cxr.provenance.model_store import Shipped

    cfg = load_config(args.params, args.set)
    for name in args.model or list(cfg.train.models):
        decision = promote(name, cfg, args.splits, Shipped(name, Path(args.models), Path(args.reports)))
        print(json.dumps({k: decision[k] for k in ("model", "promoted", "outcome", "reasons", "line")}))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cxr.inference.export import export_model, write_index

    cfg = load_config(args.params, args.set)
    formats = [args.format] if args.format else list(cfg.export.formats)
    names = args.model or list(cfg.train.models)
    if args.out and (len(formats) != 1 or len(names) != 1):
        raise CxrError("--out: give it with one --model and one --format (the default is exports/<model>/<format>)")
    for name in names:
        for fmt in formats:
            record = export_model(name, fmt, args.out)
            print(json.dumps({k: record[k] for k in ("model", "format", "folder", "file", "sha256", "threshold")}))
    if not args.out:
        write_index()
    return 0


def _cmd_preview(args: argparse.Namespace) -> int:
    from cxr.training.preview import augmented_batch

    cfg = load_config(args.params, args.set)
    out = augmented_batch(cfg.input, cfg.train.common["seed"], splits_csv=args.splits, out=args.out)
    print(json.dumps({"plot": str(out)}))
    return 0


def _models(cfg: Params, given: list[str] | None, with_ensemble: bool = True) -> list[str]:
    from cxr.training.ensemble import evaluated_models

    models = given or (evaluated_models(cfg) if with_ensemble else list(cfg.train.models))
    if not models:
        raise CxrError("no model given: pass --model NAME or list train.models in params.yaml")
    return models


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cxr.evaluation.evaluate import evaluate_folder, evaluate_models
    from cxr.files import dumps_json

    cfg = load_config(args.params, args.set)
    eval_cfg = cfg.evaluate
    if args.data:  # one saved model on any labelled folder
        if not args.model or len(args.model) != 1:
            raise CxrError("--data needs exactly one --model (a .keras file or a model name)")
        from cxr.inference.loading import model_file

        model = str(model_file(args.model[0]))
        fixed = eval_cfg.threshold_source == "fixed"
        result = evaluate_folder(
            model,
            args.data,
            eval_cfg.threshold if fixed else None,
            eval_cfg.bootstrap,
            eval_cfg.seed,
            threshold_source="fixed (evaluate.threshold)",
        )
        if args.json:
            print(dumps_json(result))
        else:
            print(_evaluate_line(f"{printable(model)} on {printable(args.data)}", result, result["threshold_source"]))
            if result["skipped"]:
                print(f"{len(result['skipped'])} unreadable file(s) skipped", file=sys.stderr)
        return 0
    summary = evaluate_models(_models(cfg, args.model), eval_cfg, cfg.input)
    if args.json:
        print(dumps_json(summary))
        return 0
    sets = [(f"external {name}", data["models"]) for name, data in summary["external"].items()]
    for label, by_model in [*sets, ("test split", summary["models"])]:
        for name, m in by_model.items():
            print(_evaluate_line(f"{name} on {label}", m, (m.get("operating_point") or {}).get("rule")))
    return 0


def _evaluate_line(what: str, m: dict[str, Any], rule: str | None) -> str:
    """One model on one data set, on one line: AUC with its CI, then the figures at the shipped threshold."""
    from cxr.evaluation.evaluate import ci_text
    from cxr.formatting import num

    threshold = m.get("threshold", (m.get("at_threshold") or {}).get("threshold"))
    return (
        f"{what}: n={m['n']} AUC {num(m['auc'])} (95% CI {ci_text((m.get('ci95') or {}).get('auc'))}) "
        f"sensitivity {num(m['sensitivity'])} specificity {num(m['specificity'])} accuracy {num(m['accuracy'])} "
        f"at threshold {num(threshold)}" + (f" ({rule})" if rule else "")
    )


def _cmd_external(args: argparse.Namespace) -> int:
    from cxr.data.external_sets import external_sets, index_external

    cfg = load_config(args.params, args.set)
    sets = external_sets(cfg.evaluate)
    names = args.name or list(sets)
    unknown = [n for n in names if n not in sets]
    if unknown:
        raise CxrError(
            f"no external set named {', '.join(unknown)} in evaluate.external (configured: {', '.join(sets) or 'none'})"
        )
    for name in names:
        summary = index_external(name, sets[name], out_dir=args.out, extra_roots=cfg.data.link_roots)
        print(json.dumps({k: summary[k] for k in ("name", "images", "class_counts", "content_sha256")}))
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from cxr.training.ensemble import build_ensemble

    cfg = load_config(args.params, args.set)
    card = build_ensemble(cfg, splits_csv=args.splits, models_dir=args.models)
    print(
        json.dumps(
            {"model": "ensemble", "enabled": card is not None, "model_sha256": card["model_sha256"] if card else None}
        )
    )
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from cxr.evaluation.explain import explain_models

    cfg = load_config(args.params, args.set)
    models = _models(cfg, args.model, with_ensemble=False)  # Grad-CAM: one network, no ensemble
    summary = explain_models(models, cfg.evaluate, cfg.input)
    from cxr.files import dumps_json

    print(dumps_json({m: v["border_to_uniform_ratio"] for m, v in summary["models"].items()}))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cxr.reporting.report import build

    cfg = load_config(args.params, args.set)
    result = build(_models(cfg, args.model), cfg.report.readers, cfg.evaluate)
    print(json.dumps({"html": result["html"]}))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from cxr.common.images import ImageLimits
    from cxr.inference.loading import model_file
    from cxr.inference.predict import predict

    # the decode caps of input.max_image_*: from --params, else ./params.yaml when there is one, else the defaults
    params = args.params or ("params.yaml" if Path("params.yaml").is_file() else None)
    limits = ImageLimits.of(load_config(params).input) if params else ImageLimits.of()
    failures = predict(
        model_file(args.model),
        args.paths,
        threshold=args.threshold,
        gradcam_dir=args.gradcam,
        as_json=args.json,
        allow_unverified=args.allow_unverified,
        limits=limits,
        allow_outside_intended_use=args.allow_outside_intended_use,
    )
    return 1 if failures else 0


def _add_intended_use_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-outside-intended-use",
        action="store_true",
        help="score DICOM files whose metadata says they are not CR/DX chest radiographs (CT, MR, lateral...), "
        "marked intended_use: false, instead of refusing them",
    )


def probability(text: str) -> float:
    """An argparse type: a finite number from 0 to 1 (``nan``, ``5`` and ``-1`` are refused).

    Args:
        text: the option's value.

    Returns:
        The number.
    """
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{printable(text)} is not a number; give a probability from 0 to 1") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{printable(text)} is not a probability; give a number from 0 to 1")
    return value


def _cmd_serve(args: argparse.Namespace) -> int:
    from cxr.serving import require_serve_extra

    require_serve_extra()
    from cxr.common.images import ImageLimits
    from cxr.serving.app import serve

    # the decode caps, as cxr predict reads them: --params, else ./params.yaml when there is one, else the defaults
    params = args.params or ("params.yaml" if Path("params.yaml").is_file() else None)
    limits = ImageLimits.of(load_config(params).input) if params else ImageLimits.of()
    serve(
        args.model,
        host=args.host,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        threshold=args.threshold,
        batch_size=args.batch_size,
        limits=limits,
        allow_outside_intended_use=args.allow_outside_intended_use,
        watch_s=args.watch,
        max_memory_mb=args.max_memory_mb,
    )
    return 0


def _cmd_agreement(args: argparse.Namespace) -> int:
    from cxr.evaluation.agreement import UNDEFINED, agreement, read_readers
    from cxr.files import dumps_json
    from cxr.formatting import interval, num

    if not 0 <= args.bootstrap <= 100_000:
        raise CxrError(f"--bootstrap {args.bootstrap}: give a number of resamples from 0 to 100000 (e.g. 1000)")
    _, readers = read_readers(args.readers, min_readers=2)
    result = agreement(readers, n_boot=args.bootstrap)
    if args.json:
        print(dumps_json(result))
        return 0

    def kappa_text(entry: dict[str, Any]) -> str:
        if entry["kappa"] is None:
            return UNDEFINED
        ci = entry["ci95"]
        return num(entry["kappa"]) + (f" (95% CI {interval(*ci)})" if ci else "")

    for c in result["cohen"]:
        print(f"Cohen's kappa {printable(c['pair'])}: {kappa_text(c)}")
    if result["fleiss"]:
        print(f"Fleiss' kappa ({len(result['readers'])} readers): {kappa_text(result['fleiss'])}")
    return 0


def _show(value: object, width: int | None = None) -> str:
    """A lineage record's text, escaped for one terminal line (its first ``width`` characters when given)."""
    return printable(str(value)[:width] if width else value)


def _cmd_audit(args: argparse.Namespace) -> int:
    from cxr.files import dumps_json
    from cxr.provenance.lineage_log import audit_model

    if args.data:
        return _audit_data(args.data, args.json)
    if not args.model_file:
        raise CxrError("give a MODEL_FILE, or --data HASH")
    result = audit_model(args.model_file)
    if args.json:
        print(dumps_json(result))
        return 0 if result["verified"] else 1
    status = "verified" if result["verified"] else "unverified: " + "; ".join(result["problems"])
    print(f"{_show(result['model_file'])}  sha256 {result['sha256'][:12]}  {status}")
    if result["record"]:
        _print_lineage_record(result["record"])
    for event in result.get("events") or []:  # promotions, rollbacks and manual promotions of these bytes
        print(
            f"  event    {_show(event.get('event'))} {_show(event.get('outcome') or '')}  shipped "
            f"{_show(event.get('shipped'))}  logged {_show(event.get('logged'))}"
        )
    return 0 if result["verified"] else 1


def _audit_data(data: str, as_json: bool) -> int:
    """``cxr audit --data HASH``: the models the lineage log says were trained on that data, one a line."""
    from cxr.files import dumps_json
    from cxr.provenance.lineage_log import models_for_data

    found = models_for_data(data)
    if not found:
        raise CxrError(
            f"no model in the lineage log was trained on data {_show(data)}; "
            "check the hash (cxr audit MODEL_FILE prints a model's data hashes)"
        )
    if as_json:
        print(dumps_json(found))
        return 0
    for r in found:
        d = r.get("data") or {}
        print(
            f"{_show(r['model'])}  {_show(r['model_sha256'], 12)}  manifest {_show(d.get('manifest_sha256'), 12)}  "
            f"created {_show(r.get('created'))}  run {_show((r.get('run') or {}).get('driver'))}"
        )
    return 0


def _print_lineage_record(r: dict[str, Any]) -> None:
    """A model's lineage record, one indented line per part: data, manifest, counts, code, run, metrics, params."""
    d = r.get("data") or {}
    print(
        f"  data     source {_show(d.get('source'))} {_show(d.get('origin') or '')}  kaggle version "
        f"{_show(d.get('kaggle_version') or 'n/a')}  raw {_show(d.get('raw_sha256'), 12)}"
    )
    print(
        f"  manifest {_show(d.get('manifest_sha256'), 12)}  splits {_show(d.get('splits_sha256'), 12)}  "
        f"strategy {_show(d.get('split_strategy'))}"
    )
    for split, counts in (d.get("counts") or {}).items():
        print(f"  {_show(split):<8} " + "  ".join(f"{_show(c)} {_show(n)}" for c, n in counts.items()))
    code = r.get("code") or {}
    print(f"  code     {_show(code.get('commit'))}{' (dirty)' if code.get('dirty') else ''}")
    run = r.get("run") or {}
    print(
        f"  run      {_show(run.get('driver'))} {_show(run.get('flow_run_id') or run.get('stage') or '')}  created "
        f"{_show(r.get('created'))}"
    )
    val = (r.get("metrics") or {}).get("validation") or {}
    print(
        f"  metrics  validation AUC {_show(val.get('auc'))}  sensitivity {_show(val.get('sensitivity'))}  "
        f"specificity {_show(val.get('specificity'))}"
    )
    t = (r.get("params") or {}).get("train") or {}
    print(
        f"  params   epochs {_show(t.get('epochs'))} lr {_show(t.get('learning_rate'))} "
        f"class_weight {_show(t.get('class_weight'))} seed {_show(t.get('seed'))}"
    )


def _cmd_stages(args: argparse.Namespace) -> int:
    from cxr.stages import STAGES, dvc_yaml, dvc_yaml_drift, write_fingerprints

    if args.fingerprints:
        print(json.dumps({"fingerprints": {name: value[:12] for name, value in write_fingerprints().items()}}))
        return 0
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
                    "fingerprint": st.fingerprint(),
                }
            )
        )
    return 0


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help (unless the help already says it), and keeps the
    line breaks of the usage examples."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and default not in (None, False, [], argparse.SUPPRESS)
            and "default" not in text.lower()
        ):
            text += " (default: %(default)s)"
        return text


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

DESCRIPTION = """\
cxr: every step of the chest X-ray pneumonia pipeline (fetch, prepare, train, evaluate, explain,
report) and the tools around it (predict, serve, audit), callable by DVC, Prefect tasks or a person."""
EPILOG = """\
'cxr COMMAND --help' shows a command's options, their defaults and an example.
An error ends with one line on stderr (cxr: error: ...) and exit status 1; CXR_DEBUG=1 shows the traceback.

example:
  cxr fetch && cxr prepare && cxr train --model smallnet && cxr evaluate --model smallnet"""

# one or more usage examples per subcommand (tests/test_cli.py checks that each has one)
EXAMPLES = {
    "fetch": [
        "cxr fetch                 # params.yaml's source (auto: Kaggle with credentials, else the demo sample)",
        "cxr fetch -S data.source=dir -S data.dir=../shared/data/chest_xray_224",
    ],
    "prepare": ["cxr prepare", "cxr prepare -S split.strategy=seed -S split.seed=7"],
    "external": [
        "cxr external -S 'evaluate.external={guangzhou_test: ../shared/data/chest_xray_224_external_val}'",
    ],
    "train": [
        "cxr train --model smallnet -S train.smallnet.epochs=3   # trains, then promotes only if no worse",
        "cxr train --model cxrnet --no-promote                   # store the version; cxr promote decides",
    ],
    "promote": [
        "cxr promote --model cxrnet",
        "cxr promote -S promotion.policy=always      # ship the newest versions whatever they score",
    ],
    "models": [
        "cxr models list cxrnet",
        "cxr models show 3f2a9c1b",
        "cxr models rollback cxrnet",
    ],
    "export": [
        "cxr export                                   # every model of train.models, in export.formats",
        "cxr export --model cxrnet --format savedmodel --out /tmp/cxrnet-savedmodel",
    ],
    "preview": ["cxr preview --out reports/augmented_batch.png"],
    "evaluate": [
        "cxr evaluate                # every model of train.models: test split and external sets",
        "cxr evaluate --model smallnet --data /path/to/labelled/folder --json",
    ],
    "ensemble": ["cxr ensemble -S 'ensemble.members=[smallnet, cxrnet]'"],
    "explain": ["cxr explain --model cxrnet"],
    "report": ["cxr report", "cxr report --model smallnet --model cxrnet"],
    "predict": [
        "cxr predict --model cxrnet chest1.jpeg scans/ study.dcm",
        "cxr predict --model models/smallnet.keras scans/ --json --gradcam overlays/",
    ],
    "serve": [
        "cxr serve --model cxrnet",
        "curl -F file=@chest1.jpeg http://127.0.0.1:8000/predict",
    ],
    "stages": ["cxr stages --check", "cxr stages --write"],
    "agreement": ["cxr agreement readers.csv --bootstrap 2000 --json"],
    "audit": ["cxr audit models/cxrnet.keras", "cxr audit --data 3f2a9c"],
}


def build_parser() -> argparse.ArgumentParser:
    """The ``cxr`` argument parser: every subcommand, with help, defaults and usage examples.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(prog="cxr", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"cxr {__version__}")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=None,
        help="how much to log, any case (default: $CXR_LOG_LEVEL, else INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_steps(sub)
    _add_model_steps(sub)
    _add_tools(sub)
    models_cli.add_parser(sub, common)
    summaries = {action.dest: action.help for action in getattr(sub, "_choices_actions", [])}
    for name, p in sub.choices.items():
        p.formatter_class = HelpFormatter
        p.description = p.description or summaries.get(name)
        p.epilog = "example:\n" + "\n".join(f"  {line}" for line in EXAMPLES.get(name, []))
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
        help="override a parameter of the file, e.g. -S data.source=dir (repeatable; default: none)",
    )


def _add_data_steps(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fetch", help="bring the configured data source into data/raw")
    common(p)
    p.add_argument("--out", default=str(HERE.raw), help="folder to fill with the images")
    p.add_argument("--record", default=str(HERE.fetch_record), help="JSON record of what was fetched, and from where")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("prepare", help="manifest, quality report and split of data/raw")
    common(p)
    p.add_argument("--raw", default=str(HERE.raw), help="the fetched images (Kaggle layout)")
    p.add_argument("--out", default=str(HERE.prepared), help="folder for manifest.csv and splits.csv")
    p.add_argument("--reports", default=str(HERE.reports), help="folder for the data-quality report")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("external", help="index the external validation sets of evaluate.external")
    common(p)
    p.add_argument("--name", action="append", help="set name (repeatable); default: every configured set")
    p.add_argument("--out", default=str(HERE.external), help="folder for one index CSV per set")
    p.set_defaults(func=_cmd_external)


def _add_model_steps(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``train``, ``promote``, ``export`` and ``preview``, then the evaluation steps."""
    p = sub.add_parser("train", help="train models of the registry (default: train.models)")
    common(p)
    p.add_argument("--model", action="append", help="model name (repeatable); default: train.models")
    p.add_argument("--splits", default=str(HERE.splits), help="the split table written by prepare")
    p.add_argument("--models", default=str(HERE.models), help="folder for NAME.keras and NAME.card.json")
    p.add_argument("--reports", default=str(HERE.reports / "train"), help="folder for training histories and plots")
    p.add_argument(
        "--no-promote",
        action="store_true",
        help="store the new version only; `cxr promote` decides whether it ships (dvc repro's train stage)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "promote", help="ship the newest trained version of each model if it beats the shipped one (promotion.*)"
    )
    common(p)
    p.add_argument("--model", action="append", help="model name (repeatable); default: train.models")
    p.add_argument("--splits", default=str(HERE.splits), help="the split table (reference set when none is configured)")
    p.add_argument("--models", default=str(HERE.models), help="the shipped models' folder")
    p.add_argument("--reports", default=str(HERE.reports / "train"), help="the shipped models' reports folder")
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser(
        "export", help="export shipped models to ONNX, SavedModel or LiteRT with their card, checked against Keras"
    )
    common(p)
    p.add_argument("--model", action="append", help="model name or .keras file (repeatable); default: train.models")
    p.add_argument("--format", choices=("onnx", "savedmodel", "litert"), help="default: export.formats")
    p.add_argument("--out", help="the folder to write (default: exports/<model>/<format>)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("preview", help="plot one augmented training batch (and warm the image cache)")
    common(p)
    p.add_argument("--splits", default=str(HERE.splits), help="the split table written by prepare")
    p.add_argument("--out", default=str(HERE.preview_plot), help="the plot to write (PNG)")
    p.set_defaults(func=_cmd_preview)
    _add_evaluation_steps(sub)


def _add_evaluation_steps(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``evaluate``, ``ensemble``, ``explain`` and ``report``."""
    p = sub.add_parser("evaluate", help="test-split and external-set metrics of the models, or one model on a folder")
    common(p)
    p.add_argument(
        "--model", action="append", help="model name or .keras file (repeatable); default: the models of train.models"
    )
    p.add_argument(
        "--data",
        help="score one --model on this labelled folder (Kaggle layout); default: the test split and external sets",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a line per model")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("ensemble", help="average the models of ensemble.members into ensemble/ensemble.keras")
    common(p)
    p.add_argument("--splits", default=str(HERE.splits), help="the split table written by prepare")
    p.add_argument("--models", default=str(HERE.models), help="folder holding the member models")
    p.set_defaults(func=_cmd_ensemble)

    p = sub.add_parser("explain", help="Grad-CAM galleries and border-heat figures on the test split")
    common(p)
    p.add_argument("--model", action="append", help="model name (repeatable); default: train.models")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("report", help="write reports/report.html and reports/report.md")
    common(p)
    p.add_argument("--model", action="append", help="model name (repeatable); default: train.models and the ensemble")
    p.set_defaults(func=_cmd_report)


def _add_tools(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``predict``, ``serve``, ``stages``, ``agreement`` and ``audit``."""
    _add_predict(sub)
    _add_serve(sub)

    p = sub.add_parser("stages", help="the stage registry: list each step's code and settings, or write dvc.yaml")
    p.add_argument("--write", action="store_true", help="regenerate dvc.yaml from the registry")
    p.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml disagrees with the registry")
    p.add_argument(
        "--fingerprints",
        action="store_true",
        help="write data/code/<step>.sha256: what each step's code computes (the code stage of dvc.yaml)",
    )
    p.add_argument("--dvc-yaml", default=str(HERE.dvc_yaml), help="the DVC pipeline file to write or check")
    p.set_defaults(func=_cmd_stages)

    p = sub.add_parser("agreement", help="Cohen's and Fleiss' kappa for a readers CSV")
    p.add_argument("readers", help="CSV: a key column (path/image) and one 0/1 column per reader")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (under 10: no CI)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a line per pair")
    p.set_defaults(func=_cmd_agreement)

    p = sub.add_parser("audit", help="which data, params, code and run produced a model file")
    p.add_argument("model_file", nargs="?", help="a .keras file")
    p.add_argument(
        "--data",
        metavar="HASH",
        help="list the models trained on data with this hash (prefix); default: audit MODEL_FILE",
    )
    p.add_argument("--json", action="store_true", help="print the audit (or the models found) as JSON")
    p.set_defaults(func=_cmd_audit)


def _add_predict(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("predict", help="label and P(pneumonia) for images, folders or DICOM files")
    p.add_argument("--model", required=True, help="model name (models/NAME.keras) or a .keras file")
    p.add_argument("paths", nargs="+", help="image files or folders (JPEG, PNG, BMP, DICOM)")
    p.add_argument(
        "--threshold",
        type=probability,
        default=None,
        help="decision threshold from 0 to 1 (default: the model's shipped threshold, from evaluate or its card)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--gradcam", metavar="DIR", help="also write Grad-CAM overlays into DIR (default: none)")
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="use a model file whose sha256 is not the one its card names (refused by default)",
    )
    _add_intended_use_flag(p)
    p.add_argument(
        "--params",
        default=None,
        help="parameters file whose input.max_image_pixels / max_image_bytes cap the images read "
        "(default: ./params.yaml when present, else the built-in caps)",
    )
    p.set_defaults(func=_cmd_predict)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve a verified model over HTTP: POST /predict, GET /health, GET /model")
    p.add_argument("--model", required=True, help="model name (models/NAME.keras) or a .keras file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    p.add_argument(
        "--threshold",
        type=probability,
        default=None,
        help="decision threshold from 0 to 1 (default: the model's shipped threshold, from evaluate or its card)",
    )
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest upload accepted, in MB (413 above)")
    p.add_argument("--batch-size", type=int, default=16, help="most images scored in one model call")
    p.add_argument(
        "--max-memory-mb",
        type=float,
        default=2048.0,
        help="most memory the server may hold; what the model leaves of it bounds uploads and decodes "
        "in progress (503 with Retry-After past it)",
    )
    p.add_argument(
        "--watch",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="check the model's card this often and serve a promoted or rolled-back model without a restart "
        "(0: only on POST /reload)",
    )
    _add_intended_use_flag(p)
    p.add_argument(
        "--params",
        default=None,
        help="parameters file whose input.max_image_pixels / max_image_bytes cap the images decoded "
        "(default: ./params.yaml when present, else the built-in caps)",
    )
    p.set_defaults(func=_cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``cxr`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 after a one-line error on stderr, 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.log_level)
    except ValueError:  # a bad CXR_LOG_LEVEL (--log-level is checked by argparse)
        level = printable(os.environ.get("CXR_LOG_LEVEL", ""))
        parser.error(f"CXR_LOG_LEVEL={level}: choose from {', '.join(LOG_LEVELS)}")
    try:
        return int(args.func(args))
    except CxrError as exc:
        if os.environ.get("CXR_DEBUG"):
            raise
        print(f"cxr: error: {exc}", file=sys.stderr)
        if type(exc).__name__ == "CheckpointWriteFailed":  # HDF5 crashes at exit after a failed write
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(1)
        return 1
    except BrokenPipeError:
        # the reader went away (`cxr audit ... | head`): stop quietly, as other Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
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
