"""``params.yaml``, strictly: one frozen pydantic model per section, and every default in one place.

Every entry point (the ``cxr`` command, ``dvc repro`` through it, the Prefect flow and its
parameters) reads settings through :func:`load_config` / :func:`load_params`, so a misspelled key,
a value of the wrong type or one out of range stops the run with one line, before any work starts:

    params.yaml: split.seeed: unknown key in section split (known keys: strategy, seed, ...); did you mean seed?
    params.yaml with -S train.smallnet.epochs=-1: train.smallnet.epochs=-1: must be in [1, 10000]

Why pydantic: each section is declared once, as typed fields with their ranges (``Field(ge=...)``),
their choices (``Literal``) and their cross-field rules (validators), and pydantic does the
checking, for ``params.yaml``, ``-S`` overrides and sections built in code alike. Only the wording
is ours: :func:`parse_section` turns pydantic's first error into the line above (the dotted key, the
value, the rule, and for an unknown key the section's keys and the closest one).

Numbers are read as people write them in YAML: ``1e-6`` (text to YAML 1.1) is a number, ``64.0``
and ``"1e3"`` are whole numbers, ``1.5`` is not; ``true`` is no number and ``1`` is not ``true``.

The defaults below are the shipped recipe; ``params.yaml`` repeats them so DVC can track each one
(a guard test keeps the two equal).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticKnownError

from cxr.errors import CxrError
from cxr.files import SMALL_FILE, read_bounded

DEFAULT_PATH = Path("params.yaml")


class ConfigError(CxrError, ValueError):
    """A setting that does not exist, has the wrong type or is out of range."""


# ---------------------------------------------------------------- the value types of every section
def _whole(value: Any) -> Any:
    """YAML 1.1 reads ``1e3`` as text: whole-number text becomes the number; a boolean is no number."""
    if isinstance(value, bool):
        raise PydanticKnownError("int_type")
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value  # pydantic words the refusal
        return int(number) if number.is_integer() else number
    return value


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-6`` as text: number text becomes the number; a boolean is no number."""
    if isinstance(value, bool):
        raise PydanticKnownError("float_type")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Whole = Annotated[int, BeforeValidator(_whole)]  # 64, 64.0, "1e3"; not 1.5, not true
Number = Annotated[float, BeforeValidator(_number)]  # finite (allow_inf_nan=False below)
Flag = Annotated[bool, Strict()]  # true or false, not 1 or "on"
Text = Annotated[str, Strict()]

SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's random states take 0 to 2**32 - 1
Seed = Annotated[Whole, Field(ge=0, le=SEED_MAX, description="the range numpy and scikit-learn seeds take")]


