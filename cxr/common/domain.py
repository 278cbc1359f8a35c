"""Does an image look like the films a model was trained on? The content half of the domain guard.

A JPEG carries no metadata, so the model itself must say when an image is unlike its training
films. The method is FRODO's (Çallı et al., MIDL 2019): the Mahalanobis distance of an image's
features to the training distribution, here the *penultimate* features (the input of the output
layer, ``pneumonia``: cxrnet's 128 pooled channels, SmallNet's 32 dense units). The mean and a
Ledoit–Wolf shrunk covariance are fitted on the training split (un-augmented) at training time;
the acceptance threshold is a high percentile (99.5th by default) of the validation split's
distances, chosen on validation like the decision threshold. It needs no outside data and no
extra network, costs one matrix product per image, and is the method the issue's cited study
found to separate wrong-anatomy and wrong-orientation films from chest films (AUC 0.99).

Why this rather than an autoencoder's reconstruction error: no second network to train, ship and
verify, and the features are exactly what the classifier decides on. The score reported is the
distance divided by the threshold: ≤ 1 is in domain.

The fitted statistics travel in ``<name>.domain.npz`` beside the model; the card names the file,
its sha256, the layer, the percentile and the threshold (:class:`cxr.common.model_card.DomainCheck`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # Keras is imported where a model is built (it loads TensorFlow)
    import keras

FEATURE_LAYER = "pneumonia"  # every builder's output layer; its input is the penultimate features
DEFAULT_PERCENTILE = 99.5
SUFFIX = ".domain.npz"


@dataclass(frozen=True)
class DomainModel:
    """The training distribution of a model's penultimate features, and where it ends."""

    mean: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D), the inverse of the shrunk covariance
    threshold: float  # the distance at the validation split's ``percentile``-th percentile
    percentile: float = DEFAULT_PERCENTILE

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distances of (N, D) features; (N,) float64."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Distances over the threshold: ≤ 1 is in domain."""
        return self.distances(features) / self.threshold

    def to_bytes(self) -> bytes:
        """The ``.domain.npz`` file's bytes (deterministic: no timestamps inside)."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            mean=self.mean,
            precision=self.precision,
            threshold=np.float64(self.threshold),
            percentile=np.float64(self.percentile),
        )
        return buffer.getvalue()


def fit_domain(
    train_features: np.ndarray, val_features: np.ndarray, percentile: float = DEFAULT_PERCENTILE
) -> DomainModel:
    """Fit the training distribution and choose the threshold on validation.

    Args:
        train_features: (N, D) penultimate features of the training split, un-augmented.
        val_features: (M, D) of the validation split.
        percentile: the share of validation images (in %) that must fall inside.

    Returns:
        The :class:`DomainModel`.
    """
    from sklearn.covariance import LedoitWolf

    train = np.asarray(train_features, dtype=np.float64)
    fitted = LedoitWolf().fit(train)  # shrinkage: D can approach N on small splits
    model = DomainModel(fitted.location_, fitted.precision_, 1.0, percentile)
    threshold = float(np.percentile(model.distances(val_features), percentile))
    return DomainModel(model.mean, model.precision, max(threshold, 1e-9), percentile)


def no_domain_bytes() -> bytes:
    """The ``.domain.npz`` of a model without a content check (``train.common.domain_check: false``,
    or features that were not finite): it says so, and a card without ``domain`` never reads it."""
    buffer = io.BytesIO()
    np.savez(buffer, no_check=np.array("this model has no content check"))
    return buffer.getvalue()


def load_domain(path: str | Path) -> DomainModel:
    """Read a ``.domain.npz`` (no pickles: ``allow_pickle=False``).

    Raises:
        ValueError: the file does not hold the four arrays, or their shapes disagree.
    """
    with np.load(Path(path), allow_pickle=False) as data:
        mean, precision = data["mean"], data["precision"]
        threshold, percentile = float(data["threshold"]), float(data["percentile"])
    if mean.ndim != 1 or precision.shape != (mean.size, mean.size) or not threshold > 0:
        raise ValueError("inconsistent domain statistics")
    return DomainModel(mean, precision, threshold, percentile)


def scoring_model(model: keras.Model) -> keras.Model:
    """A Keras model with two outputs: (penultimate features, P(pneumonia)), from one forward pass.

    Args:
        model: a trained classifier whose output layer is named ``pneumonia``.

    Returns:
        The functional two-output model (sharing the classifier's weights).

    Raises:
        ValueError: the model has no ``pneumonia`` layer (an ensemble, or a foreign model).
    """
    import keras

    layer = model.get_layer(FEATURE_LAYER)
    return keras.Model(model.inputs[0], [layer.input, model.outputs[0]])


def features_and_probabilities(
    scorer: keras.Model, images: np.ndarray, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features and (N,) P(pneumonia) of (N, S, S, 3) uint8 images, one batch at a time."""
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].astype(np.float32) / 255.0
        f, p = scorer(batch, training=False)
        feats.append(np.asarray(f, dtype=np.float64))
        probs.append(np.asarray(p, dtype=np.float64).reshape(-1))
    if not feats:
        return np.zeros((0, 0)), np.zeros(0)
    return np.concatenate(feats), np.concatenate(probs)


@dataclass(frozen=True)
class MemberDomains:
    """An ensemble's content check: each member's own; an image's score is the highest of its
    members' (it is in the ensemble's domain only when it is in every member's)."""

    members: dict[str, DomainModel]

    def to_bytes(self) -> bytes:
        """The ensemble's ``.domain.npz``: every member's arrays under ``<member>__<array>``."""
        buffer = io.BytesIO()
        arrays: dict[str, np.ndarray | np.float64] = {}
        for name, d in sorted(self.members.items()):
            arrays.update(
                {
                    f"{name}__mean": d.mean,
                    f"{name}__precision": d.precision,
                    f"{name}__threshold": np.float64(d.threshold),
                    f"{name}__percentile": np.float64(d.percentile),
                }
            )
        # numpy's stub gives savez a bool keyword (allow_pickle) beside **arrays; mypy cannot tell that no
        # array is named allow_pickle, so it checks every array against bool too
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()


def load_member_domains(path: str | Path) -> MemberDomains:
    """Read an ensemble's ``.domain.npz`` (no pickles).

    Raises:
        ValueError: no member in it, or a member's arrays are inconsistent.
    """
    members: dict[str, DomainModel] = {}
    with np.load(Path(path), allow_pickle=False) as data:
        names = sorted({key.rsplit("__", 1)[0] for key in data.files if "__" in key})
        for name in names:
            mean, precision = data[f"{name}__mean"], data[f"{name}__precision"]
            threshold = float(data[f"{name}__threshold"])
            if mean.ndim != 1 or precision.shape != (mean.size, mean.size) or not threshold > 0:
                raise ValueError(f"inconsistent domain statistics of member {name}")
            members[name] = DomainModel(mean, precision, threshold, float(data[f"{name}__percentile"]))
    if not members:
        raise ValueError("no member statistics")
    return MemberDomains(members)
