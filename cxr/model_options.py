"""Each model builder's own options (the keys of ``train.<model>`` that are not training settings).

Kept apart from :mod:`cxr.training.models` so that checking ``params.yaml`` never imports
TensorFlow; ``models.py`` registers each builder together with its options class here, and a
guard test keeps the two registries equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cxr.errors import CxrError


@dataclass(frozen=True)
class SmallNetOptions:
    """The notebook's SmallNet has no options."""


@dataclass(frozen=True)
class CxrNetOptions:
    """cxrnet: the filters of its four convolution blocks and the dropout before the output."""

    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    dropout: float = 0.3

    def __post_init__(self) -> None:
        if len(self.widths) != 4 or any(w < 1 for w in self.widths):
            raise CxrError(f"widths={self.widths}: four positive filter counts, one per block")
        if not 0 <= self.dropout < 1:
            raise CxrError(f"dropout={self.dropout}: must be in [0, 1)")


@dataclass(frozen=True)
class Vgg16Options:
    """VGG16 transfer learning: the base's weights, its ImageNet input scaling, the head's dropout.

    ``weights``: ``imagenet`` (downloaded by Keras), ``none`` (random), or a path to a weights file.
    """

    weights: str = "imagenet"
    imagenet_preprocessing: bool = True
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise CxrError(f"dropout={self.dropout}: must be in [0, 1)")


@dataclass(frozen=True)
class ResNetOptions:
    """resnet: a small from-scratch residual network.

    ``widths``: the filters of its four stages; ``blocks``: basic residual blocks per stage;
    ``drop_path``: the stochastic-depth rate of the last block (rising linearly from 0 in the first).
    """

    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    dropout: float = 0.3
    drop_path: float = 0.1

    def __post_init__(self) -> None:
        if len(self.widths) != 4 or any(w < 1 for w in self.widths):
            raise CxrError(f"widths={self.widths}: four positive filter counts, one per stage")
        if len(self.blocks) != 4 or any(b < 1 for b in self.blocks):
            raise CxrError(f"blocks={self.blocks}: four positive block counts, one per stage")
        for name in ("dropout", "drop_path"):
            if not 0 <= getattr(self, name) < 1:
                raise CxrError(f"{name}={getattr(self, name)}: must be in [0, 1)")


OPTIONS: dict[str, type] = {
    "smallnet": SmallNetOptions,
    "cxrnet": CxrNetOptions,
    "vgg16": Vgg16Options,
    "resnet": ResNetOptions,
}


def options_class(architecture: str, where: str = "train") -> type:
    """The options dataclass of a registered architecture.

    Args:
        architecture: a builder name (``smallnet``, ``cxrnet``, ``vgg16``).
        where: the params section being read, for the error message.

    Returns:
        The dataclass whose fields are that builder's options.

    Raises:
        CxrError: the architecture is not registered.
    """
    if architecture not in OPTIONS:
        raise CxrError(
            f"{where}: unknown model {architecture!r}: choose one of {', '.join(sorted(OPTIONS))} "
            f"(or set {where}.architecture to one of them)"
        )
    return OPTIONS[architecture]
