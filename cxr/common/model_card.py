"""The model card: a typed, versioned schema with one reader (:func:`read_card`) and one writer
(:func:`write_card`). Every module that looks at a card goes through here.

A card sits beside its model file (``<name>.card.json`` next to ``<name>.keras``) and says what the
file is: the bytes it describes (``model_sha256``), how images must be prepared for it
(``input.preprocessing``), the threshold it ships with and how that was chosen
(``operating_point``), its health on the validation split, the data and code that made it.

Versions:

- **0** — cards written before the schema carried a version (up to 2026-12-06). Same fields; read
  as they are.
- **1** — ``schema_version: 1``; ``operating_point`` and ``health`` typed, ``kind`` says whether
  the card describes a trained network or an ensemble.

A card of a version newer than this code knows, or one whose typed fields do not hold what they
must, is refused with one line that names the card and the field. Fields the schema does not type
(timings, library versions, the training configuration...) are kept and written back unchanged.

pydantic rather than hand-written checks: the card is a JSON document with nested typed parts, and
pydantic's frozen models, bounds and error locations are exactly that job.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cxr.errors import CxrError
from cxr.files import SMALL_FILE, json_safe, parse_json_bounded, read_bounded, write_json
from cxr.safe_text import printable

CARD_VERSION = 1
CARD_SUFFIX = ".card.json"


class OperatingPoint(BaseModel):
    """The decision threshold a model ships with, and how it was chosen."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    rule: str
    chosen_on: str | None = None  # "val", an external set's name, or None for a fixed threshold


class Health(BaseModel):
    """The collapse check on the validation split (:mod:`cxr.training.health`)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    status: Literal["healthy", "collapsed", "degenerate"]
    problems: list[str] = Field(default_factory=list)


class CardInput(BaseModel):
    """What the model expects as input; ``preprocessing`` is parsed strictly by the loader."""

    model_config = ConfigDict(extra="allow")

    preprocessing: dict[str, Any]


class DomainCheck(BaseModel):
    """The content check that travels with a model (:mod:`cxr.common.domain`)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    method: str
    layer: str
    percentile: float = Field(gt=0, le=100)
    threshold: float = Field(gt=0, allow_inf_nan=False)
    file: str | None = None
    sha256: str | None = None


class Member(BaseModel):
    """One member of an ensemble, by its file's bytes."""

    model_config = ConfigDict(frozen=True, extra="allow")

    model: str
    model_file: str
    model_sha256: str


