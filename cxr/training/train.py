"""Train one model of the registry on ``splits.csv``; write the model, its card and its curves.

Outputs for model ``<name>``:
- ``models/<name>.keras`` (Keras 3 format, loads with ``safe_mode=True``) and
  ``models/<name>.card.json`` (model card and lineage);
- ``reports/train/<name>/``: ``history.csv``, ``metrics.json`` (DVC metrics), ``curves.png``,
  ``summary.txt``, ``architecture.png``: the record of the shipped model;
- ``logs/scalars/<name>_<time>/`` for TensorBoard.

The model, its card and its reports are replaced together, and only when a model ships: a run
that fails, is interrupted or is rejected leaves all of them byte-identical. While it trains, a
run writes its history to ``models/.work/<name>/history-<run key>.csv`` and, once assessed, its
reports into a staging folder ``reports/train/.<name>.tmp-<pid>/``. Shipping saves the model to a
temporary file first (the slow part), then renames into place: the reports, then the model, then
the card last. The card is the commit record: it names the sha256 of the model and of every report
file, so after a kill inside those few renames a reader can tell which files are new (a model whose
bytes differ from its card is reported unverified by ``cxr audit`` and ``cxr predict``).

A killed run resumes from its last completed epoch (Keras ``BackupAndRestore`` under
``models/.backup/<name>/<run key>``, where the key covers data, parameters and code), with the
history rows it had written (kept in ``models/.work/<name>/``).

``train`` reads as the pipeline: ``_setup_run`` → per learning rate ``_train_once`` (``_load_data``,
``_build_or_continue``, ``_resume_or_reset``, ``_callbacks``, ``_fit``, ``_assess``, ``_card``,
``_stage_reports``) → ``_ship`` or ``_reject`` (or the next, lower learning rate on ``fallback``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from cxr.common import plots
from cxr.common.domain import (
    FEATURE_LAYER,
    SUFFIX,
    DomainModel,
    features_and_probabilities,
    fit_domain,
    no_domain_bytes,
    scoring_model,
)
from cxr.common.model_card import card_digest, decisive_fields, read_card, write_card
from cxr.common.thresholds import validation_operating_point
from cxr.config import InputConfig, Params, TrainConfig, as_plain
from cxr.errors import CxrError, DataError
from cxr.files import save_keras, sweep_stale, write_bytes_atomic, write_csv_rows, write_json
from cxr.formatting import num
from cxr.logs import interactive
from cxr.provenance import lineage_log as audit
from cxr.provenance import model_store
from cxr.provenance.hashing import sha256_file
from cxr.provenance.versions import code_version, library_versions
from cxr.runtime import configure, distribution
from cxr.training.disk import (
    check_room,
    discard_torn,
    failure,
    is_write_failure,
    quiet_hdf5_teardown,
    readable_h5,
)
from cxr.training.health import Health, assess
from cxr.training.input_pipeline import load_images, make_dataset, read_split
from cxr.workspace import HERE

log = logging.getLogger(__name__)

CLASS_WEIGHTS = ("balanced", "none")
OPTIMIZERS = ("adam", "adamw")


class TrainingRejected(CxrError):
    """The run finished but its model failed the health check (collapsed or degenerate)."""


def class_weights(labels: np.ndarray, mode: str) -> dict[int, float] | None:
    """Keras class weights: ``balanced`` = n / (2 · n_class), as sklearn computes them.

    Args:
        labels: the training labels (0 = NORMAL, 1 = PNEUMONIA), any numeric dtype.
        mode: ``balanced`` or ``none``.

    Returns:
        ``{0: w0, 1: w1}`` for ``balanced``; ``None`` (unweighted) for ``none``.

    Raises:
        DataError: ``balanced`` on labels that lack one of the two classes.
    """
    if mode == "none":
        return None
    counts = np.bincount(labels.astype(int), minlength=2)
    if (counts == 0).any():
        raise DataError(f"the train split lacks a class (counts {counts.tolist()})")
    return {c: float(len(labels) / (2 * counts[c])) for c in (0, 1)}


class EpochLine:
    """One log line per epoch when no terminal is attached (Keras' own bar otherwise).

    Pass ``_as_keras_callback(EpochLine)(name, epochs)`` to ``fit``. The class is plain so that
    importing this module does not import TensorFlow (``TrainConfig`` is read by code that never
    trains, and ``cxr.runtime`` imports TensorFlow quietly, once a run starts): a class statement
    with a Keras base would import it at module load, so the base is added on first use instead.
    """

    def __init__(self, name: str, epochs: int) -> None:
        super().__init__()
        self.run_name, self.epochs = name, epochs

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, object] | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Mapping[str, object] | None = None) -> None:
        logs = logs or {}
        shown = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if isinstance(v, float))
        log.info(
            "%s epoch %d/%d %.0fs %s", self.run_name, epoch + 1, self.epochs, time.perf_counter() - self.started, shown
        )


@cache
def _as_keras_callback(behaviour: type) -> type:
    """``behaviour`` on a ``keras.callbacks.Callback`` base (made once per class, on first use)."""
    import keras

    return type(behaviour.__name__, (behaviour, keras.callbacks.Callback), {"__module__": __name__})


def _run_key(name: str, cfg: TrainConfig, input_cfg: InputConfig, splits_sha: str) -> str:
    """Key of a resumable run: data, settings and the code it runs (the import closure the registry uses)."""
    from cxr.provenance.code_closure import module_fingerprint

    payload = json.dumps(
        {
            "name": name,
            "cfg": repr(cfg),
            "input": repr(input_cfg),
            "splits": splits_sha,
            "code": module_fingerprint(__name__),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _usable_backup(backup_dir: Path) -> bool:
    """True when an interrupted run left a readable backup; an unreadable one is removed (start over)."""
    if not backup_dir.is_dir() or not any(backup_dir.iterdir()):
        return False
    if any(readable_h5(backup_dir / name) for name in ("latest.weights.h5", "latest.weights.h5.bkp")):
        return True
    log.warning("backup in %s is unreadable (killed while writing?); starting the run over", backup_dir)
    shutil.rmtree(backup_dir, ignore_errors=True)
    return False


def _trim_history(history_csv: Path, backup_dir: Path) -> None:
    """Drop history rows of epochs the backup does not hold (they are about to be trained again)."""
    import pandas as pd

    use_previous = not readable_h5(backup_dir / "latest.weights.h5")  # Keras falls back to the .bkp too
    meta = backup_dir / ("training_metadata.json.bkp" if use_previous else "training_metadata.json")
    if not (meta.is_file() and history_csv.is_file()):
        return
    resume_at = int(json.loads(meta.read_text()).get("epoch", 0))
    frame = pd.read_csv(history_csv)
    kept = frame[frame["epoch"] < resume_at]
    if len(kept) != len(frame):
        kept.to_csv(history_csv, index=False)


def learning_rate_schedule(cfg: TrainConfig, total_epochs: int, steps_per_epoch: int) -> Any:
    """The optimiser's learning rate: ``cfg.learning_rate`` (``schedule: plateau``) or a schedule.

    ``cosine``: linear warm-up from 0 over ``warmup_epochs``, then cosine decay to 0 by the end of
    ``total_epochs`` (Loshchilov & Hutter 2017), stepped every batch. A fixed budget rather than
    early stopping: validation AUC is ≥ 0.996 for every recipe compared, so stopping on it stops on noise.

    Args:
        cfg: the model's training settings.
        total_epochs: the epochs of the run (the schedule ends with them).
        steps_per_epoch: optimiser steps per epoch.

    Returns:
        A float, or a ``keras.optimizers.schedules.CosineDecay``.
    """
    if cfg.schedule != "cosine":
        return cfg.learning_rate
    import keras

    steps_per_epoch = max(int(steps_per_epoch), 1)
    warmup = min(cfg.warmup_epochs, max(total_epochs - 1, 0)) * steps_per_epoch
    decay = max(total_epochs * steps_per_epoch - warmup, 1)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=decay, alpha=0.0)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=decay, alpha=0.0, warmup_target=cfg.learning_rate, warmup_steps=warmup
    )


def compile_model(
    model: Any,
    learning_rate: Any,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    label_smoothing: float = 0.0,
    ema: bool = False,
) -> None:
    """Compile for binary pneumonia classification with the notebook's metrics.

    Args:
        model: an uncompiled (or loaded) Keras model.
        learning_rate: the optimiser's learning rate, or a schedule (:func:`learning_rate_schedule`).
        optimizer: ``adam`` or ``adamw`` (decoupled ``weight_decay``).
        weight_decay: AdamW's decoupled weight decay.
        label_smoothing: binary cross-entropy label smoothing.
        ema: keep an exponential moving average of the weights (swapped in for validation).

    Returns:
        None; ``model`` is compiled in place (call it under the strategy scope the model was built in).
    """
    import keras

    opt_cls = keras.optimizers.AdamW if optimizer == "adamw" else keras.optimizers.Adam
    opt_kwargs: dict[str, Any] = {"learning_rate": learning_rate, "use_ema": ema}
    if optimizer == "adamw":
        opt_kwargs["weight_decay"] = weight_decay
    model.compile(
        optimizer=opt_cls(**opt_kwargs),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=[
            "accuracy",
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.AUC(name="auc"),
        ],
    )


def _layers_table(model: Any) -> list[tuple[str, str, str, int]]:
    rows = []
    for layer in model.layers:
        try:
            shape = str(tuple(layer.output.shape[1:]))
        except (AttributeError, ValueError):
            shape = "?"
        rows.append((layer.name, type(layer).__name__, shape, int(layer.count_params())))
    return rows


def _summary_text(model: Any) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, **_: lines.append(line), line_length=100)
    return "\n".join(lines) + "\n"


def _history(csv_path: Path) -> dict[str, list[float]]:
    import pandas as pd

    if not csv_path.is_file():
        return {}
    frame = pd.read_csv(csv_path)
    frame = frame.drop_duplicates("epoch", keep="last").sort_values("epoch")  # an epoch redone after a kill
    frame["epoch"] = frame["epoch"] + 1
    return {c: frame[c].astype(float).tolist() for c in frame.columns}


@dataclass(frozen=True)
class _Run:
    """One training attempt's fixed inputs: which model, with which settings, and where its files go."""

    name: str
    cfg: TrainConfig
    input_cfg: InputConfig
    splits_csv: Path
    models_dir: Path
    reports_dir: Path  # reports/train/<name>
    logs_dir: Path
    registry_dir: Path | None = None  # None = registry/ of the workspace
    install: bool = True  # ship the new version at once (else the promotion step decides)

    @property
    def shipped(self) -> model_store.Shipped:
        return model_store.Shipped(self.name, self.models_dir, self.reports_dir.parent)

    @property
    def model_path(self) -> Path:
        return self.models_dir / f"{self.name}.keras"

    @property
    def card_path(self) -> Path:
        return self.models_dir / f"{self.name}.card.json"

    @property
    def history_csv(self) -> Path:
        """The shipped model's history (replaced only when a new model ships)."""
        return self.reports_dir / "history.csv"

    @property
    def work_dir(self) -> Path:
        """This model's scratch folder: run-scoped history and best checkpoint, kept for a resume."""
        return self.models_dir / ".work" / self.name

    @property
    def staging_dir(self) -> Path:
        """Where a finished run's reports wait until the model ships (beside the reports folder)."""
        return self.reports_dir.with_name(f".{self.name}.tmp-{os.getpid()}")


@dataclass(frozen=True)
class _Data:
    train_images: np.ndarray  # un-augmented (memory-mapped cache): the domain check is fitted on them
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    train_ds: Any
    val_ds: Any
    weights: dict[int, float] | None


@dataclass(frozen=True)
class _Start:
    """The compiled model to fit and where its epochs start (after a saved model's, when continuing)."""

    model: Any
    previous: dict[str, Any] | None  # the continued model's card
    initial_epoch: int
    epochs: int


@dataclass(frozen=True)
class _Scratch:
    """This run's key and its files outside the shipped pair (backup, best checkpoint, history)."""

    run_key: str
    backup_dir: Path
    best_path: Path
    history_csv: Path  # this run's history (CSVLogger), moved into the reports when the model ships
    resuming: bool


@dataclass(frozen=True)
class _Outcome:
    model: Any  # the best checkpoint when one was written, else the fitted model
    history: dict[str, list[float]]
    health: Health
    point: dict[str, Any] | None  # None when the validation split cannot choose a threshold
    epochs_run: int
    best_epoch: int | None
    domain: DomainModel | None = None


def train(
    name: str,
    params: Params,
    splits_csv: str | Path = HERE.splits,
    models_dir: str | Path = HERE.models,
    reports_dir: str | Path = HERE.train_reports_root,
    logs_dir: str | Path = HERE.logs,
    install: bool = True,
    registry_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train model ``name``; store it as a version and ship it (with ``install``) when it is healthy enough.

    With ``health.on_collapse: fallback``, an unhealthy model is followed by one fresh run at the
    learning rate × ``fallback_lr_factor`` that fails rather than falls back again.

    Args:
        name: a model of the registry (``cxr.training.models``), also the key of ``train.<name>``.
        params: the parsed configuration; only this model's ``train`` settings and the ``input``
            section are read.
        splits_csv: the prepare step's ``splits.csv`` (``manifest.csv`` is expected beside it).
        models_dir: where ``<name>.keras`` and ``<name>.card.json`` are written.
        reports_dir: the parent of this model's reports folder ``<reports_dir>/<name>/``.
        logs_dir: the parent of the TensorBoard ``scalars/`` folder.
        install: make the new version the shipped model at once. False leaves the shipped model as it
            is: the promotion step (:mod:`cxr.evaluation.promotion`) compares the two and decides.
        registry_dir: where versions are stored (default ``registry/``).

    Returns:
        The model card, as stored with the version (and written to ``<models_dir>/<name>.card.json``
        when installed).

    Raises:
        DataError: ``splits_csv`` is missing, or the train split lacks a class.
        CxrError: invalid ``train`` parameters, or nothing (or a tampered model) to continue from.
        TrainingRejected: the model is unhealthy and ``on_collapse`` is ``fail`` (or the fallback run
            is unhealthy too); it is kept in ``<models_dir>/.rejected/``, the shipped pair is untouched.
    """
    cfg = params.train.model(name)
    input_cfg = batch_for_data(name, cfg, params.input, splits_csv)
    first = _setup_run(name, cfg, input_cfg, splits_csv, models_dir, reports_dir, logs_dir)
    first = replace(first, install=install, registry_dir=Path(registry_dir) if registry_dir else None)
    try:
        return _train_attempts(first)
    finally:
        shutil.rmtree(first.staging_dir, ignore_errors=True)  # shipped or not, the staging folder goes


SMALLEST_BATCH = 8  # below this, batch-norm statistics of a batch are too noisy to train on


def batch_for_data(name: str, cfg: TrainConfig, input_cfg: InputConfig, splits_csv: str | Path) -> InputConfig:
    """``input_cfg`` with a batch small enough that an epoch has ``cfg.min_steps_per_epoch`` steps.

    With the 226 training images of the embedded demo sample, batches of 32 give 8 steps an epoch: too
    few for batch norm and the weight average to settle, and both default models collapse to a constant
    output. The batch shrinks (never below ``SMALLEST_BATCH``, never above ``input.batch_size``) only
    for such small splits; the full data set keeps ``input.batch_size``. The card records the batch used.

    Args:
        name: the model, for the log line.
        cfg: its training settings (``min_steps_per_epoch``; ``steps_per_epoch`` fixed means no change).
        input_cfg: the ``input`` section.
        splits_csv: the split file; its train rows are counted.

    Returns:
        ``input_cfg``, or a copy with a smaller ``batch_size``.
    """
    splits_csv = Path(splits_csv)
    if cfg.steps_per_epoch is not None or not splits_csv.is_file():
        return input_cfg  # a fixed number of steps, or no split to count (train() reports that itself)
    with splits_csv.open(encoding="utf-8", errors="replace", newline="") as handle:
        n_train = sum(1 for row in csv.DictReader(handle) if row.get("split") == "train")
    batch = min(input_cfg.batch_size, max(SMALLEST_BATCH, n_train // cfg.min_steps_per_epoch))
    if batch == input_cfg.batch_size:
        return input_cfg
    log.info(
        "%s: %d training images: batches of %d instead of %d, so an epoch has at least %d steps "
        "(train.common.min_steps_per_epoch)",
        name,
        n_train,
        batch,
        input_cfg.batch_size,
        min(cfg.min_steps_per_epoch, -(-n_train // batch)),
    )
    return input_cfg.model_copy(update={"batch_size": batch})


def _train_attempts(first: _Run) -> dict[str, Any]:
    """Train at ``first.cfg`` (then at the fallback learning rate if asked); ship or reject."""
    name = first.name
    fallback: dict[str, Any] | None = None
    for attempt in _attempts(first.cfg):
        started = time.perf_counter()
        if fallback is not None:
            log.warning("%s: falling back to a fresh run at learning rate %g", name, attempt.learning_rate)
        run = replace(first, cfg=attempt)
        model, card, health = _train_once(run)
        if health.status != "healthy":
            message = f"{name}: model is {health.status}: {'; '.join(health.problems)}"
            log.error("%s", message)
            if attempt.health.on_collapse == "fail":
                raise _reject(run, model, card, message)
            if attempt.health.on_collapse == "fallback":
                fallback = {"from_learning_rate": attempt.learning_rate, "problems": health.problems}
                continue
        return _ship(run, model, card, started, fallback)
    raise AssertionError("unreachable: the last attempt fails rather than falls back")


def _attempts(cfg: TrainConfig) -> list[TrainConfig]:
    """The settings to train with in turn, one per learning rate: ``cfg``, then its fallback if any."""
    if cfg.health.on_collapse != "fallback":
        return [cfg]
    lower = cfg.learning_rate * cfg.health.fallback_lr_factor
    health = cfg.health.model_copy(update={"on_collapse": "fail"})
    return [cfg, cfg.model_copy(update={"learning_rate": lower, "health": health})]


def _setup_run(
    name: str,
    cfg: TrainConfig,
    input_cfg: InputConfig,
    splits_csv: str | Path,
    models_dir: str | Path,
    reports_dir: str | Path,
    logs_dir: str | Path,
) -> _Run:
    models_dir, reports_dir = Path(models_dir), Path(reports_dir) / name
    models_dir.mkdir(parents=True, exist_ok=True)
    reports_dir.mkdir(parents=True, exist_ok=True)
    splits_csv = Path(splits_csv)
    if not splits_csv.is_file():
        raise DataError(f"{splits_csv}: not found; run the prepare step first (dvc repro prepare)")
    run = _Run(name, cfg, input_cfg, splits_csv, models_dir, reports_dir, Path(logs_dir))
    _remove_stale_scratch(run)
    return run


def _remove_stale_scratch(run: _Run) -> None:
    """Remove the staging folder and temporary model a killed run of this model left (its process is gone)."""
    for path in sweep_stale(run.reports_dir.parent, f".{run.name}.tmp-") + sweep_stale(
        run.models_dir, f".{run.name}.tmp-", ".keras"
    ):
        log.info("%s: removed %s left by an interrupted run", run.name, path)


def _train_once(run: _Run) -> tuple[Any, dict[str, Any], Health]:
    """Fit and assess one model at ``run.cfg``; return it with its card (unsaved) and its health."""
    splits_sha = sha256_file(run.splits_csv)
    policy = configure(run.cfg.seed, run.cfg.deterministic, run.cfg.precision)
    data = _load_data(run)
    strategy = distribution(run.cfg.distribute)
    if strategy.num_replicas_in_sync > 1:
        log.info("%s: training on %d replicas (%s)", run.name, strategy.num_replicas_in_sync, type(strategy).__name__)
    start = _build_or_continue(run, strategy, _steps_per_epoch(run, data))
    scratch = _resume_or_reset(run, splits_sha, start.previous)
    verbose = 1 if interactive() else 0
    callbacks = _callbacks(run, scratch, start.epochs, verbose)
    check_room(run.models_dir, int(start.model.count_params()) * 4)
    quiet_hdf5_teardown()
    try:
        fit_seconds = _fit(run, start, data, callbacks, verbose, policy)
    except (OSError, RuntimeError) as exc:
        if not is_write_failure(exc):
            raise
        discard_torn(scratch.backup_dir, scratch.best_path)
        if not scratch.backup_dir.exists():  # nothing to resume from: its history is of no use either
            scratch.history_csv.unlink(missing_ok=True)
        raise failure(exc, run.models_dir) from None
    outcome = _assess(run, start, data, scratch)
    card = _card(
        run, splits_sha, policy, int(strategy.num_replicas_in_sync), data, start, scratch, outcome, fit_seconds
    )
    _stage_reports(run, scratch, outcome.model, outcome.history)
    if outcome.domain is not None:  # shipped beside the model, with it (see _ship)
        (run.staging_dir / _DOMAIN_STAGED).write_bytes(outcome.domain.to_bytes())
    _stage_data_rows(run, data)
    return outcome.model, card, outcome.health


DATA_COLUMNS = (
    "path",
    "sha256",
    "label",
    "split",
    "patient_id",
    "width",
    "height",
    "channels",
    "format",
    "mean_intensity",
)


_GEOMETRY = ("path", "width", "height", "channels", "format")


def _stage_data_rows(run: _Run, data: _Data) -> None:
    """The images this model trained and validated on, with their geometry and mean intensity (0–1).

    Stored with the version (``data.csv``): the promotion step excludes them from the reference set,
    the drift report compares them with the next run's, and ``cxr models show`` lists their counts.
    """
    import pandas as pd  # here, as in input_pipeline: only training reads a split

    frame = pd.read_csv(run.splits_csv, keep_default_na=False, dtype={"patient_id": str})
    manifest_csv = run.splits_csv.with_name("manifest.csv")
    if manifest_csv.is_file():  # geometry and format live in the manifest (read_split checked the pair)
        geometry = pd.read_csv(manifest_csv, keep_default_na=False, usecols=lambda c: c in _GEOMETRY)
        if "path" in geometry:
            frame = frame.merge(geometry.drop_duplicates("path"), on="path", how="left", suffixes=("", "_m"))
    rows = []
    for split, images in (("train", data.train_images), ("val", data.val_images)):
        part = frame[frame["split"] == split]
        chunks = [images[i : i + 256].mean(axis=(1, 2, 3)) for i in range(0, len(images), 256)]
        per_image = np.concatenate(chunks) / 255.0 if chunks else np.zeros(0)
        for record, mean in zip(part.to_dict("records"), per_image, strict=True):
            rows.append([*(record.get(c, "") for c in DATA_COLUMNS[:-1]), round(float(mean), 4)])
    write_csv_rows(run.staging_dir / model_store.DATA_FILE, DATA_COLUMNS, rows)


def _load_data(run: _Run) -> _Data:
    cfg, input_cfg = run.cfg, run.input_cfg
    train_paths, train_labels, train_key = read_split(run.splits_csv, "train")
    val_paths, val_labels, val_key = read_split(run.splits_csv, "val")
    train_images = load_images(train_paths, train_key, input_cfg, "train")
    val_images = load_images(val_paths, val_key, input_cfg, "val")
    train_ds = make_dataset(
        train_images, train_labels, input_cfg, shuffle=True, augment=True, seed=cfg.seed, mixup=cfg.mixup
    )
    val_ds = make_dataset(
        val_images, val_labels, input_cfg, shuffle=False, augment=input_cfg.augment_validation, seed=cfg.seed + 1
    )
    weights = class_weights(train_labels, cfg.class_weight)
    return _Data(train_images, train_labels, val_images, val_labels, train_ds, val_ds, weights)


def _steps_per_epoch(run: _Run, data: _Data) -> int:
    """Optimiser steps in one epoch (``steps_per_epoch``, else the train split's batches)."""
    if run.cfg.steps_per_epoch is not None:
        return run.cfg.steps_per_epoch
    return -(-len(data.train_labels) // run.input_cfg.batch_size)


def _build_or_continue(run: _Run, strategy: Any, steps_per_epoch: int) -> _Start:
    """A fresh model, or (``continue_epochs`` > 0) the saved one, verified against its card; compiled."""
    import keras

    # imported before either branch: it registers the custom layers that load_model needs
    from cxr.training.models import build_model

    cfg, name = run.cfg, run.name
    initial_epoch, epochs, previous = 0, cfg.epochs, None
    if cfg.continue_epochs > 0:
        if not (run.model_path.is_file() and run.card_path.is_file()):
            raise CxrError(
                f"train.{name}.continue_epochs={cfg.continue_epochs}: no saved {run.model_path} "
                "with its card to continue from; train it first with continue_epochs: 0"
            )
        previous = read_card(run.card_path).to_json()
        if previous.get("model_sha256") != sha256_file(run.model_path):
            raise CxrError(f"{run.model_path} does not match its card (sha256 differs): refusing to continue")
        with strategy.scope():
            model = keras.saving.load_model(run.model_path, safe_mode=True)
        initial_epoch = int(previous.get("epochs_run", 0))
        epochs = initial_epoch + cfg.continue_epochs
        log.info(
            "%s: continuing %s from epoch %d for %d more epochs",
            name,
            run.model_path,
            initial_epoch,
            cfg.continue_epochs,
        )
    else:
        with strategy.scope():
            model = build_model(
                name,
                run.input_cfg.image_size,
                cfg.model,
                normalize=run.input_cfg.normalize,
                center_crop=run.input_cfg.center_crop,
            )
    with strategy.scope():
        rate = learning_rate_schedule(cfg, epochs - initial_epoch, steps_per_epoch)
        compile_model(model, rate, cfg.optimizer, cfg.weight_decay, cfg.label_smoothing, cfg.ema)
    return _Start(model, previous, initial_epoch, epochs)


def _resume_or_reset(run: _Run, splits_sha: str, previous: dict[str, Any] | None) -> _Scratch:
    """Resume an interrupted run of the same key, or start this key's scratch files afresh.

    Nothing of the shipped model is touched: the run's history is its own file under
    ``models/.work/<name>/``; a continued run starts it as a copy of the shipped history.
    """
    run_key = _run_key(run.name, run.cfg, run.input_cfg, splits_sha + (previous or {}).get("model_sha256", ""))
    backup_dir = run.models_dir / ".backup" / run.name / run_key
    run.work_dir.mkdir(parents=True, exist_ok=True)
    best_path = run.work_dir / f"best-{run_key}.keras"
    history_csv = run.work_dir / f"history-{run_key}.csv"
    resuming = _usable_backup(backup_dir)
    if resuming:
        log.warning("%s: resuming an interrupted run from %s", run.name, backup_dir)
        _trim_history(history_csv, backup_dir)
    else:
        best_path.unlink(missing_ok=True)
        history_csv.unlink(missing_ok=True)
        if previous is not None and run.history_csv.is_file():
            shutil.copyfile(run.history_csv, history_csv)  # a continued run appends to the shipped history
    return _Scratch(run_key, backup_dir, best_path, history_csv, resuming)


def _callbacks(run: _Run, scratch: _Scratch, epochs: int, verbose: int) -> list[Any]:
    import keras

    cfg = run.cfg

    class LearningRateLog(keras.callbacks.Callback):
        """Put the epoch's learning rate in the logs (a schedule has no ReduceLROnPlateau to do it)."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if logs is not None and "learning_rate" not in logs:
                logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    callbacks: list[Any] = [
        *([LearningRateLog()] if cfg.schedule != "plateau" else []),  # before the CSV logger reads the logs
        # CSVLogger before BackupAndRestore: an epoch's row is on disk before its backup, so a kill
        # between the two repeats the epoch (its row is then replaced) rather than losing its row.
        keras.callbacks.CSVLogger(str(scratch.history_csv), append=True),
        # double_checkpoint: a kill while the backup is written leaves the previous one
        keras.callbacks.BackupAndRestore(
            str(scratch.backup_dir), save_freq="epoch", delete_checkpoint=True, double_checkpoint=True
        ),
        keras.callbacks.TerminateOnNaN(),
        *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg.ema else []),
        keras.callbacks.ModelCheckpoint(
            str(scratch.best_path),
            monitor=cfg.monitor,
            mode=cfg.monitor_mode,
            save_best_only=cfg.checkpoint == "best",  # last: every epoch, so the final one remains
            initial_value_threshold=_best_so_far(run, scratch) if cfg.checkpoint == "best" else None,
        ),
    ]
    if cfg.schedule == "plateau":  # a cosine schedule owns the learning rate
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=cfg.reduce_lr.monitor,
                factor=cfg.reduce_lr.factor,
                patience=cfg.reduce_lr.patience,
                min_lr=cfg.reduce_lr.min_lr,
            )
        )
    stopping = cfg.early_stopping
    if stopping.enabled:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=stopping.monitor or cfg.monitor,
                mode=stopping.mode or cfg.monitor_mode,
                patience=stopping.patience,
                min_delta=stopping.min_delta,
                restore_best_weights=True,
            )
        )
    if cfg.tensorboard:
        stamp = datetime.now().strftime("%m%d%Y-%H%M%S")
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run.logs_dir / "scalars" / f"{run.name}_{stamp}")))
    if not verbose:
        callbacks.append(_as_keras_callback(EpochLine)(run.name, epochs))
    return callbacks


def _best_so_far(run: _Run, scratch: _Scratch) -> float | None:
    """The monitored value to beat: on resume, the best checkpoint so far must only be replaced by a better epoch."""
    so_far = _history(scratch.history_csv).get(run.cfg.monitor) if scratch.resuming else None
    if not so_far:
        return None
    return (max if run.cfg.monitor_mode == "max" else min)(v for v in so_far if v == v)


def _fit(run: _Run, start: _Start, data: _Data, callbacks: list[Any], verbose: int, policy: str) -> float:
    """Fit ``start.model`` in place; return the seconds it took."""
    cfg = run.cfg
    log.info(
        "%s: training %d images (%s), validating on %d, precision %s, class weights %s",
        run.name,
        len(data.train_labels),
        run.input_cfg.resize,
        len(data.val_labels),
        policy,
        {k: round(v, 3) for k, v in data.weights.items()} if data.weights else None,
    )
    fit_started = time.perf_counter()
    start.model.fit(
        data.train_ds,
        validation_data=data.val_ds,
        epochs=start.epochs,
        initial_epoch=start.initial_epoch,
        class_weight=data.weights,
        steps_per_epoch=cfg.steps_per_epoch,
        shuffle=False,
        validation_steps=cfg.validation_steps,
        callbacks=callbacks,
        verbose=verbose,
    )
    return time.perf_counter() - fit_started


def _assess(run: _Run, start: _Start, data: _Data, scratch: _Scratch) -> _Outcome:
    """Judge the best checkpoint (else the fitted model) on the un-augmented validation split."""
    import keras

    cfg = run.cfg
    history = _history(scratch.history_csv)
    model = start.model
    if scratch.best_path.is_file():
        model = keras.saving.load_model(scratch.best_path, safe_mode=True)
    scorer = scoring_model(model)
    val_features, probabilities = features_and_probabilities(scorer, data.val_images)
    domain = None
    if cfg.domain_check and np.isfinite(val_features).all():
        train_features, _ = features_and_probabilities(scorer, data.train_images)
        domain = fit_domain(train_features, val_features, cfg.domain_percentile)
    health = assess(data.val_labels, probabilities, history, cfg.health)
    point = validation_operating_point(data.val_labels, probabilities, cfg.target_sensitivity)
    epochs_run = int(history["epoch"][-1]) if history.get("epoch") else start.epochs
    return _Outcome(model, history, health, point, epochs_run, _best_epoch(history, cfg), domain)


def _best_epoch(history: Mapping[str, list[float]], cfg: TrainConfig) -> int | None:
    """The 1-based epoch that shipped: the last (``checkpoint: last``) or the one with the best monitored
    value; None when it was never (or only NaN) recorded."""
    if cfg.checkpoint == "last" and history.get("epoch"):
        return int(history["epoch"][-1])
    if not history.get(cfg.monitor):
        return None
    pick = np.nanargmax if cfg.monitor_mode == "max" else np.nanargmin
    values = np.asarray(history[cfg.monitor], dtype=float)
    return int(history["epoch"][int(pick(values))]) if not np.isnan(values).all() else None


def _card(
    run: _Run,
    splits_sha: str,
    policy: str,
    replicas: int,
    data: _Data,
    start: _Start,
    scratch: _Scratch,
    outcome: _Outcome,
    fit_seconds: float,
) -> dict[str, Any]:
    """The model card, less what only shipping knows (``model_sha256``, total time, lineage)."""
    from cxr.common.intended_use import intended_use  # the text the report shows too

    cfg, input_cfg, model = run.cfg, run.input_cfg, outcome.model
    return {
        "model": run.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_file": run.model_path.as_posix(),
        "model_sha256": None,
        "intended_use": intended_use(),
        "parameters": {
            "total": int(model.count_params()),
            "trainable": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
            "non_trainable": int(sum(np.prod(w.shape) for w in model.non_trainable_weights)),
        },
        "data": _data_record(run, splits_sha, data),
        "train_config": as_plain(cfg),
        "input": {
            "preprocessing": input_cfg.preprocessing(),
            "augment": vars(input_cfg.augment),
            "augment_validation": input_cfg.augment_validation,
            "batch_size": input_cfg.batch_size,
        },
        "precision_policy": policy,
        "replicas": replicas,
        "class_weights": data.weights,
        "epochs_run": outcome.epochs_run,
        "initial_epoch": start.initial_epoch,
        "best_epoch": outcome.best_epoch,
        "monitor": cfg.monitor,
        "resumed_interrupted_run": scratch.resuming,
        "continued_from": (start.previous or {}).get("model_sha256"),
        "validation": outcome.health.metrics,
        "operating_point": outcome.point,
        "domain": _domain_record(outcome.domain),
        "health": {"status": outcome.health.status, "problems": outcome.health.problems},
        "timings": {
            "fit_seconds": round(fit_seconds, 1),
            "total_seconds": None,
            "train_images_per_second": _images_per_second(run, data, start, outcome, fit_seconds),
        },
        "code": code_version(),
        "libraries": library_versions(),
        "run_key": scratch.run_key,
    }


def _domain_record(domain: DomainModel | None) -> dict[str, Any] | None:
    """The card's ``domain`` (file and sha256 are filled in when the model ships)."""
    if domain is None:
        return None
    return {
        "method": "Mahalanobis distance of penultimate features (Ledoit-Wolf covariance of the train split)",
        "layer": f"input of {FEATURE_LAYER}",
        "percentile": domain.percentile,
        "threshold": domain.threshold,
        "dimensions": int(domain.mean.size),
        "file": None,
        "sha256": None,
    }


def _data_record(run: _Run, splits_sha: str, data: _Data) -> dict[str, Any]:
    manifest = run.splits_csv.with_name("manifest.csv")
    return {
        "splits_file": run.splits_csv.as_posix(),
        "splits_sha256": splits_sha,
        "manifest_file": manifest.as_posix(),
        "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
        "train_images": len(data.train_labels),
        "val_images": len(data.val_labels),
        "train_class_counts": np.bincount(data.train_labels.astype(int), minlength=2).tolist(),
    }


def _images_per_second(run: _Run, data: _Data, start: _Start, outcome: _Outcome, fit_seconds: float) -> float | None:
    """Training throughput over the epochs this run trained (not those a continued model already had)."""
    trained = max(outcome.epochs_run - start.initial_epoch, 0)
    per_epoch = (
        len(data.train_labels)
        if run.cfg.steps_per_epoch is None
        else run.cfg.steps_per_epoch * run.input_cfg.batch_size
    )
    return round(per_epoch * trained / fit_seconds, 1) if fit_seconds else None


_DOMAIN_STAGED = "domain.npz"
REPORT_FILES = ("history.csv", "summary.txt", "architecture.png", "curves.png", "metrics.json")


def _stage_reports(run: _Run, scratch: _Scratch, model: Any, history: Mapping[str, list[float]]) -> None:
    """Write this run's reports (all but ``metrics.json``) into the staging folder, not over the shipped ones."""
    staged = run.staging_dir
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    if scratch.history_csv.is_file():
        shutil.copyfile(scratch.history_csv, staged / "history.csv")
    (staged / "summary.txt").write_text(_summary_text(model))
    plots.architecture(_layers_table(model), staged / "architecture.png", f"{run.name} architecture")
    if history:
        plots.training_curves(history, staged / "curves.png", f"{run.name}: training curves")


def _reject(run: _Run, model: Any, card: dict[str, Any], message: str) -> TrainingRejected:
    """Keep an unhealthy model (and its reports) for inspection under ``.rejected/``; return the error to raise."""
    rejected = run.models_dir / ".rejected"
    rejected.mkdir(exist_ok=True)
    save_keras(model, rejected / f"{run.name}.keras")
    card.update(
        model_file=(rejected / f"{run.name}.keras").as_posix(), model_sha256=sha256_file(rejected / f"{run.name}.keras")
    )
    write_card(rejected / f"{run.name}.card.json", card)
    reports = rejected / f"{run.name}.reports"
    shutil.rmtree(reports, ignore_errors=True)
    shutil.move(run.staging_dir, reports)
    return TrainingRejected(
        f"{message}; not shipped (kept for inspection in {rejected}/). Lower "
        f"train.{run.name}.learning_rate, or set train.common.health.on_collapse: warn to keep it"
    )


def _ship(
    run: _Run, model: Any, card: dict[str, Any], started: float, fallback: dict[str, Any] | None
) -> dict[str, Any]:
    """Store the model as a version (model, card, reports, statistics, data); install it when asked.

    Everything is assembled in the staging folder, then moved into ``registry/<name>/<id>/`` in one
    rename (:func:`cxr.provenance.model_store.add_version`). With ``run.install`` (every direct call,
    and ``promotion.policy: always``) the version becomes the shipped model at once
    (:func:`~cxr.provenance.model_store.install`: reports, statistics, model, the card last);
    otherwise the promotion step decides. An error before the version is stored leaves the registry
    and every shipped file as they were. A lineage record names the version either way.
    """
    staged = run.staging_dir
    model_tmp = staged / model_store.model_file(run.name)
    model.save(model_tmp)
    card["model_sha256"] = sha256_file(model_tmp)
    card["timings"]["total_seconds"] = round(time.perf_counter() - started, 1)
    _stage_metrics(staged, card)
    card["run"] = audit.current_run()
    card["lineage_data"] = audit.data_lineage(run.splits_csv)
    card["data_quality"] = _data_quality(run.splits_csv)
    if fallback is not None:
        card["fallback"] = fallback
    names = [n for n in REPORT_FILES if (staged / n).is_file()]
    card["reports"] = {
        "folder": run.reports_dir.as_posix(),
        "sha256": {n: sha256_file(staged / n) for n in names},
    }
    _stage_domain(run, card)
    card = write_card(staged / model_store.card_file(run.name), card).to_json()
    version = model_store.add_version(
        run.name,
        model_tmp,
        staged / model_store.card_file(run.name),
        staged / _DOMAIN_STAGED,
        [staged / n for n in names],
        staged / model_store.DATA_FILE,
        root=run.registry_dir,
        move=True,
    )
    audit.append(_lineage_record(run, card, version.id, card_digest(version.card_file)))
    shutil.rmtree(run.work_dir, ignore_errors=True)
    if run.install:
        _install_at_training(run, card, version)
    _log_version(run, card, version)
    return card


def _stage_metrics(staged: Path, card: Mapping[str, Any]) -> None:
    """Stage ``metrics.json``: the validation figures, epochs, health and training speed from the card."""
    metrics = {
        "val": card["validation"],
        "epochs_run": card["epochs_run"],
        "best_epoch": card["best_epoch"],
        "health": card["health"]["status"],
        "train_images_per_second": card["timings"]["train_images_per_second"],
    }
    write_json(staged / "metrics.json", metrics)


def _stage_domain(run: _Run, card: dict[str, Any]) -> None:
    """Point the card at the staged domain statistics, or stage a file saying there are none."""
    staged = run.staging_dir
    domain_path = run.model_path.with_name(run.name + SUFFIX)
    if card.get("domain") and (staged / _DOMAIN_STAGED).is_file():
        card["domain"].update(file=domain_path.as_posix(), sha256=sha256_file(staged / _DOMAIN_STAGED))
    else:  # no statistics for this model, and none of the old model's: a file saying so (DVC declares it)
        card["domain"] = None
        write_bytes_atomic(staged / _DOMAIN_STAGED, no_domain_bytes())


def _install_at_training(run: _Run, card: Mapping[str, Any], version: model_store.Version) -> None:
    """Ship the stored version at once (``run.install``) and record it as promotion would."""
    try:
        before = model_store.champion(run.shipped, run.registry_dir)
    except CxrError as exc:  # a damaged shipped model is replaced, not kept as a version
        log.warning("%s: the shipped model is not kept as a version: %s", run.name, exc)
        before = None
    model_store.install(version, run.shipped)
    _record_install(run, card, version, before.id if before else None)


def _log_version(run: _Run, card: Mapping[str, Any], version: model_store.Version) -> None:
    """One line: the version stored, whether it ships, its best epoch, validation AUC and health."""
    log.info(
        "%s: version %s (sha256 %s) %s, best epoch %s, val AUC %s, %s",
        run.name,
        version.id,
        card["model_sha256"][:12],
        f"shipped as {run.model_path}" if run.install else "stored; the promotion step decides whether it ships",
        card["best_epoch"],
        num(card["validation"].get("auc"), 4),
        card["health"]["status"],
    )


def _record_install(run: _Run, card: Mapping[str, Any], version: model_store.Version, before: str | None) -> None:
    """A version installed at training (no gate): its decision file and lineage event, as promotion writes them."""
    line = f"{run.name}: version {version.id} installed at training (no comparison)" + (
        f"; version {before} retired" if before and before != version.id else ""
    )
    write_json(
        run.reports_dir / "promotion.json",
        {
            "model": run.name,
            "policy": "installed at training",
            "promoted": True,
            "outcome": "installed at training",
            "reasons": [],
            "challenger": {**version.summary(), "reference": None},
            "champion": {"id": before} if before else None,
            "shipped": {"id": version.id},
            "line": line,
        },
    )
    audit.append(
        {
            "event": "promotion",
            "model": run.name,
            "model_sha256": card["model_sha256"],
            "version": version.id,
            "promoted": True,
            "outcome": "installed at training",
            "reasons": [],
            "champion": before,
            "shipped": version.id,
            "run": card["run"],
        }
    )


def _data_quality(splits_csv: Path) -> dict[str, Any] | None:
    """Images listed and excluded by the prepare step that cut ``splits_csv`` (the drift report compares them)."""
    quality = HERE.quality if splits_csv.resolve() == HERE.splits.resolve() else None
    if quality is None or not quality.is_file():
        return None
    try:
        report = json.loads(quality.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict):
        return None
    return {k: report.get(k) for k in ("images_listed", "excluded_count") if isinstance(report.get(k), int)}


def _lineage_record(run: _Run, card: Mapping[str, Any], version: str, digest: str) -> dict[str, Any]:
    return {
        "model": run.name,
        "version": version,
        "model_file": run.model_path.as_posix(),
        "model_sha256": card["model_sha256"],
        "card_digest": digest,  # the card is checked against these two (lineage_log.card_change)
        "card_fields": decisive_fields(card),
        "data": card["lineage_data"],
        "params": {"train": card["train_config"], "input": card["input"]},
        "code": card["code"],
        "run": card["run"],
        "metrics": {"validation": card["validation"]},
        "epochs_run": card["epochs_run"],
        "created": card["created"],
    }
