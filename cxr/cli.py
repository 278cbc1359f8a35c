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

from cxr import __version__
from cxr.errors import CxrError
from cxr.logs import setup_logging
from cxr.params import load_params, section

log = logging.getLogger("cxr")


def _cmd_fetch(args: argparse.Namespace) -> int:
    from cxr.fetch import fetch

    params = load_params(args.params, args.set)
    record = fetch(section(params, "data"), raw_dir=args.out, record_path=args.record)
    print(json.dumps({k: record[k] for k in ("source", "files", "tree_sha256")}))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from cxr.prepare import prepare

    params = load_params(args.params, args.set)
    result = prepare(args.raw, section(params, "split"), params.get("prepare") or {},
                     prepared_dir=args.out, reports_dir=args.reports)
    print(json.dumps({k: result[k] for k in ("manifest_sha256", "splits_sha256")}))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from cxr.train import train

    params = load_params(args.params, args.set)
    models = args.model or list((params.get("train") or {}).get("models") or [])
    if not models:
        raise CxrError("no model to train: pass --model NAME or list train.models in params.yaml")
    for name in models:
        card = train(name, params, splits_csv=args.splits, models_dir=args.models, reports_dir=args.reports)
        print(json.dumps({"model": name, "model_sha256": card["model_sha256"],
                          "val_auc": card["validation"]["auc"], "health": card["health"]["status"]}))
    return 0


def _cmd_preview(args: argparse.Namespace) -> int:
    from cxr.preview import augmented_batch

    params = load_params(args.params, args.set)
    out = augmented_batch(params, splits_csv=args.splits, out=args.out)
    print(json.dumps({"plot": str(out)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cxr {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
        p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter, e.g. -S data.source=dir (repeatable)")

    p = sub.add_parser("fetch", help="bring the configured data source into data/raw")
    common(p)
    p.add_argument("--out", default="data/raw")
    p.add_argument("--record", default="data/fetch.json")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("prepare", help="manifest, quality report and split of data/raw")
    common(p)
    p.add_argument("--raw", default="data/raw")
    p.add_argument("--out", default="data/prepared")
    p.add_argument("--reports", default="reports")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train models of the registry (default: train.models)")
    common(p)
    p.add_argument("--model", action="append", help="model name (repeatable); default: train.models")
    p.add_argument("--splits", default="data/prepared/splits.csv")
    p.add_argument("--models", default="models")
    p.add_argument("--reports", default="reports/train")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("preview", help="plot one augmented training batch (and warm the image cache)")
    common(p)
    p.add_argument("--splits", default="data/prepared/splits.csv")
    p.add_argument("--out", default="reports/plots/augmented_batch.png")
    p.set_defaults(func=_cmd_preview)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except CxrError as exc:
        if os.environ.get("CXR_DEBUG"):
            raise
        print(f"cxr: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cxr: interrupted; outputs already in place are complete, partial ones were discarded",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