class ModelCard(BaseModel):
    """One model card. Untyped extra fields are allowed and preserved."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    schema_version: int = CARD_VERSION
    kind: Literal["trained", "ensemble"] = "trained"
    model: str
    created: str | None = None
    model_file: str | None = None
    model_sha256: str | None = None
    input: CardInput | None = None  # required in practice; the loader names its absence precisely
    operating_point: OperatingPoint | None = None
    health: Health | None = None
    validation: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] | None = None
    epochs_run: int | None = None
    best_epoch: int | None = None
    members: list[Member] | None = None
    domain: DomainCheck | None = None
    intended_use: dict[str, Any] | None = None

    @field_validator("validation", mode="before")
    @classmethod
    def _no_nan(cls, value: Any) -> Any:
        """JSON has no NaN: a metric that was undefined is written as null."""
        if isinstance(value, Mapping):
            return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in value.items()}
        return value

    @property
    def splits_sha256(self) -> str | None:
        """The split file the model was trained (or validated) on."""
        return (self.data or {}).get("splits_sha256")

    def extra(self, key: str, default: Any = None) -> Any:
        """A field the schema does not type (``timings``, ``train_config``...), or ``default``."""
        return (self.model_extra or {}).get(key, default)

    def to_json(self) -> dict[str, Any]:
        """The card as the JSON object written to disk (the version included)."""
        return json_safe(self.model_dump())


def card_path_for(model_path: str | Path) -> Path:
    """The model card beside a model file: ``<dir>/<name>.keras`` → ``<dir>/<name>.card.json``.

    Args:
        model_path: the ``.keras`` file.

    Returns:
        The card's path (not checked to exist).
    """
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".keras") + CARD_SUFFIX)


def _field(error: Mapping[str, Any]) -> str:
    return ".".join(str(part) for part in error.get("loc", ())) or "card"


def parse_card(raw: object, where: str | Path = "model card") -> ModelCard:
    """A card from its JSON object, of any version this code reads.

    Args:
        raw: the decoded JSON.
        where: the card's path or name, for messages.

    Returns:
        The typed card (a version 0 card is upgraded in memory to the current version).

    Raises:
        CxrError: not a JSON object, a newer version, or a typed field that does not hold what it must.
    """
    shown = printable(where)
    if not isinstance(raw, dict):
        raise CxrError(f"{shown}: the model card is a JSON {type(raw).__name__}, not an object; retrain or restore it")
    version = raw.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CxrError(
            f"{shown}: schema_version={printable(repr(version))} is not a card version; retrain or restore it"
        )
    if version > CARD_VERSION:
        raise CxrError(
            f"{shown}: model card version {version} is newer than this cxr-pipeline reads ({CARD_VERSION}); "
            "upgrade cxr-pipeline"
        )
    upgraded = dict(raw)
    if version == 0:
        upgraded["schema_version"] = CARD_VERSION
        upgraded.setdefault("kind", "ensemble" if "members" in raw else "trained")
    try:
        return ModelCard.model_validate(upgraded)
    except ValidationError as exc:
        first = exc.errors()[0]
        what = printable(str(first.get("msg", "invalid")))
        raise CxrError(
            f"{shown}: model card field {_field(first)}: {what}; the card is damaged: retrain or restore it"
        ) from None


def read_card(card_file: str | Path) -> ModelCard:
    """Read and check a model card.

    Args:
        card_file: ``<name>.card.json``.

    Returns:
        The typed card.

    Raises:
        CxrError: one line: the card is missing, unreadable, not JSON, or fails :func:`parse_card`.
    """
    card_file = Path(card_file)
    shown = printable(card_file)
    if not card_file.is_file():
        raise CxrError(f"{shown}: model card not found; the preprocessing of {printable(card_file.name)} is unknown")
    data = read_bounded(card_file, "model card", SMALL_FILE)
    try:
        raw = parse_json_bounded(data, shown)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, nested too deeply
        reason = str(exc).splitlines()[0][:80]
        raise CxrError(f"{shown}: the model card is not valid JSON ({reason}); retrain or restore it") from None
    return parse_card(raw, card_file)


def read_card_if_any(card_file: str | Path) -> ModelCard | None:
    """The card, or None when there is no usable one (for reports that list what exists)."""
    try:
        return read_card(card_file)
    except CxrError:
        return None


def write_card(card_file: str | Path, card: ModelCard | Mapping[str, Any]) -> ModelCard:
    """Check a card against the schema and write it atomically (the only writer of cards).

    Args:
        card_file: where to write ``<name>.card.json``.
        card: the card, typed or as a mapping (checked as :func:`parse_card` checks a read one).

    Returns:
        The typed card as written.

    Raises:
        CxrError: the card does not satisfy the schema (nothing is written).
    """
    typed = card if isinstance(card, ModelCard) else parse_card(json_safe(dict(card)), card_file)
    write_json(Path(card_file), typed.to_json())
    return typed


# The parts of a card that decide a verdict or what a reader believes about the model. The lineage
# record keeps them flattened beside the card's digest, so an edited card is refused with the field
# that changed (``cxr.provenance.lineage_log.card_change``).
DECISIVE_SECTIONS = ("kind", "model_sha256", "input", "operating_point", "domain", "health", "validation")


def card_digest(card_file: str | Path) -> str:
    """sha256 of the card's canonical JSON (keys sorted, no whitespace): what the lineage record keeps.

    The content, not the bytes: a card rewritten with other indentation is the same card; any changed
    value is not.

    Raises:
        CxrError: the card cannot be read or is not JSON.
    """
    import hashlib
    import json

    card_file = Path(card_file)
    try:
        raw = parse_json_bounded(read_bounded(card_file, "model card", SMALL_FILE), printable(card_file))
    except ValueError as exc:
        raise CxrError(f"{printable(card_file)}: the model card is not valid JSON ({str(exc)[:80]})") from None
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def decisive_fields(card: ModelCard | Mapping[str, Any]) -> dict[str, Any]:
    """The card's decisive sections as ``{"operating_point.threshold": 0.43, ...}`` (JSON scalars or lists)."""
    raw = card.to_json() if isinstance(card, ModelCard) else dict(card)
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        else:
            flat[prefix] = value

    for section in DECISIVE_SECTIONS:
        if section in raw:
            walk(section, raw[section])
    return flat


def field_differences(card: ModelCard | Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """``"field: value (recorded value)"`` for each decisive field that differs from ``recorded``."""
    now = decisive_fields(card)
    shown = []
    for key in sorted(set(now) | set(recorded)):
        if now.get(key, "<missing>") != recorded.get(key, "<missing>"):
            value, was = (printable(str(v)[:40]) for v in (now.get(key, "<missing>"), recorded.get(key, "<missing>")))
            shown.append(f"{key}: {value} (recorded {was})")
    return shown
