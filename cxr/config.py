"""``params.yaml``, strictly: one typed, frozen dataclass per section, and every default in one place.

Every entry point (the ``cxr`` command, ``dvc repro`` through it, the Prefect flow and its
parameters) reads settings through :func:`load_config` / :func:`load_params`, so a misspelled key,
a value of the wrong type or one out of range stops the run with one line, before any work starts:

    params.yaml: split.seeed: unknown key (section split allows seed, strategy, test_size, val_size); did you mean seed?
    params.yaml: train.smallnet.epochs=-1: must be ≥ 1

The defaults below are the shipped recipe; ``params.yaml`` repeats them so DVC can track each one
(a guard test keeps the two equal).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from cxr.errors import CxrError
from cxr.files import SMALL_FILE, read_bounded

DEFAULT_PATH = Path("params.yaml")


class ConfigError(CxrError, ValueError):
    """A setting that does not exist, has the wrong type or is out of range."""


SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's random states take 0 to 2**32 - 1


def _seed(default: int = 42) -> Any:
    return _opt(default, ge=0, le=SEED_MAX, doc="the range numpy and scikit-learn seeds take")


def _bound(value: float) -> str:
    """A range bound in full: ``4294967295``, ``100000``, ``0.5`` (not ``4.29497e+09``)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _opt(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    doc: str = "",
) -> Any:
    """A field with a default and an allowed range (checked by :func:`parse_section`)."""
    meta = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc}.items() if v not in (None, "")}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------- data, prepare, split
@dataclass(frozen=True)
class DataConfig:
    """Where the images come from (``cxr fetch``)."""

    # auto: kaggle when credentials are configured, else the embedded demo sample (cxr.data.fetch.resolve_source)
    source: Literal["kaggle", "dir", "medmnist", "sample", "auto"] = "auto"
    kaggle_dataset: str = "paultimothymooney/chest-xray-pneumonia"
    dir: str = "data/inbox"
    # folders that links in data.dir (and external sets) may lead into, besides the folder itself and
    # its DVC cache (cxr.data.links)
    link_roots: tuple[str, ...] = ()
    npz: str = ""
    medmnist_size: Literal[28, 64, 128, 224] = 28
    retries: int = _opt(4, ge=0, le=100)
    retry_backoff_s: float = _opt(2.0, ge=0)
    max_files: int = _opt(100_000, ge=1)
    max_bytes: int = _opt(20_000_000_000, ge=1)
    max_ratio: float = _opt(200.0, gt=1, doc="zip-bomb guard: uncompressed/compressed, per entry over 1 MiB")


@dataclass(frozen=True)
class PrepareConfig:
    """The manifest and data-quality step (``cxr prepare``)."""

    min_images_per_class: int = _opt(10, ge=1, le=1_000_000)
    workers: int = _opt(0, ge=0, le=512, doc="0 = all cores")


@dataclass(frozen=True)
class SplitConfig:
    """The train / validation / test split."""

    strategy: Literal["patient", "seed"] = "patient"
    seed: int = _seed()
    test_size: float = _opt(0.2, gt=0, lt=1)
    val_size: float = _opt(0.2, gt=0, lt=1)


