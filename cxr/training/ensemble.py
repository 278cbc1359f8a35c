"""The ``ensemble`` step: average the trained models' P(pneumonia) into one shippable model.

Models trained from different starting points make different mistakes on films from another
population; averaging them ranks and calibrates better than either alone. The ensemble is saved
as an ordinary Keras model (``ensemble/ensemble.keras``: the members side by side, then an
average), with a card like any trained model's, so ``cxr predict``, ``cxr evaluate`` and
``cxr audit`` use it unchanged. Its operating point is chosen on the validation split by the same
rule as its members' (``train.common.target_sensitivity``).

``params.yaml: ensemble.members`` lists the members (``[]`` = no ensemble). They must share their
preprocessing (image size, resize mode, interpolation) and their training split file.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr.common.domain import SUFFIX as DOMAIN_SUFFIX
from cxr.common.domain import DomainModel, MemberDomains
from cxr.common.model_card import card_digest, decisive_fields, write_card
from cxr.config import Params
from cxr.errors import CxrError
from cxr.files import save_keras, sweep_stale, write_json
from cxr.formatting import num
from cxr.inference.loading import ENSEMBLE, LoadedModel, load, model_file
from cxr.provenance import lineage_log as audit
from cxr.provenance.hashing import sha256_file
from cxr.provenance.versions import code_version, library_versions
from cxr.safe_text import printable
from cxr.workspace import HERE

if TYPE_CHECKING:  # for annotations only
    import numpy as np

    from cxr.training.health import Health

log = logging.getLogger(__name__)

_SAME_PREPROCESSING = ("image_size", "resize", "interpolation")


def members_of(params: Params) -> list[str]:
    """``ensemble.members`` checked: distinct names of models listed in ``train.models``.

    Args:
        params: the configuration (``ensemble.members``, ``train.models``).

    Returns:
        The member names (empty: no ensemble); never a single member.
    """
    members, trained = list(params.ensemble.members), list(params.train.models)
    unknown = [m for m in members if m not in trained]
    if unknown:
        raise CxrError(f"ensemble.members: {', '.join(map(str, unknown))} not in train.models ({', '.join(trained)})")
    if len(set(members)) != len(members):
        raise CxrError(f"ensemble.members lists a model twice: {members}")
    if len(members) == 1:
        raise CxrError("ensemble.members: an ensemble needs at least two models (or [] for none)")
    return members


def evaluated_models(params: Params) -> list[str]:
    """The models ``evaluate`` and ``report`` cover: ``train.models``, then the ensemble if configured.

    Args:
        params: the configuration.

    Returns:
        Model names, ``ensemble`` last when ``ensemble.members`` is set.
    """
    return list(params.train.models) + ([ENSEMBLE] if members_of(params) else [])


def compose(members: Sequence[LoadedModel]) -> Any:
    """One functional model: every member on the same input, then the mean probability."""
    import keras

    image_size = members[0].input.image_size
    inputs = keras.Input((image_size, image_size, 3), name="image")
    outputs = [lm.model(inputs, training=False) for lm in members]
    averaged = keras.layers.Average(name="mean_probability", dtype="float32")(outputs)
    return keras.Model(inputs, averaged, name=ENSEMBLE)


def _check_members(members: Sequence[LoadedModel]) -> None:
    first = members[0]
    for lm in members:
        if not lm.verified:
            raise CxrError(f"{lm.path}: its sha256 differs from its card; retrain it before building the ensemble")
        differs = [k for k in _SAME_PREPROCESSING if getattr(lm.input, k) != getattr(first.input, k)]
        if differs:
            raise CxrError(
                f"ensemble: {lm.path.name} and {first.path.name} differ in preprocessing ({', '.join(differs)})"
            )
        if lm.card.splits_sha256 != first.card.splits_sha256:
            raise CxrError(
                f"ensemble: {lm.path.name} and {first.path.name} were trained on different splits; "
                "retrain them on the same data"
            )


def _write_disabled(out_dir: Path) -> None:
    """Leave only ``ensemble.json`` saying the ensemble is off (DVC still gets the output it declares)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    write_json(out_dir / "ensemble.json", {"enabled": False, "members": []})
    log.info("ensemble: disabled (ensemble.members is empty)")


@dataclass(frozen=True)
class _Validation:
    """The ensemble scored on the validation split."""

    labels: np.ndarray
    probabilities: np.ndarray
    health: Health
    target_sensitivity: float | None  # the members' rule for the shipped threshold (None: Youden's J)


def _validate(
    model: Any, loaded: Sequence[LoadedModel], members: Sequence[str], params: Params, splits_csv: str | Path
) -> _Validation:
    """Score the ensemble on the validation split and apply the members' health policy to it."""
    from cxr.inference.loading import predict_images
    from cxr.training.health import assess
    from cxr.training.input_pipeline import load_images, read_split

    paths, labels, key = read_split(splits_csv, "val")
    images = load_images(paths, key, loaded[0].cached_input(params.input.cache_dir), "val")
    probabilities = predict_images(model, images)
    member_cfg = params.train.model(members[0])
    health = assess(labels, probabilities, {}, member_cfg.health)
    if health.status != "healthy" and member_cfg.health.on_collapse == "fail":
        raise CxrError(
            f"ensemble of {', '.join(members)} is {health.status}: {'; '.join(health.problems)}; not "
            "shipped (set train.common.health.on_collapse: warn to keep it)"
        )
    return _Validation(labels, probabilities, health, member_cfg.target_sensitivity)


