"""Train one model of the registry on ``splits.csv``; write the model, its card and its curves.

Outputs for model ``<name>``:
- ``models/<name>.keras`` (Keras 3 format, loads with ``safe_mode=True``) and
  ``models/<name>.card.json`` (model card and lineage), replaced together only when a healthy
  model is ready, so an interrupted or rejected run leaves the previous pair intact;
- ``reports/train/<name>/``: ``history.csv``, ``metrics.json`` (DVC metrics), ``curves.png``,
  ``summary.txt``, ``architecture.png``;
- ``logs/scalars/<name>_<time>/`` for TensorBoard.

A killed run resumes from its last completed epoch (Keras ``BackupAndRestore`` under
``models/.backup/<name>/<run key>``, where the key covers data, parameters and code).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cxr.errors import CxrError, DataError
from cxr.evaluation.metrics import validation_operating_point
from cxr.files import save_keras, write_json
from cxr.logs import interactive
from cxr.provenance import lineage_log as audit
from cxr.provenance.hashing import sha256_file
from cxr.provenance.versions import code_version, library_versions
from cxr.reporting import plots
from cxr.runtime import configure, distribution
from cxr.training.health import HealthConfig, assess
from cxr.training.input_pipeline import InputConfig, load_images, make_dataset, read_split

log = logging.getLogger(__name__)

CLASS_WEIGHTS = ("balanced", "none")
OPTIMIZERS = ("adam", "adamw")


class TrainingRejected(CxrError):
    """The run finished but its model failed the health check (collapsed or degenerate)."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    learning_rate: float = 1e-3
    seed: int = 42
    deterministic: bool = True
    precision: str = "auto"
    class_weight: str = "balanced"
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    monitor: str = "val_auc"
    monitor_mode: str = "max"
    early_stopping: dict[str, Any] = field(default_factory=lambda: {"enabled": True, "patience": 5,
                                                                       "min_delta": 0.001})
    reduce_lr: dict[str, Any] = field(default_factory=lambda: {"monitor": "val_loss", "factor": 0.3,
                                                                  "patience": 3, "min_lr": 1e-6})
    tensorboard: bool = True
    distribute: str = "auto"  # auto (MirroredStrategy on 2+ GPUs) | mirrored | none
    continue_epochs: int = 0
    optimizer: str = "adam"  # adam | adamw (decoupled weight decay)
    weight_decay: float = 0.0  # adamw only
    label_smoothing: float = 0.0  # binary targets become {s/2, 1 − s/2}: softer, better-calibrated outputs
    ema: bool = False  # validate, checkpoint and ship an exponential moving average of the weights
    target_sensitivity: float | None = None  # shipped threshold: None = Youden's J on validation, else this sensitivity
    health: HealthConfig = field(default_factory=HealthConfig)
    model: dict[str, Any] = field(default_factory=dict)  # builder options (weights, dropout...)

    @classmethod
    def from_params(cls, train_params: Mapping[str, Any], name: str) -> TrainConfig:
        common = dict(train_params.get("common") or {})
        own = dict(train_params.get(name) or {})
        merged = {**common, **{k: v for k, v in own.items() if k in cls.__dataclass_fields__}}
        builder_opts = {k: v for k, v in own.items() if k not in cls.__dataclass_fields__}
        health = HealthConfig(**(merged.pop("health", None) or {}))
        merged.pop("model", None)
        cfg = cls(**merged, health=health, model=builder_opts)
        if cfg.class_weight not in CLASS_WEIGHTS:
            raise CxrError(f"train.{name}.class_weight={cfg.class_weight!r}: choose balanced or none")
        if cfg.optimizer not in OPTIMIZERS:
            raise CxrError(f"train.{name}.optimizer={cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if not 0 <= cfg.label_smoothing < 0.5:
            raise CxrError(f"train.{name}.label_smoothing={cfg.label_smoothing}: choose a value in [0, 0.5)")
        if cfg.target_sensitivity is not None and not 0 < cfg.target_sensitivity < 1:
            raise CxrError(f"train.{name}.target_sensitivity={cfg.target_sensitivity}: choose null or a fraction "
                           "in (0, 1)")
        if cfg.weight_decay < 0:
            raise CxrError(f"train.{name}.weight_decay={cfg.weight_decay}: must be ≥ 0")
        if cfg.monitor_mode not in ("min", "max"):
            raise CxrError(f"train.{name}.monitor_mode={cfg.monitor_mode!r}: choose min or max")
        return cfg


def class_weights(labels: np.ndarray, mode: str) -> dict[int, float] | None:
    """Keras class weights: ``balanced`` = n / (2 · n_class), as sklearn computes them."""
    if mode == "none":
        return None
    counts = np.bincount(labels.astype(int), minlength=2)
    if (counts == 0).any():
        raise DataError(f"the train split lacks a class (counts {counts.tolist()})")
    return {c: float(len(labels) / (2 * counts[c])) for c in (0, 1)}


class EpochLine:
    """One log line per epoch when no terminal is attached (Keras' own bar otherwise)."""

    def __new__(cls, name: str, epochs: int) -> Any:
        import keras

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                logs = logs or {}
                shown = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if isinstance(v, float))
                log.info("%s epoch %d/%d %.0fs %s", name, epoch + 1, epochs,
                         time.perf_counter() - self.started, shown)

        return _Callback()