# ---------------------------------------------------------------- input pipeline
@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random changes applied to each training image (0 = off).

    Args:
        rotation_deg: rotation uniform in ±rotation_deg degrees.
        width_shift, height_shift: translation uniform in ± that fraction of the width / height.
        fill_mode: how pixels moved in from outside the film are filled (nearest, constant, ...).
        zoom: scale uniform in [1 − zoom, 1 + zoom] (above 1 magnifies).
        shear_deg: horizontal shear angle uniform in ±shear_deg degrees.
        horizontal_flip: mirror left–right with probability 0.5 (moves the heart to the right).
        brightness: add uniform ±brightness of the full range.
        contrast: scale deviations from the image mean by uniform [1 − contrast, 1 + contrast].
        gamma: gamma uniform in [1 − gamma, 1 + gamma] applied to [0, 1] intensities.
        blur_sigma: Gaussian blur with sigma uniform in [0, blur_sigma] pixels, on half the images.
        noise_std: Gaussian noise with std uniform in [0, noise_std] of the full range.
        jpeg_quality: re-encode half the images as JPEG at a quality uniform in [jpeg_quality, 95]
            (0 = off).
    """

    rotation_deg: float = _opt(15.0, ge=0, le=180)
    width_shift: float = _opt(0.1, ge=0, lt=1)
    height_shift: float = _opt(0.1, ge=0, lt=1)
    fill_mode: Literal["nearest", "constant", "reflect", "wrap"] = "constant"
    zoom: float = _opt(0.2, ge=0, lt=1)
    shear_deg: float = _opt(0.0, ge=0, lt=90)
    horizontal_flip: bool = False
    brightness: float = _opt(0.1, ge=0, le=1)
    contrast: float = _opt(0.3, ge=0, le=1)
    gamma: float = _opt(0.3, ge=0, lt=1)
    blur_sigma: float = _opt(0.0, ge=0)
    noise_std: float = _opt(0.0, ge=0, le=1)
    jpeg_quality: int = _opt(0, ge=0, le=95)

    def __post_init__(self) -> None:
        _check(self, "input.augment")

    @property
    def is_identity(self) -> bool:
        """True when every range is zero (the batch comes back unchanged)."""
        return not any(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "fill_mode")


@dataclass(frozen=True)
class InputConfig:
    """The tf.data input pipeline (decode, cache, resize, batch, augment).

    ``augment_validation`` is written under ``input.augment`` in ``params.yaml`` (where the
    notebook's generator had it) and lifted here by :func:`parse_input`.
    """

    image_size: int = _opt(160, ge=32, le=2048)
    resize: Literal["squash", "pad"] = "squash"
    interpolation: Literal["bilinear", "nearest", "area", "bicubic"] = "bilinear"
    batch_size: int = _opt(32, ge=1, le=4096)
    cache: Literal["disk", "memory", "none"] = "disk"
    cache_dir: str = "data/cache"
    # decode caps (cxr.common.images.ImageLimits): a larger file is excluded by prepare, refused by training and predict
    max_image_pixels: int = _opt(50_000_000, ge=1, doc="width × height × frames; the largest chest film is ~18.5 M")
    max_image_bytes: int = _opt(200_000_000, ge=1, doc="file size, checked before a byte is read")
    normalize: Literal["none", "standardize", "equalize"] = "equalize"
    center_crop: float = _opt(0.0, ge=0, lt=0.4)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    augment_validation: bool = False

    def __post_init__(self) -> None:
        _check(self, "input")

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> InputConfig:
        """The ``input`` section of ``params.yaml`` (a mapping), strictly parsed."""
        return parse_input(params or {})

    def preprocessing(self) -> dict[str, Any]:
        """What a model trained on this pipeline expects (stored in its model card)."""
        return {
            "image_size": self.image_size,
            "resize": self.resize,
            "interpolation": self.interpolation,
            "channels": 3,
            "scale": "1/255",
            "dtype": "float32",
            "normalize": self.normalize,
            "center_crop": self.center_crop,
        }  # normalize and center_crop run inside the model


def parse_input(raw: Mapping[str, Any], where: str = "input") -> InputConfig:
    """Strictly parse the ``input`` section (``augment.augment_validation`` moves up a level).

    Args:
        raw: the ``input`` mapping of ``params.yaml``.
        where: the section's dotted name, for error messages.

    Returns:
        The frozen :class:`InputConfig`.
    """
    raw = _mapping(raw, where)
    augment = dict(_mapping(raw.get("augment"), f"{where}.augment"))
    lifted = {"augment_validation": augment.pop("augment_validation")} if "augment_validation" in augment else {}
    return parse_section(InputConfig, {**raw, "augment": augment, **lifted}, where)


# ---------------------------------------------------------------- training
@dataclass(frozen=True)
class HealthConfig:
    """The post-training collapse check and what to do when it fails."""

    on_collapse: Literal["fail", "warn", "fallback"] = "fail"
    min_val_auc: float = _opt(0.6, ge=0, le=1)
    min_prediction_std: float = _opt(0.01, ge=0)
    fallback_lr_factor: float = _opt(0.1, gt=0, lt=1)

    def __post_init__(self) -> None:
        _check(self, "train.common.health")


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when the monitored signal has not improved by ``min_delta`` for ``patience`` epochs."""

    enabled: bool = True
    patience: int = _opt(5, ge=0, le=10_000)
    min_delta: float = _opt(0.001, ge=0)
    monitor: str | None = None  # None = train.monitor (the checkpoint's signal)
    mode: Literal["min", "max"] | None = None  # None = train.monitor_mode


@dataclass(frozen=True)
class ReduceLRConfig:
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement."""

    monitor: str = "val_loss"
    factor: float = _opt(0.3, gt=0, lt=1)
    patience: int = _opt(3, ge=0, le=10_000)
    min_lr: float = _opt(1e-6, ge=0)


@dataclass(frozen=True)
class TrainConfig:
    """How one model trains: ``train.common`` overlaid with ``train.<model>``.

    ``model`` holds the builder's own options (declared in :mod:`cxr.model_options`).
    """

    epochs: int = _opt(15, ge=1, le=10_000)
    learning_rate: float = _opt(1e-3, gt=0, le=10)
    continue_epochs: int = _opt(0, ge=0, le=10_000)
    seed: int = _seed()
    deterministic: bool = True
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    class_weight: Literal["balanced", "none"] = "balanced"
    steps_per_epoch: int | None = _opt(None, ge=1, le=1_000_000)
    min_steps_per_epoch: int = _opt(30, ge=1, le=1_000_000)
    validation_steps: int | None = _opt(None, ge=1, le=1_000_000)
    monitor: str = "val_auc"
    monitor_mode: Literal["min", "max"] = "max"
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    reduce_lr: ReduceLRConfig = field(default_factory=ReduceLRConfig)
    tensorboard: bool = True
    distribute: Literal["auto", "mirrored", "none"] = "auto"
    optimizer: Literal["adam", "adamw"] = "adamw"
    weight_decay: float = _opt(1e-4, ge=0)
    label_smoothing: float = _opt(0.1, ge=0, lt=0.5)
    ema: bool = True
    schedule: Literal["plateau", "cosine"] = "plateau"
    warmup_epochs: int = _opt(0, ge=0, le=10_000)
    checkpoint: Literal["best", "last"] = "best"
    mixup: float = _opt(0.0, ge=0, le=1)
    domain_check: bool = True
    domain_percentile: float = _opt(99.5, gt=50, le=100)
    target_sensitivity: float | None = _opt(0.9, gt=0, lt=1)
    health: HealthConfig = field(default_factory=HealthConfig)
    model: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self, "train")

    @classmethod
    def from_params(cls, train_params: Mapping[str, Any], name: str) -> TrainConfig:
        """The settings of model ``name`` from the ``train`` section (common overlaid with its own).

        Args:
            train_params: the ``train`` mapping of ``params.yaml``.
            name: a model name (a ``train.<name>`` block, or a registered architecture).

        Returns:
            The frozen :class:`TrainConfig`, with the builder's options under ``model``.
        """
        return model_config(train_params, name)


_MODEL_KEYS = ("architecture",)  # per-model keys that are neither training settings nor builder options


def model_config(train: Mapping[str, Any], name: str) -> TrainConfig:
    """Strictly parse ``train.common`` overlaid with ``train.<name>``.

    Args:
        train: the ``train`` mapping of ``params.yaml``.
        name: the model (its block's key; an ``architecture`` key there names the builder when it differs).

    Returns:
        The model's :class:`TrainConfig`, with the builder's options (defaults filled in) under ``model``.

    Raises:
        ConfigError: an unknown key, a wrong type, an out-of-range value, or an unregistered architecture.
    """
    from cxr.model_options import options_class

    train = _mapping(train, "train")
    common = dict(_mapping(train.get("common"), "train.common"))
    own = dict(_mapping(train.get(name), f"train.{name}"))
    if "model" in common or "model" in own:
        raise ConfigError(f"train.{name}: 'model' is not a setting (builder options go directly under train.{name})")
    _known_keys(common, _train_keys(), "train.common")
    architecture = own.pop("architecture", None) or name
    if not isinstance(architecture, str):
        raise ConfigError(f"train.{name}.architecture={architecture!r}: expected a model name")
    try:
        options_cls = options_class(architecture, where=f"train.{name}")
    except CxrError as exc:
        raise ConfigError(str(exc)) from None
    own_train = {k: v for k, v in own.items() if k in _train_keys()}
    builder = {k: v for k, v in own.items() if k not in _train_keys()}
    _known_keys(builder, _train_keys() + _names(options_cls) + _MODEL_KEYS, f"train.{name}")
    options = parse_section(options_cls, builder, f"train.{name}")
    merged = {**common, **own_train}
    for nested in ("early_stopping", "reduce_lr", "health"):  # a model's block overrides single keys
        if isinstance(common.get(nested), Mapping) and isinstance(own_train.get(nested), Mapping):
            merged[nested] = {**common[nested], **own_train[nested]}
    model_opts = {**dataclasses.asdict(options), **({"architecture": architecture} if architecture != name else {})}
    return parse_section(TrainConfig, {**merged, "model": model_opts}, f"train.{name}")


def _train_keys() -> tuple[str, ...]:
    return tuple(n for n in _names(TrainConfig) if n != "model")


@dataclass(frozen=True)
class TrainSection:
    """The ``train`` section: which models to train, shared settings, and each model's own block."""

    models: tuple[str, ...] = ("smallnet", "cxrnet")
    common: Mapping[str, Any] = field(default_factory=lambda: _filled_common(TrainConfig()))
    blocks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def model(self, name: str) -> TrainConfig:
        """The full settings of model ``name``."""
        return model_config(self.as_params(), name)

    def as_params(self) -> dict[str, Any]:
        """The section as the mapping ``params.yaml`` holds."""
        return {
            "models": list(self.models),
            "common": copy.deepcopy(dict(self.common)),
            **{k: copy.deepcopy(dict(v)) for k, v in self.blocks.items()},
        }


def parse_train(raw: Mapping[str, Any]) -> TrainSection:
    """Validate the ``train`` section: every listed model and every block parses.

    Args:
        raw: the ``train`` mapping of ``params.yaml``.

    Returns:
        The :class:`TrainSection` (common settings with every default filled in).
    """
    raw = dict(_mapping(raw, "train"))
    models = raw.pop("models", list(TrainSection.models))
    if not isinstance(models, list | tuple) or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"train.models={models!r}: expected a list of model names")
    common = dict(_mapping(raw.pop("common", None), "train.common"))
    _known_keys(common, _train_keys(), "train.common")
    blocks = {k: dict(_mapping(v, f"train.{k}")) for k, v in raw.items()}
    full = {"common": common, **blocks}
    filled = _filled_common(parse_section(TrainConfig, common, "train.common"))
    for name in dict.fromkeys([*models, *blocks]):
        model_config(full, name)  # raises on the first bad key or value
    return TrainSection(models=tuple(models), common=filled, blocks=blocks)


def _filled_common(cfg: TrainConfig) -> dict[str, Any]:
    """``train.common`` with every default filled in (builder options are per model, not common)."""
    return {k: as_plain(getattr(cfg, k)) for k in _train_keys()}


# ---------------------------------------------------------------- ensemble, evaluation, report
@dataclass(frozen=True)
class EnsembleConfig:
    """Members whose mean P(pneumonia) becomes ``ensemble/ensemble.keras`` ([] = no ensemble)."""

    members: tuple[str, ...] = ("smallnet", "cxrnet")


@dataclass(frozen=True)
class OrchestrationConfig:
    """How the Prefect flow schedules work."""

    max_parallel_training: int = _opt(1, ge=1, le=64)


@dataclass(frozen=True)
class EvaluateConfig:
    """Scoring, operating point, confidence intervals and Grad-CAM."""

    external: Mapping[str, str] = field(default_factory=dict)
    roles: Mapping[str, str] = field(default_factory=dict)
    compared: Mapping[str, int] = field(default_factory=dict)
    allow_outside_intended_use: bool = False
    threshold_source: str = "validation"
    threshold: float = _opt(0.5, gt=0, lt=1)
    bootstrap: int = _opt(1000, ge=0, le=100_000, doc="resamples; 100,000 already takes minutes")
    seed: int = _seed()
    gradcam_per_outcome: int = _opt(2, ge=0, le=1000)
    gradcam_layer: str | None = None
    border_margin: float = _opt(0.125, gt=0, lt=0.5)

    def __post_init__(self) -> None:
        _check(self, "evaluate")
        check_external_sets(self.external)
        check_roles(self.roles, self.compared, self.external)
        source = self.threshold_source
        kind, _, name = source.partition(":")
        if source not in ("validation", "fixed") and kind != "external":
            raise ConfigError(f"evaluate.threshold_source={source!r}: choose one of validation, fixed, external:<name>")
        if kind == "external" and name not in self.external:
            raise ConfigError(
                f"evaluate.threshold_source={source}: no external set named {name!r} in "
                f"evaluate.external (configured: {', '.join(self.external) or 'none'})"
            )


_SET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
RESERVED_SET_NAMES = ("train", "val", "test")


SET_ROLES = ("selection", "confirmation")


def check_roles(roles: Mapping[str, Any], compared: Mapping[str, Any], external: Mapping[str, str]) -> None:
    """``evaluate.roles`` and ``evaluate.compared`` name configured sets with valid values.

    A **selection** set chooses among configurations (``compared`` says how many were compared on
    it); a **confirmation** set is scored, never chosen on, and flagged when settings change after
    its first scoring. A set without a role is a selection set: its figures are not confirmatory.

    Args:
        roles: ``{set name: selection | confirmation}``.
        compared: ``{selection set name: configurations compared on it}``.
        external: the configured sets.

    Raises:
        ConfigError: an unknown set, an unknown role, a count below 1, or a count for a confirmation set.
    """
    for key, mapping in (("roles", roles), ("compared", compared)):
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"evaluate.{key}: expected a mapping of external set name to a value")
        for name in mapping:
            if name not in external:
                raise ConfigError(
                    f"evaluate.{key}.{name}: no external set named {name!r} in evaluate.external "
                    f"(configured: {', '.join(external) or 'none'})"
                )
    for name, role in roles.items():
        if role not in SET_ROLES:
            raise ConfigError(f"evaluate.roles.{name}={role!r}: choose one of {', '.join(SET_ROLES)}")
    for name, count in compared.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"evaluate.compared.{name}={count!r}: give the number of configurations compared (≥ 1)")
        if roles.get(name) == "confirmation":
            raise ConfigError(f"evaluate.compared.{name}: a confirmation set is never used to compare configurations")