def _card(model: Any, loaded: Sequence[LoadedModel], models_dir: str | Path, val: _Validation) -> dict[str, Any]:
    """The ensemble's model card, before it is saved (no file hash, run or lineage yet)."""
    from cxr.common.intended_use import intended_use  # the same text as every model card and the report
    from cxr.common.thresholds import validation_operating_point

    first = loaded[0].card
    return {
        "model": ENSEMBLE,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_file": model_file(ENSEMBLE, models_dir).as_posix(),
        "members": [
            {
                "model": lm.card.model,
                "model_file": lm.path.as_posix(),
                "model_sha256": lm.card.model_sha256,
            }
            for lm in loaded
        ],
        "combination": "mean of the members' P(pneumonia)",
        "parameters": {"total": int(model.count_params())},
        "kind": "ensemble",
        "data": first.data,
        "input": {"preprocessing": first.input.preprocessing if first.input else None},
        "validation": val.health.metrics,
        "operating_point": validation_operating_point(val.labels, val.probabilities, val.target_sensitivity),
        "health": {"status": val.health.status, "problems": val.health.problems},
        "domain": _domain_record(loaded),
        "code": code_version(),
        "libraries": library_versions(),
        "intended_use": intended_use(),
    }


def _domain_record(loaded: Sequence[LoadedModel]) -> dict[str, Any] | None:
    """The ensemble's content check: its members' (an image is in domain when in every member's)."""
    domains = [lm.domain for lm in loaded if isinstance(lm.domain, DomainModel)]
    if len(domains) < len(loaded):
        return None  # a member without one: no check rather than a partial one
    return {
        "method": "the members' content checks: the highest of their scores",
        "layer": "each member's input of pneumonia",
        "percentile": min(d.percentile for d in domains),
        "threshold": 1.0,  # member scores are already distances over each member's threshold
        "members": [lm.name for lm in loaded],
        "file": None,
        "sha256": None,
    }


def _domain_bytes(loaded: Sequence[LoadedModel]) -> bytes:
    """The members' checks in one file (written only when every member has one: :func:`_domain_record`)."""
    return MemberDomains({lm.name: lm.domain for lm in loaded if isinstance(lm.domain, DomainModel)}).to_bytes()


def _save(
    model: Any,
    card: dict[str, Any],
    members: Sequence[str],
    out_dir: Path,
    splits_csv: str | Path,
    domain: bytes | None = None,
) -> str:
    """Write the model, its card and ``ensemble.json`` into ``out_dir`` at once; completes ``card``.

    Returns the card's digest (:func:`cxr.common.model_card.card_digest`; the lineage record keeps it).
    """
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        save_keras(model, tmp_dir / "ensemble.keras")
        card["model_sha256"] = sha256_file(tmp_dir / "ensemble.keras")
        card["run"] = audit.current_run()
        card["lineage_data"] = audit.data_lineage(Path(splits_csv))
        if domain is not None and card.get("domain"):
            (tmp_dir / f"ensemble{DOMAIN_SUFFIX}").write_bytes(domain)
            sidecar = model_file(ENSEMBLE, out_dir.parent / "models").with_name(f"ensemble{DOMAIN_SUFFIX}")
            card["domain"].update(file=sidecar.as_posix(), sha256=sha256_file(tmp_dir / f"ensemble{DOMAIN_SUFFIX}"))
        card.update(write_card(tmp_dir / "ensemble.card.json", card).to_json())
        digest = card_digest(tmp_dir / "ensemble.card.json")
        write_json(tmp_dir / "ensemble.json", {"enabled": True, "members": list(members)})
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp_dir, out_dir)  # the model and its card appear together
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # gone after the rename; a failed save leaves no scratch
    return digest


def _record(card: Mapping[str, Any], digest: str, members: Sequence[str], metrics: Mapping[str, Any]) -> None:
    """Append the ensemble to the lineage log and log its validation figures."""
    audit.append(
        {
            "model": ENSEMBLE,
            "model_file": card["model_file"],
            "model_sha256": card["model_sha256"],
            "card_digest": digest,
            "card_fields": decisive_fields(card),
            "data": card["lineage_data"],
            "params": {"ensemble": {"members": members}},
            "members": card["members"],
            "code": card["code"],
            "run": card["run"],
            "metrics": {"validation": metrics},
            "created": card["created"],
        }
    )
    log.info(
        "ensemble of %s: validation AUC %s, threshold %s, saved %s (sha256 %s)",
        ", ".join(members),
        num(metrics.get("auc"), 4),
        num((card["operating_point"] or {}).get("threshold")),
        card["model_file"],
        card["model_sha256"][:12],
    )


def build_ensemble(
    params: Params, splits_csv: str | Path = HERE.splits, models_dir: str | Path = HERE.models
) -> dict[str, Any] | None:
    """Write ``ensemble/ensemble.keras`` and its card from ``ensemble.members``; None when disabled.

    Args:
        params: the configuration (``ensemble``, ``train``, ``input``).
        splits_csv: the split file the members were trained on (validation scores the ensemble).
        models_dir: where the members are.

    Returns:
        The ensemble's card, or None when ``ensemble.members`` is empty.
    """
    members = members_of(params)
    out_dir = model_file(ENSEMBLE, models_dir).parent
    for path in sweep_stale(out_dir.parent, f".{out_dir.name}.tmp-"):
        log.info("removed %s left by an interrupted ensemble run", printable(path))
    if not members:
        _write_disabled(out_dir)
        return None
    loaded = [load(model_file(name, models_dir)) for name in members]
    _check_members(loaded)
    model = compose(loaded)
    val = _validate(model, loaded, members, params, splits_csv)
    card = _card(model, loaded, models_dir, val)
    domain = _domain_bytes(loaded) if card.get("domain") else None
    digest = _save(model, card, members, out_dir, splits_csv, domain)
    _record(card, digest, members, val.health.metrics)
    return card
