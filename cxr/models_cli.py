"""``cxr models``: list, show, promote and roll back stored model versions.

The champion history of a model is read from its lineage events (``lineage/models.jsonl``): each
promotion that shipped a version, and each ``cxr models promote`` pushes it; each ``cxr models
rollback`` pops one. A rollback reinstalls the previous champion's stored files, byte for byte
(same sha256; ``cxr audit`` verifies it), and is recorded as its own event. Outside ``dvc repro``
DVC then sees the shipped files as modified: ``dvc commit promote`` records the new state.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr.errors import CxrError
from cxr.formatting import num
from cxr.provenance import lineage_log as audit
from cxr.provenance import model_store
from cxr.provenance.model_store import Shipped, Version
from cxr.safe_text import printable
from cxr.workspace import HERE


def champion_history(name: str) -> list[str]:
    """Version ids that were champion of ``name``, oldest first, after rollbacks were applied.

    Each event that shipped a version pushes it (after the champion it replaced, when that one is not
    on the stack yet: a model shipped before the registry existed); each rollback pops one.
    """
    stack: list[str] = []

    def push(version: object) -> None:
        if isinstance(version, str) and (not stack or stack[-1] != version):
            stack.append(version)

    for event in audit.events(name):
        kind, shipped = event.get("event"), event.get("shipped")
        if kind == "rollback":
            if stack:
                stack.pop()
            push(shipped)
        elif event.get("promoted") or kind == "manual promotion":
            if not stack:
                push(event.get("champion"))
            push(shipped)
    return stack


def _status(
    version: Version, champion_id: str | None, decisions: dict[str, dict[str, Any]], rolled_back: set[str]
) -> str:
    if version.id == champion_id:
        return "champion"
    if version.id in rolled_back:
        return "rolled back"
    decision = decisions.get(version.id)
    if decision is None:
        return "stored"
    if decision.get("promoted"):
        return "retired"
    reasons = decision.get("reasons") or []
    return "challenger, not promoted" + (f": {reasons[0]}" if reasons else "")


def _row(version: Version, status: str) -> dict[str, Any]:
    summary = version.summary()
    del summary["sha256"]
    return {"model": version.name, **summary, "status": status, "folder": version.folder.as_posix()}


def list_versions(name: str | None, models_dir: Path) -> list[dict[str, Any]]:
    """Every stored version (of ``name``), oldest first, with its status."""
    stored = model_store.versions(name)
    events = [e for e in audit.events() if name is None or e.get("model") == name]  # the log, read once
    champions: dict[str, str | None] = {}  # each model's shipped file, hashed once
    rows = []
    for version in stored:
        if version.name not in champions:
            champion_sha = model_store.shipped_sha256(Shipped(version.name, models_dir))
            champions[version.name] = champion_sha[: model_store.ID_LENGTH] if champion_sha else None
        own = [e for e in events if e.get("model") == version.name]
        decisions = {str(e.get("version")): e for e in own if e.get("event") == "promotion"}
        rolled_back = {str(e.get("rolled_back")) for e in own if e.get("event") == "rollback"}
        rows.append(_row(version, _status(version, champions[version.name], decisions, rolled_back)))
    return rows


def show(ref: str) -> dict[str, Any]:
    """One version: its card, its lineage record, its promotion decisions and its stored files."""
    version = model_store.find(ref)
    card = version.card()
    training = [r for r in audit.training_records() if r["model_sha256"] == card.model_sha256]
    return {
        "model": version.name,
        "id": version.id,
        "folder": version.folder.as_posix(),
        "card": card.to_json(),
        "lineage": training[-1] if training else None,
        "events": [
            e for e in audit.events(version.name) if e.get("version") == version.id or e.get("shipped") == version.id
        ],
        "reports": sorted(p.name for p in version.reports.glob("*")) if version.reports.is_dir() else [],
        "images_trained_on": len(model_store.read_data_rows(version)),
    }


def _install(version: Version, models_dir: Path, reports_root: Path, event: dict[str, Any]) -> dict[str, Any]:
    shipped = Shipped(version.name, models_dir, reports_root)
    before = model_store.champion(shipped)
    model_store.install(version, shipped)
    record = {
        "model": version.name,
        "model_sha256": version.sha256,
        "version": version.id,
        "shipped": version.id,
        "champion": before.id if before else None,
        "run": audit.current_run(),
        **event,
    }
    audit.append(record)
    return record


def promote_version(ref: str, models_dir: Path, reports_root: Path) -> dict[str, Any]:
    """Ship a stored version by hand (no gate), recorded as a ``manual promotion`` event."""
    version = model_store.find(ref)
    return _install(version, models_dir, reports_root, {"event": "manual promotion", "promoted": True})


def rollback(name: str, models_dir: Path, reports_root: Path) -> dict[str, Any]:
    """Reinstall the champion before the current one; recorded as a ``rollback`` event.

    Raises:
        CxrError: no earlier champion is known for ``name``.
    """
    model_store.check_name(name)
    history = champion_history(name)
    current = model_store.shipped_sha256(Shipped(name, models_dir))
    current_id = current[: model_store.ID_LENGTH] if current else None
    while history and history[-1] == current_id:
        history.pop()
    if not history:
        raise CxrError(
            f"{printable(name)}: no earlier champion to roll back to (`cxr models list {name}` shows the versions)"
        )
    target = model_store.find(f"{name}/{history[-1]}")
    return _install(
        target, models_dir, reports_root, {"event": "rollback", "promoted": True, "rolled_back": current_id}
    )


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no stored model versions (train one: cxr train)")
        return
    for r in rows:
        print(
            f"{r['model']:<10} {r['id']}  {str(r['created'] or '?')[:19]:<19}  {r['health']!s:<9} "
            f"val AUC {num(r['val_auc'], 3):<6} {r['status']}"
        )


def run(args: argparse.Namespace) -> int:
    """The ``cxr models`` subcommands."""
    models_dir, reports_root = Path(args.models), Path(args.reports)
    if args.action == "list":
        rows = list_versions(args.target, models_dir)
        if args.json:
            print(json.dumps(rows))
        else:
            _print_table(rows)
        return 0
    if not args.target:
        raise CxrError(
            f"cxr models {args.action}: give a {'model name' if args.action == 'rollback' else 'version id'}"
        )
    if args.action == "show":
        print(json.dumps(show(args.target), indent=2))
        return 0
    if args.action == "promote":
        record = promote_version(args.target, models_dir, reports_root)
    else:
        record = rollback(args.target, models_dir, reports_root)
    print(json.dumps({k: record[k] for k in ("event", "model", "shipped", "champion", "model_sha256")}))
    return 0


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Register ``cxr models``."""
    p = sub.add_parser("models", help="stored model versions: list, show ID, promote ID, rollback NAME")
    common(p)
    p.add_argument(
        "action",
        choices=("list", "show", "promote", "rollback"),
        help="list the versions, show one, ship one by hand, or reinstall the previous champion",
    )
    p.add_argument(
        "target", nargs="?", help="list: a model name (optional); show/promote: a version id; rollback: a name"
    )
    p.add_argument("--models", default=str(HERE.models), help="the shipped models' folder")
    p.add_argument("--reports", default=str(HERE.reports / "train"), help="the shipped models' reports folder")
    p.add_argument("--json", action="store_true", help="list: one JSON array")
    p.set_defaults(func=run)