class Section(BaseModel):
    """A section of ``params.yaml``: frozen, no unknown keys; built in code, it is checked the same way.

    ``location`` is the section's dotted name, for the messages of a section built in code.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    location: ClassVar[str] = ""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _Invalid(exc, type(self)) from None

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, raw: Any) -> Any:
        return {} if raw is None else raw  # "augment:" with nothing under it: every default


class _Invalid(ConfigError):
    """A section's errors, worded for the section built in code.

    Pydantic builds a nested section through its ``__init__`` too, and hands this on as the cause of
    a ``value_error`` at the section's key: :func:`_config_error` then words it again under the full path.
    """

    def __init__(self, exc: ValidationError, cls: type[Section]) -> None:
        super().__init__(str(_config_error(exc, cls, cls.location)))
        self.errors, self.cls = exc, cls

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return ConfigError, (str(self),)  # across processes: the line


# ---------------------------------------------------------------- data, prepare, split
class DataConfig(Section):
    """Where the images come from (``cxr fetch``)."""

    location: ClassVar[str] = "data"
    # auto: kaggle when credentials are configured, else the embedded demo sample (cxr.data.fetch.resolve_source)
    source: Literal["kaggle", "dir", "medmnist", "sample", "auto"] = "auto"
    kaggle_dataset: Text = "paultimothymooney/chest-xray-pneumonia"
    dir: Text = "data/inbox"
    # folders that links in data.dir (and external sets) may lead into, besides the folder itself and
    # its DVC cache (cxr.data.links)
    link_roots: tuple[Text, ...] = ()
    npz: Text = ""
    medmnist_size: Literal[28, 64, 128, 224] = 28
    retries: Whole = Field(default=4, ge=0, le=100)
    retry_backoff_s: Number = Field(default=2.0, ge=0)
    max_files: Whole = Field(default=100_000, ge=1)
    max_bytes: Whole = Field(default=20_000_000_000, ge=1)
    max_ratio: Number = Field(
        default=200.0, gt=1, description="zip-bomb guard: uncompressed/compressed, per entry over 1 MiB"
    )


class PrepareConfig(Section):
    """The manifest and data-quality step (``cxr prepare``)."""

    location: ClassVar[str] = "prepare"
    min_images_per_class: Whole = Field(default=10, ge=1, le=1_000_000)
    workers: Whole = Field(default=0, ge=0, le=512, description="0 = all cores")


class SplitConfig(Section):
    """The train / validation / test split."""

    location: ClassVar[str] = "split"
    strategy: Literal["patient", "seed"] = "patient"
    seed: Seed = 42
    test_size: Number = Field(default=0.2, gt=0, lt=1)
    val_size: Number = Field(default=0.2, gt=0, lt=1)


# ---------------------------------------------------------------- input pipeline
class AugmentConfig(Section):
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

    location: ClassVar[str] = "input.augment"
    rotation_deg: Number = Field(default=15.0, ge=0, le=180)
    width_shift: Number = Field(default=0.1, ge=0, lt=1)
    height_shift: Number = Field(default=0.1, ge=0, lt=1)
    fill_mode: Literal["nearest", "constant", "reflect", "wrap"] = "constant"
    zoom: Number = Field(default=0.2, ge=0, lt=1)
    shear_deg: Number = Field(default=0.0, ge=0, lt=90)
    horizontal_flip: Flag = False
    brightness: Number = Field(default=0.1, ge=0, le=1)
    contrast: Number = Field(default=0.3, ge=0, le=1)
    gamma: Number = Field(default=0.3, ge=0, lt=1)
    blur_sigma: Number = Field(default=0.0, ge=0)
    noise_std: Number = Field(default=0.0, ge=0, le=1)
    jpeg_quality: Whole = Field(default=0, ge=0, le=95)

    @property
    def is_identity(self) -> bool:
        """True when every range is zero (the batch comes back unchanged)."""
        return not any(getattr(self, name) for name in type(self).model_fields if name != "fill_mode")


class InputConfig(Section):
    """The tf.data input pipeline (decode, cache, resize, batch, augment).

    ``augment_validation`` is written under ``input.augment`` in ``params.yaml`` (where the
    notebook's generator had it) and lifted here when the section is read.
    """

    location: ClassVar[str] = "input"
    image_size: Whole = Field(default=160, ge=32, le=2048)
    resize: Literal["squash", "pad"] = "squash"
    interpolation: Literal["bilinear", "nearest", "area", "bicubic"] = "bilinear"
    batch_size: Whole = Field(default=32, ge=1, le=4096)
    cache: Literal["disk", "memory", "none"] = "disk"
    cache_dir: Text = "data/cache"
    # decode caps (cxr.common.images.ImageLimits): a larger file is excluded by prepare, refused by training and predict
    max_image_pixels: Whole = Field(
        default=50_000_000, ge=1, description="width × height × frames; the largest chest film is ~18.5 M"
    )
    max_image_bytes: Whole = Field(default=200_000_000, ge=1, description="file size, checked before a byte is read")
    normalize: Literal["none", "standardize", "equalize"] = "equalize"
    center_crop: Number = Field(default=0.0, ge=0, lt=0.4)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    augment_validation: Flag = False

    @model_validator(mode="before")
    @classmethod
    def _lift_augment_validation(cls, raw: Any) -> Any:
        augment = raw.get("augment") if isinstance(raw, Mapping) else None
        if not isinstance(augment, Mapping) or "augment_validation" not in augment:
            return raw
        rest = {k: v for k, v in augment.items() if k != "augment_validation"}
        return {**raw, "augment": rest, "augment_validation": augment["augment_validation"]}

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


def parse_input(raw: Any, where: str = "input") -> InputConfig:
    """Strictly parse the ``input`` section (``augment.augment_validation`` moves up a level).

    Args:
        raw: the ``input`` mapping of ``params.yaml``.
        where: the section's dotted name, for error messages.

    Returns:
        The frozen :class:`InputConfig`.
    """
    return parse_section(InputConfig, raw, where)


# ---------------------------------------------------------------- training
class HealthConfig(Section):
    """The post-training collapse check and what to do when it fails."""

    location: ClassVar[str] = "train.common.health"
    on_collapse: Literal["fail", "warn", "fallback"] = "fail"
    min_val_auc: Number = Field(default=0.6, ge=0, le=1)
    min_prediction_std: Number = Field(default=0.01, ge=0)
    fallback_lr_factor: Number = Field(default=0.1, gt=0, lt=1)


class EarlyStoppingConfig(Section):
    """Stop when the monitored signal has not improved by ``min_delta`` for ``patience`` epochs."""

    location: ClassVar[str] = "train.common.early_stopping"
    enabled: Flag = True
    patience: Whole = Field(default=5, ge=0, le=10_000)
    min_delta: Number = Field(default=0.001, ge=0)
    monitor: Text | None = None  # None = train.monitor (the checkpoint's signal)
    mode: Literal["min", "max"] | None = None  # None = train.monitor_mode


class ReduceLRConfig(Section):
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement."""

    location: ClassVar[str] = "train.common.reduce_lr"
    monitor: Text = "val_loss"
    factor: Number = Field(default=0.3, gt=0, lt=1)
    patience: Whole = Field(default=3, ge=0, le=10_000)
    min_lr: Number = Field(default=1e-6, ge=0)


class TrainConfig(Section):
    """How one model trains: ``train.common`` overlaid with ``train.<model>``.

    ``model`` holds the builder's own options (declared in :mod:`cxr.model_options`).
    """

    location: ClassVar[str] = "train"
    epochs: Whole = Field(default=15, ge=1, le=10_000)
    learning_rate: Number = Field(default=1e-3, gt=0, le=10)
    continue_epochs: Whole = Field(default=0, ge=0, le=10_000)
    seed: Seed = 42
    deterministic: Flag = True
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    class_weight: Literal["balanced", "none"] = "balanced"
    steps_per_epoch: Whole | None = Field(default=None, ge=1, le=1_000_000)
    min_steps_per_epoch: Whole = Field(default=30, ge=1, le=1_000_000)
    validation_steps: Whole | None = Field(default=None, ge=1, le=1_000_000)
    monitor: Text = "val_auc"
    monitor_mode: Literal["min", "max"] = "max"
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    reduce_lr: ReduceLRConfig = Field(default_factory=ReduceLRConfig)
    tensorboard: Flag = True
    distribute: Literal["auto", "mirrored", "none"] = "auto"
    optimizer: Literal["adam", "adamw"] = "adamw"
    weight_decay: Number = Field(default=1e-4, ge=0)
    label_smoothing: Number = Field(default=0.1, ge=0, lt=0.5)
    ema: Flag = True
    schedule: Literal["plateau", "cosine"] = "plateau"
    warmup_epochs: Whole = Field(default=0, ge=0, le=10_000)
    checkpoint: Literal["best", "last"] = "best"
    mixup: Number = Field(default=0.0, ge=0, le=1)
    domain_check: Flag = True
    domain_percentile: Number = Field(default=99.5, gt=50, le=100)
    target_sensitivity: Number | None = Field(default=0.9, gt=0, lt=1)
    health: HealthConfig = Field(default_factory=HealthConfig)
    model: dict[str, Any] = Field(default_factory=dict)

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
    _check_keys(common, _train_keys(), "train.common")
    architecture = own.pop("architecture", None) or name
    if not isinstance(architecture, str):
        raise ConfigError(f"train.{name}.architecture={architecture!r}: expected a model name")
    try:
        options_cls = options_class(architecture, where=f"train.{name}")
    except CxrError as exc:
        raise ConfigError(str(exc)) from None
    own_train = {k: v for k, v in own.items() if k in _train_keys()}
    builder = {k: v for k, v in own.items() if k not in _train_keys()}
    options_model = _options_model(options_cls)
    _check_keys(builder, _train_keys() + tuple(options_model.model_fields) + _MODEL_KEYS, f"train.{name}")
    options = parse_section(options_model, builder, f"train.{name}").model_dump()
    try:
        options_cls(**options)  # the builder's own checks (widths per block, ...)
    except CxrError as exc:
        raise ConfigError(f"train.{name}: {exc}") from None
    merged = {**common, **own_train}
    for nested in ("early_stopping", "reduce_lr", "health"):  # a model's block overrides single keys
        if isinstance(common.get(nested), Mapping) and isinstance(own_train.get(nested), Mapping):
            merged[nested] = {**common[nested], **own_train[nested]}
    model_opts = {**options, **({"architecture": architecture} if architecture != name else {})}
    return parse_section(TrainConfig, {**merged, "model": model_opts}, f"train.{name}")


_AS_STRICT: dict[Any, Any] = {int: Whole, float: Number, bool: Flag, str: Text, list[int]: list[Whole]}


@functools.cache
def _options_model(options_cls: type) -> type[Section]:
    """A builder's options dataclass (:mod:`cxr.model_options`) as a section model, its fields typed as strictly."""
    hints = typing.get_type_hints(options_cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(options_cls):
        factory = f.default_factory
        default = f.default if factory is dataclasses.MISSING else Field(default_factory=factory)
        fields[f.name] = (_AS_STRICT.get(hints[f.name], hints[f.name]), default)
    return create_model(options_cls.__name__, __base__=Section, **fields)


def _train_keys() -> tuple[str, ...]:
    return tuple(n for n in TrainConfig.model_fields if n != "model")


class TrainSection(Section):
    """The ``train`` section: which models to train, shared settings, and each model's own block.

    Read from ``params.yaml`` by :func:`parse_train`, which checks every model's settings.
    """

    location: ClassVar[str] = "train"
    models: tuple[Text, ...] = ("smallnet", "cxrnet")
    common: dict[str, Any] = Field(default_factory=lambda: _filled_common(TrainConfig()))
    blocks: dict[str, dict[str, Any]] = Field(default_factory=dict)

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


def parse_train(raw: Any) -> TrainSection:
    """Validate the ``train`` section: every listed model and every block parses.

    Args:
        raw: the ``train`` mapping of ``params.yaml``.

    Returns:
        The :class:`TrainSection` (common settings with every default filled in).
    """
    raw = dict(_mapping(raw, "train"))
    models = raw.pop("models", list(TrainSection.model_fields["models"].default))
    if not isinstance(models, list | tuple) or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"train.models={models!r}: expected a list of model names")
    common = dict(_mapping(raw.pop("common", None), "train.common"))
    _check_keys(common, _train_keys(), "train.common")
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
class EnsembleConfig(Section):
    """Members whose mean P(pneumonia) becomes ``ensemble/ensemble.keras`` ([] = no ensemble)."""

    location: ClassVar[str] = "ensemble"
    members: tuple[Text, ...] = ("smallnet", "cxrnet")


class OrchestrationConfig(Section):
    """How the Prefect flow schedules work."""

    location: ClassVar[str] = "orchestration"
    max_parallel_training: Whole = Field(default=1, ge=1, le=64)


_SET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
RESERVED_SET_NAMES = ("train", "val", "test")


class EvaluateConfig(Section):
    """Scoring, operating point, confidence intervals and Grad-CAM.

    ``roles`` and ``compared`` describe the external sets: a **selection** set chooses among
    configurations (``compared`` says how many were compared on it); a **confirmation** set is
    scored, never chosen on, and flagged when settings change after its first scoring. A set without
    a role is a selection set: its figures are not confirmatory.
    """

    location: ClassVar[str] = "evaluate"
    external: dict[str, str] = Field(default_factory=dict)
    roles: dict[str, Literal["selection", "confirmation"]] = Field(default_factory=dict)
    compared: dict[str, Annotated[int, Strict()]] = Field(default_factory=dict)
    allow_outside_intended_use: Flag = False
    threshold_source: Text = "validation"  # validation | fixed | external:<name>
    threshold: Number = Field(default=0.5, gt=0, lt=1)
    bootstrap: Whole = Field(default=1000, ge=0, le=100_000, description="resamples; 100,000 already takes minutes")
    seed: Seed = 42
    gradcam_per_outcome: Whole = Field(default=2, ge=0, le=1000)
    gradcam_layer: Text | None = None
    border_margin: Number = Field(default=0.125, gt=0, lt=0.5)

    @field_validator("external", mode="before")
    @classmethod
    def _external_sets(cls, value: Any) -> Any:
        return check_external_sets({} if value is None else value)

    @field_validator("roles", "compared", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _sets_and_threshold_rule(self) -> EvaluateConfig:
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
        return self


def check_roles(roles: Mapping[str, str], compared: Mapping[str, int], external: Mapping[str, str]) -> None:
    """``evaluate.roles`` and ``evaluate.compared`` name configured sets, and counts fit their sets.

    Args:
        roles: ``{set name: selection | confirmation}``.
        compared: ``{selection set name: configurations compared on it}``.
        external: the configured sets.

    Raises:
        ConfigError: an unknown set, a count below 1, or a count for a confirmation set.
    """
    for key, mapping in (("roles", roles), ("compared", compared)):
        for name in mapping:
            if name not in external:
                raise ConfigError(
                    f"evaluate.{key}.{name}: no external set named {name!r} in evaluate.external "
                    f"(configured: {', '.join(external) or 'none'})"
                )
    for name, count in compared.items():
        if count < 1:
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


class ReportConfig(Section):
    """The HTML report."""

    location: ClassVar[str] = "report"
    readers: Text = ""


class PromotionConfig(Section):
    """Champion/challenger: when a newly trained model replaces the shipped one (``cxr promote``)."""

    location: ClassVar[str] = "promotion"
    policy: Literal["gate", "always"] = "gate"
    reference: Text = ""
    auc_margin: Number = Field(default=0.01, ge=0, le=1)
    sensitivity_margin: Number = Field(default=0.05, ge=0, le=1)
    ood_margin: Number = Field(default=0.02, ge=0, le=1)
    bootstrap: Whole = Field(default=1000, ge=100, le=100_000)
    seed: Seed = 42

    @field_validator("reference")
    @classmethod
    def _a_set_name(cls, reference: str) -> str:
        if reference and not _SET_NAME.match(reference):
            raise ConfigError(
                f"promotion.reference={reference!r}: give the name of an evaluate.external set, "
                'or "" for the test split'
            )
        return reference


class MonitoringConfig(Section):
    """What a retrain compares between its data and the data the champion was trained on."""

    location: ClassVar[str] = "monitoring"
    on_drift: Literal["warn", "hold"] = "warn"
    max_prevalence_shift: Number = Field(default=0.10, gt=0, le=1)
    max_size_change: Number = Field(default=0.25, gt=0)
    max_intensity_shift: Number = Field(default=0.10, gt=0, le=1)
    max_out_of_domain: Number = Field(default=0.05, gt=0, le=1)


class ExportConfig(Section):
    """Portable copies of the shipped models (``cxr export``, the export stage)."""

    location: ClassVar[str] = "export"
    formats: tuple[Literal["onnx", "savedmodel", "litert"], ...] = ("onnx",)  # () = none

    @field_validator("formats")
    @classmethod
    def _each_once(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(formats)) != len(formats):
            raise ConfigError(f"export.formats={list(formats)}: each format once")
        return formats


class Params(Section):
    """Every section of ``params.yaml``, parsed."""

    data: DataConfig = Field(default_factory=DataConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("train", mode="before")
    @classmethod
    def _every_model(cls, value: Any) -> Any:
        return value if isinstance(value, TrainSection) else parse_train(value)

    @model_validator(mode="after")
    def _reference_is_configured(self) -> Params:
        reference = self.promotion.reference
        if reference and reference not in self.evaluate.external:
            raise ConfigError(
                f"promotion.reference={reference}: no external set of that name in evaluate.external "
                f"(configured: {', '.join(self.evaluate.external) or 'none'})"
            )
        return self

    def as_params(self) -> dict[str, Any]:
        """The whole configuration as the nested mapping ``params.yaml`` holds (defaults filled in)."""
        out = {name: as_plain(getattr(self, name)) for name in type(self).model_fields if name != "train"}
        out["input"]["augment"]["augment_validation"] = out["input"].pop("augment_validation")
        out["train"] = self.train.as_params()
        return out


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
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
        return parse_section(Params, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


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


# ---------------------------------------------------------------- pydantic's first error, in one line
S = TypeVar("S", bound=BaseModel)


def parse_section(cls: type[S], raw: Any, where: str) -> S:
    """Validate ``raw`` as section ``cls``; the first problem becomes one :class:`ConfigError` line.

    Args:
        cls: the section's model (:class:`SplitConfig`, :class:`EvaluateConfig`, ...).
        raw: the mapping (None = every default).
        where: the section's dotted name, prefixed to the key in error messages.

    Returns:
        The frozen section.

    Raises:
        ConfigError: an unknown key (with the closest match), a wrong type or an out-of-range value.
    """
    try:
        return cls.model_validate({} if raw is None else raw)
    except ValidationError as exc:
        raise _config_error(exc, cls, where) from None


_EXPECTED = {
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a number",
    "bool_type": "expected true or false",
    "string_type": "expected text",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "int_parsing_size": "too large for a whole number",
}
_NOT_A_SECTION = ("model_type", "model_attributes_type", "dict_type", "mapping_type")
_OUT_OF_RANGE = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _config_error(exc: ValidationError, cls: type[BaseModel], where: str) -> ConfigError:
    """The first of pydantic's errors as one line: ``key=value: rule``, or the unknown key and its closest match."""
    error = _first(exc.errors(include_url=False))
    loc, kind, value = error["loc"], error["type"], error["input"]
    path = _dotted(where, loc)
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _Invalid):  # a nested section's own errors
        return _config_error(cause.errors, cause.cls, path)
    if isinstance(cause, ConfigError):  # a validator's own message names its key
        return cause
    hint, info = _declared(cls, loc)
    if kind == "extra_forbidden":
        return _unknown_key(str(loc[-1]), tuple(cls.model_fields), _dotted(where, loc[:-1]))
    if kind in _NOT_A_SECTION:
        shown = path or "the top level"
        return ConfigError(f"{shown}={value!r}: expected a section (key: value lines), got a {type(value).__name__}")
    if kind == "literal_error":
        return ConfigError(f"{path}={value!r}: choose one of {', '.join(str(a) for a in get_args(_bare(hint)))}")
    if kind in _OUT_OF_RANGE:
        return ConfigError(f"{path}={_as_number(value, hint)!r}: {_range_rule(error, info)}")
    if kind in _EXPECTED:
        return ConfigError(f"{path}={value!r}: {_EXPECTED[kind]}")
    return ConfigError(f"{path or 'the top level'}: {cause or error['msg']}")


def _first(errors: list[ErrorDetails]) -> ErrorDetails:
    """The error a reader meets first: unknown keys, then wrong types, then values out of range, each in field order.

    (A nested section's errors come as one error at its key, worded by :class:`_Invalid`.)
    """
    return min(errors, key=lambda e: 0 if e["type"] == "extra_forbidden" else 2 if e["type"] in _OUT_OF_RANGE else 1)


def _dotted(where: str, loc: tuple[int | str, ...]) -> str:
    """``input`` + ``("augment", "zoom")`` → ``input.augment.zoom``; list items as ``[i]``."""
    path = where
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else f"{path}.{part}" if path else str(part)
    return path


def _declared(cls: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[Any, FieldInfo | None]:
    """The type ``cls`` declares at ``loc`` (an item's type for ``key[i]`` or ``key.name``) and the field there.

    ``loc`` is one key deep, or two for an item: a nested section's errors come through :class:`_Invalid`.
    """
    info = cls.model_fields.get(str(loc[0])) if loc else None
    hint = info.annotation if info is not None else Any
    for _ in loc[1:]:  # an item of a list or tuple, a value of a mapping
        args = [a for a in get_args(_bare(hint)) if a is not Ellipsis]
        hint, info = (args[-1] if args else Any), None
    return hint, info


def _bare(hint: Any) -> Any:
    """``Annotated[X, ...]`` and ``X | None`` → ``X``."""
    while True:
        if get_origin(hint) is Annotated:
            hint = get_args(hint)[0]
        elif get_origin(hint) in (typing.Union, types.UnionType):
            inner = [a for a in get_args(hint) if a is not type(None)]
            if len(inner) != 1:
                return hint
            hint = inner[0]
        else:
            return hint


def _range_rule(error: ErrorDetails, info: FieldInfo | None) -> str:
    """``must be in [1, 10000]``, ``must be ≥ 0`` or ``must be > 1``, with the field's note."""
    bounds = dict(error.get("ctx") or {})
    if info is not None:  # Field(ge=..., le=...) puts annotated_types' Ge, Le... in the field's metadata
        bounds = {k: getattr(m, k) for m in info.metadata for k in ("gt", "ge", "lt", "le") if hasattr(m, k)}
    lo = (">", bounds["gt"]) if "gt" in bounds else ("≥", bounds["ge"]) if "ge" in bounds else None
    hi = ("<", bounds["lt"]) if "lt" in bounds else ("≤", bounds["le"]) if "le" in bounds else None
    if lo and hi:
        opening, closing = "(" if lo[0] == ">" else "[", ")" if hi[0] == "<" else "]"
        rule = f"must be in {opening}{_bound(lo[1])}, {_bound(hi[1])}{closing}"
    else:
        one = lo or hi
        rule = f"must be {one[0]} {_bound(one[1])}" if one else "out of range"
    return f"{rule} ({info.description})" if info is not None and info.description else rule


def _bound(value: float) -> str:
    """A range bound in full: ``4294967295``, ``100000``, ``0.5`` (not ``4.29497e+09``)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _as_number(value: Any, hint: Any) -> Any:
    """The value as the range check saw it: ``'1e-6'`` (YAML 1.1 text) as the number, ``0`` as ``0.0`` for a float."""
    number = _whole(value) if isinstance(value, str) else value
    return float(number) if _bare(hint) is float and isinstance(number, int) else number


def _unknown_key(key: str, allowed: tuple[str, ...], section: str) -> ConfigError:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    where = f"in section {section}" if section else "at the top level"
    full = f"{section}.{key}" if section else key
    return ConfigError(f"{full}: unknown key {where} (known keys: {', '.join(allowed)}){hint}")


def _check_keys(raw: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Unknown keys of a mapping read by hand (``train.common`` and ``train.<model>``, merged before parsing)."""
    for key in raw:
        if key not in allowed:
            raise _unknown_key(str(key), allowed, where)


def _mapping(raw: Any, where: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}={raw!r}: expected a section (key: value lines), got a {type(raw).__name__}")
    return raw


def as_plain(value: Any) -> Any:
    """Sections, tuples and mappings → plain dicts and lists (for YAML, JSON and hashing).

    Args:
        value: a config object or any nesting of them.

    Returns:
        The same data as dicts, lists and scalars.
    """
    if isinstance(value, BaseModel):
        return {name: as_plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, Mapping):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_plain(v) for v in value]
    return value


def defaults() -> dict[str, Any]:
    """Every default, as the mapping ``params.yaml`` holds (the shipped recipe)."""
    return Params().as_params()