def check_external_sets(value: Any) -> dict[str, str]:
    """``evaluate.external`` checked: ``{name: folder}``.

    Args:
        value: the ``evaluate.external`` mapping.

    Returns:
        ``{set name: folder}``; names start with a letter and are not a split name.
    """
    if not isinstance(value, Mapping):
        raise ConfigError("evaluate.external: expected a mapping of name: folder, e.g. {hospital_b: /data/b}")
    sets = {}
    for name, folder in value.items():
        name = str(name)
        if not _SET_NAME.match(name) or name in RESERVED_SET_NAMES:
            raise ConfigError(
                f"evaluate.external: set name {name!r} must start with a letter, use letters, digits, "
                f"_ or -, and not be one of {sorted(RESERVED_SET_NAMES)}"
            )
        if not isinstance(folder, str) or not folder:
            raise ConfigError(f"evaluate.external.{name}: expected a folder path, got {folder!r}")
        sets[name] = folder
    return sets


def setting(section: Any, cls: type, name: str) -> Any:
    """One setting from a section given as its dataclass or as a (possibly partial) mapping.

    A missing key reads as the dataclass default, so the default is still written in one place.

    Args:
        section: the section (an instance of ``cls`` or a mapping).
        cls: the section's dataclass.
        name: the setting.

    Returns:
        Its value.
    """
    if isinstance(section, cls):
        return getattr(section, name)
    if name in section:
        return section[name]
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@dataclass(frozen=True)
class ReportConfig:
    """The HTML report."""

    readers: str = ""


