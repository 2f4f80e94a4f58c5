"""Backbone registry: each entry is data (constructor, preprocessing, sizes, blocks), not code.

Adding a backbone is adding a line here. Preprocessing is named per family because Keras
applications disagree: ResNet50 wants caffe-style BGR mean subtraction on 0..255 values, while
EfficientNet carries its own rescaling and normalisation inside the network and must be fed 0..255
unchanged (normalising twice silently ruins pretrained features). ``tests/test_backbones.py``
checks every entry against the ``preprocess_input`` of its Keras module.

Block patterns say how a backbone splits into the units that fine-tuning unfreezes from the top
(``backbone_blocks``, ``unfreeze_top``); they are regular expressions over the layer names Keras
gives, so a family whose names change in a Keras release fails the partition tests, not silently.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from medtransfer.errors import WeightsUnavailableError

if TYPE_CHECKING:
    import keras

Preprocessing = Literal["caffe", "torch", "tf", "raw255"]

# Each pattern's first group names the block a matching layer belongs to. ResNet v1/v2 and
# DenseNet: one residual or dense layer per block (``conv4_block6_...``); DenseNet's transitions
# (``pool2_...``) are blocks of their own. EfficientNet v1/v2: one MBConv block (``block6h_...``).
# ConvNeXt: one block per ``stage_i_block_j`` and one per downsampling step. MobileNetV3: one per
# inverted residual (``expanded_conv_``, ``expanded_conv_1_``, ...).
RESNET_BLOCKS = (r"^(conv[2-5]_block\d+)_",)
DENSENET_BLOCKS = (r"^(conv[2-5]_block\d+)_", r"^(pool[2-4])_")
EFFICIENTNET_BLOCKS = (r"^(block\d+[a-z])_",)
CONVNEXT_BLOCKS = (r"_(stage_\d+_block_\d+)_", r"_(downsampling_block_\d+)$")
MOBILENETV3_BLOCKS = (r"^(expanded_conv(?:_\d+)?)_",)


@dataclass(frozen=True)
class Backbone:
    """One registered feature extractor.

    ``params`` is the parameter count without the top, as data: building all backbones to count
    them takes most of a minute, and the count does not depend on the input size (the tests check
    it against real builds). ``blocks`` are the block patterns above.
    """

    name: str
    constructor: str  # attribute of keras.applications
    preprocessing: Preprocessing
    default_size: int  # the input size the ImageNet weights were trained at
    params: int
    blocks: tuple[str, ...]
    min_size: int = 32


# One line per backbone; its registry name is the constructor's name in lower case.
_REGISTRY: tuple[tuple[str, Preprocessing, int, int, tuple[str, ...]], ...] = (
    # keras.applications constructor, preprocessing, default size, parameters (no top), blocks
    ("ResNet50", "caffe", 224, 23_587_712, RESNET_BLOCKS),
    ("ResNet101", "caffe", 224, 42_658_176, RESNET_BLOCKS),
    ("ResNet152", "caffe", 224, 58_370_944, RESNET_BLOCKS),
    ("ResNet50V2", "tf", 224, 23_564_800, RESNET_BLOCKS),
    ("DenseNet121", "torch", 224, 7_037_504, DENSENET_BLOCKS),
    ("EfficientNetB0", "raw255", 224, 4_049_571, EFFICIENTNET_BLOCKS),
    ("EfficientNetB1", "raw255", 240, 6_575_239, EFFICIENTNET_BLOCKS),
    ("EfficientNetB2", "raw255", 260, 7_768_569, EFFICIENTNET_BLOCKS),
    ("EfficientNetB3", "raw255", 300, 10_783_535, EFFICIENTNET_BLOCKS),
    ("EfficientNetB4", "raw255", 380, 17_673_823, EFFICIENTNET_BLOCKS),
    ("EfficientNetB5", "raw255", 456, 28_513_527, EFFICIENTNET_BLOCKS),
    ("EfficientNetB6", "raw255", 528, 40_960_143, EFFICIENTNET_BLOCKS),
    ("EfficientNetB7", "raw255", 600, 64_097_687, EFFICIENTNET_BLOCKS),
    ("EfficientNetV2B0", "raw255", 224, 5_919_312, EFFICIENTNET_BLOCKS),
    ("EfficientNetV2B1", "raw255", 240, 6_931_124, EFFICIENTNET_BLOCKS),
    ("EfficientNetV2B2", "raw255", 260, 8_769_374, EFFICIENTNET_BLOCKS),
    ("EfficientNetV2B3", "raw255", 300, 12_930_622, EFFICIENTNET_BLOCKS),
    ("EfficientNetV2S", "raw255", 384, 20_331_360, EFFICIENTNET_BLOCKS),
    ("EfficientNetV2M", "raw255", 480, 53_150_388, EFFICIENTNET_BLOCKS),
    ("EfficientNetV2L", "raw255", 480, 117_746_848, EFFICIENTNET_BLOCKS),
    ("ConvNeXtTiny", "raw255", 224, 27_820_128, CONVNEXT_BLOCKS),
    ("ConvNeXtSmall", "raw255", 224, 49_454_688, CONVNEXT_BLOCKS),
    ("MobileNetV3Small", "raw255", 224, 939_120, MOBILENETV3_BLOCKS),
    ("MobileNetV3Large", "raw255", 224, 2_996_352, MOBILENETV3_BLOCKS),
)

BACKBONES: dict[str, Backbone] = {
    constructor.lower(): Backbone(constructor.lower(), constructor, *entry)
    for constructor, *entry in _REGISTRY
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name.lower()]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


def backbone_table() -> str:
    """The registry as an aligned text table, for ``medtransfer backbones``."""
    header = ("name", "keras constructor", "preprocessing", "default input", "parameters")
    rows = [
        (
            b.name,
            b.constructor,
            b.preprocessing,
            f"{b.default_size}x{b.default_size}",
            f"{b.params:,}",
        )
        for b in BACKBONES.values()
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i == len(header) - 1 else cell.ljust(w)  # parameters: right
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in (header, *rows)
    )


def _offline_message(backbone: Backbone, cause: BaseException) -> str:
    return (
        f"cannot download ImageNet weights for {backbone.constructor} ({cause}). "
        "This machine looks offline. On a connected machine run\n"
        f"  medtransfer weights download {backbone.name} --out weights/\n"
        "(it checks the file's hash and that it loads), copy the *_notop.h5 file to this "
        "machine and pass it as model.weights in the spec (or --weights PATH), or use weights "
        "'none' to train from random initialisation."
    )


def build_backbone(name: str, weights: str, input_shape: tuple[int, int, int]) -> keras.Model:
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
    if backbone.constructor.startswith("EfficientNetB"):
        return _with_imagenet_stem_rescaling(model, path)
    return model


def _with_imagenet_stem_rescaling(model: keras.Model, path: Path) -> keras.Model:
    """Give an EfficientNet (v1) loaded from a file the input scaling Keras gives ImageNet builds.

    ``EfficientNetB*(weights="imagenet")`` adds a ``Rescaling(1/sqrt(stddev))`` after its
    ``Normalization`` layer because the ImageNet weights files hold the statistics in a form that
    needs it (keras ``efficientnet.py``, TF issue 49930); ``weights=None`` plus ``load_weights``
    leaves it out, and the network then sees its inputs at another scale than it was trained on. The
    layer has no weights, so the file cannot say whether it belongs: its statistics can. A file
    with ImageNet statistics (not the untouched mean 0, variance 1 of a random-init build, which
    training never changes) gets the layer, inserted exactly where Keras puts it.
    """
    import keras
    import numpy as np
    from keras.src.applications.efficientnet import IMAGENET_STDDEV_RGB

    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    mean, variance = (np.asarray(w) for w in norm.weights[:2])
    if np.allclose(mean, 0) and np.allclose(variance, 1):
        return model
    rescale = keras.layers.Rescaling([1 / np.sqrt(s) for s in IMAGENET_STDDEV_RGB])

    def call(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        return rescale(outputs) if layer.name == norm.name else outputs

    # Fresh layers rather than shared ones: a shared layer would have two call sites, and
    # ``layer.output`` (Grad-CAM's intermediate models) would point into the discarded graph.
    # ``load_weights``, not ``set_weights``: only loading refreshes the statistics Normalization
    # actually divides by (``set_weights`` leaves the random-init mean 0, variance 1 in force).
    rescaled = keras.models.clone_model(model, call_function=call)
    rescaled.load_weights(str(path))
    return rescaled


def backbone_blocks(model: keras.Model, name: str) -> list[list[keras.layers.Layer]]:
    """Split a backbone built by ``build_backbone`` into blocks, ordered from input to output.

    A layer whose name matches one of the family's block patterns belongs to the block the
    pattern names; any other layer belongs to the block of the layer before it in the model's
    (topological) layer order. So the input, the backbone's own preprocessing layers and the stem
    form block 0, and the final layers (EfficientNet's ``top_conv``, ResNetV2's ``post_bn``,
    DenseNet's ``bn``, ConvNeXt's final LayerNormalization, pooling) join the last block, which
    therefore always holds trainable weights. Every layer is in exactly one block.

    For a full medtransfer model pass ``model.get_layer("backbone")``.
    """
    patterns = [re.compile(pattern) for pattern in get_backbone(name).blocks]
    blocks: dict[str, list[keras.layers.Layer]] = {}
    current = "stem"
    for layer in model.layers:
        match = next(filter(None, (p.search(layer.name) for p in patterns)), None)
        if match:
            current = match.group(1)
        blocks.setdefault(current, []).append(layer)
    return list(blocks.values())


def _blocks_to_unfreeze(n_blocks: int | float, total: int) -> int:
    if isinstance(n_blocks, bool) or n_blocks < 0:
        raise ValueError(f"n_blocks must be a count >= 1 or a fraction in [0, 1), got {n_blocks!r}")
    if n_blocks >= 1:
        if n_blocks != int(n_blocks):
            raise ValueError(f"a block count must be whole, got {n_blocks!r}")
        return min(int(n_blocks), total)
    return max(1, round(n_blocks * total)) if n_blocks > 0 else 0


def all_layers(layer: keras.layers.Layer):
    """``layer`` and every layer nested in it, at any depth."""
    yield layer
    for inner in getattr(layer, "layers", ()):
        yield from all_layers(inner)


def unfreeze_top(
    model: keras.Model, name: str, n_blocks: int | float, *, train_batchnorm: bool = False
) -> int:
    """Make only the top blocks of a backbone trainable; return how many blocks that is.

    ``n_blocks`` >= 1 is a whole number of blocks counted from the output (more than the
    backbone has means all of them); 0 < ``n_blocks`` < 1 is a fraction of the blocks, rounded
    to the nearest count but at least one; 0 freezes everything. Blocks are those of
    ``backbone_blocks``. All layers below the top blocks get ``trainable=False``. Every
    BatchNormalization layer, in any block, stays ``trainable=False``, which in Keras 3 also
    runs it in inference mode: small medical batches would otherwise overwrite the pretrained
    statistics. LayerNormalization (ConvNeXt) has no running statistics and trains with its block.
    ``train_batchnorm`` lets the top blocks' BatchNormalization train too (batch statistics,
    moving averages updated): for a source whose statistics do not fit the target, e.g. a
    backbone pretrained on another small medical dataset.
    """
    import keras

    blocks = backbone_blocks(model, name)
    count = _blocks_to_unfreeze(n_blocks, len(blocks))
    model.trainable = True
    for index, block in enumerate(blocks):
        for layer in block:
            layer.trainable = index >= len(blocks) - count
    if not train_batchnorm:
        for layer in all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return count
