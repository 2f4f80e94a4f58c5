"""Backbone registry: each entry is data (constructor, preprocessing, sizes), not code.

Adding a backbone is adding a line here. Preprocessing is named per family because Keras
applications disagree: ResNet50 wants caffe-style BGR mean subtraction on 0..255 values, while
EfficientNet carries its own rescaling and normalisation inside the network and must be fed 0..255
unchanged (normalising twice silently ruins pretrained features).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medtransfer.errors import WeightsUnavailableError

Preprocessing = Literal["caffe", "torch", "tf", "raw255"]


@dataclass(frozen=True)
class Backbone:
    name: str
    constructor: str  # attribute of keras.applications
    preprocessing: Preprocessing
    default_size: int
    min_size: int = 32


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("resnet50", "ResNet50", "caffe", 224),
        Backbone("resnet101", "ResNet101", "caffe", 224),
        Backbone("resnet50v2", "ResNet50V2", "tf", 224),
        Backbone("densenet121", "DenseNet121", "torch", 224),
        Backbone("efficientnetb0", "EfficientNetB0", "raw255", 224),
        Backbone("efficientnetb3", "EfficientNetB3", "raw255", 300),
        Backbone("efficientnetv2b0", "EfficientNetV2B0", "raw255", 224),
        Backbone("mobilenetv3small", "MobileNetV3Small", "raw255", 224),
    )
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name.lower()]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


def _offline_message(backbone: Backbone, cause: BaseException) -> str:
    return (
        f"cannot download ImageNet weights for {backbone.constructor} ({cause}). "
        "This machine looks offline. On a connected machine run\n"
        f'  python -c "import keras; keras.applications.{backbone.constructor}'
        "(weights='imagenet', include_top=False)\"\n"
        "then copy the *_notop.h5 file it saved under ~/.keras/models/ to this machine and pass "
        "it as model.weights in the spec (or --weights PATH), or use weights 'none' to train "
        "from random initialisation."
    )


def build_backbone(name: str, weights: str, input_shape: tuple[int, int, int]):
    """The feature extractor (no top, global average pooling) with the requested weights.

    ``weights`` is ``imagenet`` (Keras downloads once and caches under ~/.keras/models, so a
    cached file also works offline), ``none`` or a path to a weights file for this architecture.
    """
    import keras

    backbone = get_backbone(name)
    constructor = getattr(keras.applications, backbone.constructor)
    kwargs = {"include_top": False, "pooling": "avg", "input_shape": input_shape}
    if weights.lower() == "none":
        return constructor(weights=None, **kwargs)
    if weights.lower() == "imagenet":
        try:
            return constructor(weights="imagenet", **kwargs)
        except Exception as error:  # keras raises a bare Exception on URL failures
            if "URL fetch failure" in str(error) or isinstance(error, OSError):
                raise WeightsUnavailableError(_offline_message(backbone, error)) from None
            raise
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file not found: {path}")
    model = constructor(weights=None, **kwargs)
    try:
        # Keras only warns when parts of a file do not match and keeps random weights there;
        # a half-loaded backbone is worse than none, so any warning here is a failure.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.load_weights(str(path))
    except Exception as error:
        raise WeightsUnavailableError(
            f"weights file {path} does not fit {backbone.constructor} without its top "
            f"(input {input_shape}): {error}"
        ) from None
    return model