@dataclass(frozen=True)
class PromotionConfig:
    """Champion/challenger: when a newly trained model replaces the shipped one (``cxr promote``)."""

    policy: Literal["gate", "always"] = "gate"
    reference: str = ""
    auc_margin: float = _opt(0.01, ge=0, le=1)
    sensitivity_margin: float = _opt(0.05, ge=0, le=1)
    ood_margin: float = _opt(0.02, ge=0, le=1)
    bootstrap: int = _opt(1000, ge=100, le=100_000)
    seed: int = _seed()

    def __post_init__(self) -> None:
        _check(self, "promotion")
        if self.reference and not _SET_NAME.match(self.reference):
            raise ConfigError(
                f'promotion.reference={self.reference!r}: give the name of an evaluate.external set, or "" '
                "for the test split"
            )


@dataclass(frozen=True)
class MonitoringConfig:
    """What a retrain compares between its data and the data the champion was trained on."""

    on_drift: Literal["warn", "hold"] = "warn"
    max_prevalence_shift: float = _opt(0.10, gt=0, le=1)
    max_size_change: float = _opt(0.25, gt=0)
    max_intensity_shift: float = _opt(0.10, gt=0, le=1)
    max_out_of_domain: float = _opt(0.05, gt=0, le=1)

    def __post_init__(self) -> None:
        _check(self, "monitoring")