def _run_key(name: str, cfg: TrainConfig, input_cfg: InputConfig, splits_sha: str) -> str:
    payload = json.dumps({"name": name, "cfg": repr(cfg), "input": repr(input_cfg), "splits": splits_sha,
                          "code": [sha256_file(Path(__file__).with_name(f)) for f in
                                   ("train.py", "models.py", "input_pipeline.py", "augment.py")]},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _readable_h5(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r"):
            return True
    except (OSError, ValueError):
        return False


def _usable_backup(backup_dir: Path) -> bool:
    """True when an interrupted run left a readable backup; an unreadable one is removed (start over)."""
    if not backup_dir.is_dir() or not any(backup_dir.iterdir()):
        return False
    if any(_readable_h5(backup_dir / name) for name in ("latest.weights.h5", "latest.weights.h5.bkp")):
        return True
    log.warning("backup in %s is unreadable (killed while writing?); starting the run over", backup_dir)
    shutil.rmtree(backup_dir, ignore_errors=True)
    return False


def _trim_history(history_csv: Path, backup_dir: Path) -> None:
    """Drop history rows of epochs the backup does not hold (they are about to be trained again)."""
    import pandas as pd

    use_previous = not _readable_h5(backup_dir / "latest.weights.h5")  # Keras falls back to the .bkp too
    meta = backup_dir / ("training_metadata.json.bkp" if use_previous else "training_metadata.json")
    if not (meta.is_file() and history_csv.is_file()):
        return
    resume_at = int(json.loads(meta.read_text()).get("epoch", 0))
    frame = pd.read_csv(history_csv)
    kept = frame[frame["epoch"] < resume_at]
    if len(kept) != len(frame):
        kept.to_csv(history_csv, index=False)


def compile_model(model: Any, learning_rate: float, optimizer: str = "adam", weight_decay: float = 0.0,
                  label_smoothing: float = 0.0, ema: bool = False) -> None:
    """Compile for binary pneumonia classification with the notebook's metrics.

    Args:
        model: an uncompiled (or loaded) Keras model.
        learning_rate: the optimiser's initial learning rate.
        optimizer: ``adam`` or ``adamw`` (decoupled ``weight_decay``).
        weight_decay: AdamW's decoupled weight decay.
        label_smoothing: binary cross-entropy label smoothing.
        ema: keep an exponential moving average of the weights (swapped in for validation).
    """
    import keras

    opt_cls = keras.optimizers.AdamW if optimizer == "adamw" else keras.optimizers.Adam
    opt_kwargs: dict[str, Any] = {"learning_rate": learning_rate, "use_ema": ema}
    if optimizer == "adamw":
        opt_kwargs["weight_decay"] = weight_decay
    model.compile(
        optimizer=opt_cls(**opt_kwargs),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy", keras.metrics.Precision(name="precision"),
                 keras.metrics.Recall(name="recall"), keras.metrics.AUC(name="auc")],
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


def train(
    name: str,
    params: Mapping[str, Any],
    splits_csv: str | Path = "data/prepared/splits.csv",
    models_dir: str | Path = "models",
    reports_dir: str | Path = "reports/train",
    logs_dir: str | Path = "logs",
) -> dict[str, Any]:
    """Train model ``name`` with ``params`` (the whole params.yaml mapping); return its card."""
    started = time.perf_counter()
    from cxr.training.models import build_model

    train_params = params.get("train") or {}
    cfg = TrainConfig.from_params(train_params, name)
    input_cfg = InputConfig.from_params(params.get("input") or {})
    models_dir, reports_dir = Path(models_dir), Path(reports_dir) / name
    models_dir.mkdir(parents=True, exist_ok=True)
    reports_dir.mkdir(parents=True, exist_ok=True)
    splits_csv = Path(splits_csv)
    if not splits_csv.is_file():
        raise DataError(f"{splits_csv}: not found; run the prepare step first (dvc repro prepare)")
    splits_sha = sha256_file(splits_csv)
    manifest = splits_csv.with_name("manifest.csv")

    policy = configure(cfg.seed, cfg.deterministic, cfg.precision)
    import keras

    train_paths, train_labels, train_key = read_split(splits_csv, "train")
    val_paths, val_labels, val_key = read_split(splits_csv, "val")
    train_images = load_images(train_paths, train_key, input_cfg, "train")
    val_images = load_images(val_paths, val_key, input_cfg, "val")
    train_ds = make_dataset(train_images, train_labels, input_cfg, shuffle=True, augment=True, seed=cfg.seed)
    val_ds = make_dataset(val_images, val_labels, input_cfg, shuffle=False,
                          augment=input_cfg.augment_validation, seed=cfg.seed + 1)
    weights = class_weights(train_labels, cfg.class_weight)

    strategy = distribution(cfg.distribute)
    if strategy.num_replicas_in_sync > 1:
        log.info("%s: training on %d replicas (%s)", name, strategy.num_replicas_in_sync, type(strategy).__name__)
    model_path = models_dir / f"{name}.keras"
    card_path = models_dir / f"{name}.card.json"
    initial_epoch, epochs, previous = 0, cfg.epochs, None
    if cfg.continue_epochs > 0:
        if not (model_path.is_file() and card_path.is_file()):
            raise CxrError(f"train.{name}.continue_epochs={cfg.continue_epochs}: no saved {model_path} "
                           "with its card to continue from; train it first with continue_epochs: 0")
        previous = json.loads(card_path.read_text())
        if previous.get("model_sha256") != sha256_file(model_path):
            raise CxrError(f"{model_path} does not match its card (sha256 differs): refusing to continue")
        with strategy.scope():
            model = keras.saving.load_model(model_path, safe_mode=True)
        initial_epoch = int(previous.get("epochs_run", 0))
        epochs = initial_epoch + cfg.continue_epochs
        log.info("%s: continuing %s from epoch %d for %d more epochs", name, model_path, initial_epoch,
                 cfg.continue_epochs)
    else:
        with strategy.scope():
            model = build_model(name, input_cfg.image_size, cfg.model, normalize=input_cfg.normalize,
                                    center_crop=input_cfg.center_crop)
    with strategy.scope():
        compile_model(model, cfg.learning_rate, cfg.optimizer, cfg.weight_decay, cfg.label_smoothing, cfg.ema)

    run_key = _run_key(name, cfg, input_cfg, splits_sha + (previous or {}).get("model_sha256", ""))
    backup_dir = models_dir / ".backup" / name / run_key
    work_dir = models_dir / ".work" / name
    work_dir.mkdir(parents=True, exist_ok=True)
    best_path = work_dir / f"best-{run_key}.keras"
    history_csv = reports_dir / "history.csv"
    resuming = _usable_backup(backup_dir)
    if resuming:
        log.warning("%s: resuming an interrupted run from %s", name, backup_dir)
        _trim_history(history_csv, backup_dir)
    elif cfg.continue_epochs == 0:
        history_csv.unlink(missing_ok=True)
        best_path.unlink(missing_ok=True)

    # On resume, the best checkpoint so far must only be replaced by a better epoch.
    so_far = _history(history_csv).get(cfg.monitor) if resuming else None
    best_so_far = None
    if so_far:
        best_so_far = (max if cfg.monitor_mode == "max" else min)(v for v in so_far if v == v)
    callbacks: list[Any] = [
        # CSVLogger before BackupAndRestore: an epoch's row is on disk before its backup, so a kill
        # between the two repeats the epoch (its row is then replaced) rather than losing its row.
        keras.callbacks.CSVLogger(str(history_csv), append=True),
        keras.callbacks.BackupAndRestore(str(backup_dir), save_freq="epoch", delete_checkpoint=True,
                                         double_checkpoint=True),  # a kill mid-write leaves the previous one
        keras.callbacks.TerminateOnNaN(),
        *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg.ema else []),
        keras.callbacks.ModelCheckpoint(str(best_path), monitor=cfg.monitor, mode=cfg.monitor_mode,
                                        save_best_only=True, initial_value_threshold=best_so_far),
        keras.callbacks.ReduceLROnPlateau(**{"monitor": "val_loss", **cfg.reduce_lr}),
    ]
    if cfg.early_stopping.get("enabled", True):
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=cfg.early_stopping.get("monitor", cfg.monitor),
            mode=cfg.early_stopping.get("mode", cfg.monitor_mode),
            patience=int(cfg.early_stopping.get("patience", 5)),
            min_delta=float(cfg.early_stopping.get("min_delta", 0.0)),
            restore_best_weights=True,
        ))
    if cfg.tensorboard:
        stamp = datetime.now().strftime("%m%d%Y-%H%M%S")
        tb_dir = Path(logs_dir) / "scalars" / f"{name}_{stamp}"
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tb_dir)))
    verbose = 1 if interactive() else 0
    if not verbose:
        callbacks.append(EpochLine(name, epochs))

    log.info("%s: training %d images (%s), validating on %d, precision %s, class weights %s", name,
             len(train_labels), input_cfg.resize, len(val_labels), policy, weights)
    fit_started = time.perf_counter()
    fit = model.fit(train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=initial_epoch,
                    class_weight=weights, steps_per_epoch=cfg.steps_per_epoch, shuffle=False,
                    validation_steps=cfg.validation_steps, callbacks=callbacks, verbose=verbose)
    fit_seconds = time.perf_counter() - fit_started
    del fit
    history = _history(history_csv)
    if best_path.is_file():
        model = keras.saving.load_model(best_path, safe_mode=True)

    eval_ds = make_dataset(val_images, val_labels, input_cfg, shuffle=False, augment=False, seed=0)
    probabilities = model.predict(eval_ds, verbose=0).reshape(-1).astype(np.float64)
    health = assess(val_labels, probabilities, history, cfg.health)
    point = validation_operating_point(val_labels, probabilities, cfg.target_sensitivity)
    epochs_run = int(history["epoch"][-1]) if history.get("epoch") else epochs
    best_epoch = None
    if history.get(cfg.monitor):
        pick = np.nanargmax if cfg.monitor_mode == "max" else np.nanargmin
        values = np.asarray(history[cfg.monitor], dtype=float)
        best_epoch = int(history["epoch"][int(pick(values))]) if not np.isnan(values).all() else None
    images_seen = len(train_labels) * max(epochs_run - initial_epoch, 0) if cfg.steps_per_epoch is None else \
        cfg.steps_per_epoch * input_cfg.batch_size * max(epochs_run - initial_epoch, 0)

    card: dict[str, Any] = {
        "model": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_file": model_path.as_posix(),
        "model_sha256": None,
        "parameters": {
            "total": int(model.count_params()),
            "trainable": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
            "non_trainable": int(sum(np.prod(w.shape) for w in model.non_trainable_weights)),
        },
        "data": {
            "splits_file": splits_csv.as_posix(), "splits_sha256": splits_sha,
            "manifest_file": manifest.as_posix(),
            "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
            "train_images": len(train_labels), "val_images": len(val_labels),
            "train_class_counts": np.bincount(train_labels.astype(int), minlength=2).tolist(),
        },
        "train_config": {k: v for k, v in vars(cfg).items() if k != "health"} | {"health": vars(cfg.health)},
        "input": {"preprocessing": input_cfg.preprocessing(), "augment": vars(input_cfg.augment),
                  "augment_validation": input_cfg.augment_validation, "batch_size": input_cfg.batch_size},
        "precision_policy": policy,
        "replicas": int(strategy.num_replicas_in_sync),
        "class_weights": weights,
        "epochs_run": epochs_run,
        "initial_epoch": initial_epoch,
        "best_epoch": best_epoch,
        "monitor": cfg.monitor,
        "resumed_interrupted_run": resuming,
        "continued_from": (previous or {}).get("model_sha256"),
        "validation": health.metrics,
        "operating_point": point,
        "health": {"status": health.status, "problems": health.problems},
        "timings": {"fit_seconds": round(fit_seconds, 1), "total_seconds": None,
                    "train_images_per_second": round(images_seen / fit_seconds, 1) if fit_seconds else None},
        "code": code_version(),
        "libraries": library_versions(),
        "run_key": run_key,
    }
    (reports_dir / "summary.txt").write_text(_summary_text(model))
    plots.architecture(_layers_table(model), reports_dir / "architecture.png", f"{name} architecture")
    if history:
        plots.training_curves(history, reports_dir / "curves.png", f"{name}: training curves")

    if health.status != "healthy":
        level_msg = f"{name}: model is {health.status}: {'; '.join(health.problems)}"
        log.error("%s", level_msg)
        if cfg.health.on_collapse == "fallback":
            lower = cfg.learning_rate * cfg.health.fallback_lr_factor
            log.warning("%s: falling back to a fresh run at learning rate %g", name, lower)
            retry = {**params, "train": {**train_params, name: {
                **(train_params.get(name) or {}), "learning_rate": lower,
                "health": {**vars(cfg.health), "on_collapse": "fail"}}}}
            card = train(name, retry, splits_csv, models_dir, reports_dir.parent, logs_dir)
            card["fallback"] = {"from_learning_rate": cfg.learning_rate, "problems": health.problems}
            write_json(card_path, card)
            return card
        if cfg.health.on_collapse == "fail":
            rejected = models_dir / ".rejected"
            rejected.mkdir(exist_ok=True)
            save_keras(model, rejected / f"{name}.keras")
            card.update(model_file=(rejected / f"{name}.keras").as_posix(),
                        model_sha256=sha256_file(rejected / f"{name}.keras"))
            write_json(rejected / f"{name}.card.json", card)
            raise TrainingRejected(
                f"{level_msg}; not shipped (kept for inspection in {rejected}/). Lower "
                f"train.{name}.learning_rate, or set train.common.health.on_collapse: warn to keep it"
            )

    save_keras(model, model_path)
    card["model_sha256"] = sha256_file(model_path)
    card["timings"]["total_seconds"] = round(time.perf_counter() - started, 1)
    metrics = {"val": health.metrics, "epochs_run": epochs_run, "best_epoch": best_epoch,
               "health": health.status, "train_images_per_second": card["timings"]["train_images_per_second"]}
    write_json(reports_dir / "metrics.json", metrics)
    card["run"] = audit.current_run()
    card["lineage_data"] = audit.data_lineage(splits_csv)
    write_json(card_path, card)
    audit.append({"model": name, "model_file": model_path.as_posix(), "model_sha256": card["model_sha256"],
                  "data": card["lineage_data"], "params": {"train": card["train_config"], "input": card["input"]},
                  "code": card["code"], "run": card["run"], "metrics": {"validation": health.metrics},
                  "epochs_run": epochs_run, "created": card["created"]})
    shutil.rmtree(work_dir, ignore_errors=True)
    log.info("%s: saved %s (sha256 %s), best epoch %s, val AUC %.4f, %s", name, model_path,
             card["model_sha256"][:12], best_epoch, health.metrics.get("auc", math.nan), health.status)
    return card