EXPORT_FORMATS = ("onnx", "savedmodel", "litert")


@dataclass(frozen=True)
class ExportConfig:
    """Portable copies of the shipped models (``cxr export``, the export stage)."""

    formats: tuple[str, ...] = ("onnx",)  # onnx | savedmodel | litert; () = none

    def __post_init__(self) -> None:
        _check(self, "export")
        for fmt in self.formats:
            if fmt not in EXPORT_FORMATS:
                raise ConfigError(f"export.formats: {fmt!r}: choose from {', '.join(EXPORT_FORMATS)}")
        if len(set(self.formats)) != len(self.formats):
            raise ConfigError(f"export.formats={list(self.formats)}: each format once")


@dataclass(frozen=True)
class Params:
    """Every section of ``params.yaml``, parsed."""

    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    input: InputConfig = field(default_factory=InputConfig)
    train: TrainSection = field(default_factory=TrainSection)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        reference = self.promotion.reference
        if reference and reference not in self.evaluate.external:
            raise ConfigError(
                f"promotion.reference={reference}: no external set of that name in evaluate.external "
                f"(configured: {', '.join(self.evaluate.external) or 'none'})"
            )

    def as_params(self) -> dict[str, Any]:
        """The whole configuration as the nested mapping ``params.yaml`` holds (defaults filled in)."""
        out = {f.name: as_plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "train"}
        out["input"]["augment"]["augment_validation"] = out["input"].pop("augment_validation")
        out["train"] = self.train.as_params()
        return out


SECTIONS: dict[str, type] = typing.get_type_hints(Params)  # section name → its dataclass, in file order


def parse_params(raw: Mapping[str, Any], source: str = "params.yaml") -> Params:
    """Strictly parse a whole ``params.yaml`` mapping.

    Args:
        raw: the file's top-level mapping (after any overrides).
        source: where the values came from, prefixed to every error.

    Returns:
        The frozen :class:`Params`.

    Raises:
        ConfigError: one line naming the first unknown key, wrong type or out-of-range value.
    """
    try:
        raw = _mapping(raw, "the top level")
        _known_keys(raw, tuple(SECTIONS), "the top level")
        special = {"input": parse_input, "train": parse_train}
        values = {}
        for name, cls in SECTIONS.items():
            section = raw.get(name) or {}
            values[name] = special[name](section) if name in special else parse_section(cls, section, name)
        return Params(**values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def as_section(cls: type, value: Any, where: str) -> Any:
    """A step's section given as its dataclass, or as a params mapping (strictly parsed).

    Args:
        cls: the section's dataclass (:class:`DataConfig`, :class:`EvaluateConfig`, ...).
        value: an instance of ``cls``, a mapping, or None (every default).
        where: the section's dotted name, for error messages.

    Returns:
        The instance of ``cls``.
    """
    if isinstance(value, cls):
        return value
    if cls is InputConfig:
        return parse_input(value or {}, where)
    return parse_section(cls, value or {}, where)


# ---------------------------------------------------------------- loading and overrides
def read_params(path: str | Path = DEFAULT_PATH, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The raw mapping of ``params.yaml`` with ``key.sub=value`` overrides applied (not yet validated).

    Args:
        path: the parameters file.
        overrides: ``key.sub=value`` strings.

    Returns:
        The nested mapping.

    Raises:
        CxrError: the file is missing, is not YAML, or is not a mapping.
    """
    path = Path(path)
    if not path.exists():
        raise CxrError(f"{path}: not found (run from the repository root or pass --params)")
    text = read_bounded(path, "parameters file", SMALL_FILE).decode("utf-8", errors="replace")
    try:
        params = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise CxrError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from exc
    except RecursionError:
        raise CxrError(f"{path}: invalid YAML (nested too deeply)") from None
    if not isinstance(params, dict):
        raise CxrError(f"{path}: expected a mapping at the top level")
    return apply_overrides(params, overrides)


def load_config(path: str | Path = DEFAULT_PATH, overrides: Iterable[str] = ()) -> Params:
    """Read, override and strictly parse ``params.yaml``.

    Args:
        path: the parameters file.
        overrides: ``key.sub=value`` strings (``cxr -S``, flow parameters); values are parsed as JSON, then YAML.

    Returns:
        The frozen :class:`Params`.

    Raises:
        ConfigError: one line, before any work, for an unknown key, a wrong type or an out-of-range value.
    """
    overrides = list(overrides)
    source = f"{Path(path).name}{' with -S ' + ' '.join(overrides) if overrides else ''}"
    return parse_params(read_params(path, overrides), source=source)


def load_params(path: str | Path = DEFAULT_PATH, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Like :func:`load_config`, as the validated nested mapping with every default filled in.

    Args:
        path: the parameters file.
        overrides: ``key.sub=value`` strings.

    Returns:
        The mapping (same shape as ``params.yaml``).
    """
    return load_config(path, overrides).as_params()


def apply_overrides(params: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a copy of ``params`` (values parsed as JSON, then YAML).

    Args:
        params: the nested mapping.
        overrides: the override strings.

    Returns:
        The new mapping.
    """
    result = copy.deepcopy(dict(params))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        node = result
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"override {item!r}: {where} is a value, not a section")
            node = child
        if isinstance(node.get(leaf), dict) and not isinstance(_parse_value(raw), dict):
            raise ConfigError(
                f"override {item!r}: {key} is a section; set one of its keys "
                f"({', '.join(node[leaf]) or 'none'}), e.g. -S {key}.{next(iter(node[leaf]), 'key')}=…"
            )
        node[leaf] = _parse_value(raw)
    return result


def _parse_value(raw: str) -> Any:
    """JSON first (``1e-06`` is a number there, a string to YAML 1.1), then YAML (``[a, b]``, ``true``)."""
    if not raw:
        return ""
    try:
        return json.loads(raw)
    except ValueError:
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw


# ---------------------------------------------------------------- the strict parser
def parse_section(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, strictly.

    Args:
        cls: a dataclass whose fields declare types (and ranges in their metadata).
        raw: the mapping (None = every default).
        where: the section's dotted name, for error messages.

    Returns:
        The dataclass instance.

    Raises:
        ConfigError: an unknown key (with the closest match), a wrong type or an out-of-range value.
    """
    raw = _mapping(raw, where)
    _known_keys(raw, _names(cls), where)
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            values[f.name] = _coerce(raw[f.name], hints[f.name], f"{where}.{f.name}")
    _check_values(cls, values, where)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError, CxrError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _mapping(raw: Any, where: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}={raw!r}: expected a section (key: value lines), got a {type(raw).__name__}")
    return raw


def _known_keys(raw: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    allowed = tuple(allowed)
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{where}.{key}: unknown key in section {where} (known keys: {', '.join(allowed)}){hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: choose one of {', '.join(str(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(hint):
        return parse_input(value, key) if hint is InputConfig else parse_section(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if hint is int:
        return _int(value, key)
    if hint is float:
        return _float(value, key)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected text")
        return value
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r}: expected a list")
        item = args[0] if args else Any
        items = [v if item is Any else _coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or hint) is tuple else items
    if origin in (Mapping, dict) or hint in (dict, Mapping):
        return dict(_mapping(value, key))
    return value


def _int(value: Any, key: str) -> int:
    """A whole number; ``1e6`` (text to YAML 1.1, a float to JSON) counts when it is whole."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise ConfigError(f"{key}={value!r}: expected a whole number")


def _float(value: Any, key: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-6 as text
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: expected a number")
    return float(value)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(obj: Any, where: str) -> None:
    """Choice and range checks of a dataclass built in code (parsed ones were checked with their full key)."""
    _check_values(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, where)


def _check_values(cls: type, values: Mapping[str, Any], where: str) -> None:
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, meta = values[f.name], f.metadata
        hint = _hints(cls)[f.name]
        if get_origin(hint) is Literal and value not in get_args(hint):
            choices = ", ".join(str(a) for a in get_args(hint))
            raise ConfigError(f"{where}.{f.name}={value!r}: choose one of {choices}")
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        lo = (">", meta["gt"]) if "gt" in meta else (("≥", meta["ge"]) if "ge" in meta else None)
        hi = ("<", meta["lt"]) if "lt" in meta else (("≤", meta["le"]) if "le" in meta else None)
        bad_lo = lo and (value <= lo[1] if lo[0] == ">" else value < lo[1])
        bad_hi = hi and (value >= hi[1] if hi[0] == "<" else value > hi[1])
        if bad_lo or bad_hi:
            if lo and hi:
                opening, closing = "(" if lo[0] == ">" else "[", ")" if hi[0] == "<" else "]"
                rule = f"must be in {opening}{_bound(lo[1])}, {_bound(hi[1])}{closing}"
            else:
                rule = f"must be {(lo or hi)[0]} {_bound((lo or hi)[1])}"
            doc = f" ({meta['doc']})" if meta.get("doc") else ""
            raise ConfigError(f"{where}.{f.name}={value!r}: {rule}{doc}")


def as_plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings → plain dicts and lists (for YAML, JSON and hashing).

    Args:
        value: a config object or any nesting of them.

    Returns:
        The same data as dicts, lists and scalars.
    """
    if dataclasses.is_dataclass(value):
        return {f.name: as_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_plain(v) for v in value]
    return value


def defaults() -> dict[str, Any]:
    """Every default, as the mapping ``params.yaml`` holds (the shipped recipe)."""
    return Params().as_params()
