"""Parameter-efficient fine-tuning: which of a pretrained backbone's weights may move.

``training.fine_tune.method`` picks one of three answers for the fine-tuning phase:

- ``full`` (default): the top blocks train whole (``backbones.unfreeze_top``), as before.
- ``lora``: every Conv2D and Dense kernel of the backbone stays frozen and learns a low-rank
  update instead (Keras's ``enable_lora``: ``kernel + alpha / rank * A @ B`` with ``B`` zero at
  the start, so the model starts exactly where the pretrained one was). Only ``A`` and ``B``
  train, plus BatchNormalization where ``fine_tune.batchnorm`` says so. The adapters are
  enabled when the model is built, so the variables a checkpoint holds do not change between
  phases; a saved ``.keras`` file stores the merged kernel and reloads (``safe_mode``) with
  zero adapters, i.e. the same function.
- ``norm``: only the normalisation layers' scale and offset (gamma, beta) and the biases train;
  BatchNormalization then uses batch statistics, as any training BatchNormalization does.

A few hundred labelled images cannot move millions of weights far without overfitting; a few
thousand well-placed ones can adapt a representation to them. ``trainable_share`` says how
many train, which a run prints and records.

Keras resets every variable's ``trainable`` flag when a layer's ``trainable`` is set, so
``apply_method`` must run after anything else that sets ``trainable`` in a phase.
"""

from __future__ import annotations

import math
from typing import Any

import keras

from medtransfer.models.backbones import all_layers

LORA_LAYERS = (keras.layers.Conv2D, keras.layers.Dense)
NORM_LAYERS = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
)
METHODS = ("full", "lora", "norm")


def enable_lora(backbone: keras.Model, rank: int) -> int:
    """Give every Conv2D and Dense layer of ``backbone`` a rank-``rank`` LoRA update; return
    how many layers got one. Depthwise convolutions have no LoRA form in Keras and stay as
    they are (frozen under ``lora``)."""
    count = 0
    for layer in all_layers(backbone):
        if isinstance(layer, LORA_LAYERS) and not layer.lora_enabled:
            layer.enable_lora(rank)
            count += 1
    if not count:
        raise ValueError(f"backbone {backbone.name!r} has no Conv2D or Dense layer for LoRA")
    return count


def apply_method(backbone: keras.Model, method: str, *, train_batchnorm: bool) -> None:
    """Set which of ``backbone``'s weights train for ``method`` ``lora`` or ``norm`` (``full``
    is ``unfreeze_top``'s business and is left alone). Run it last in a phase's setup."""
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; choose one of {METHODS}")
    if method == "full":
        return
    backbone.trainable = True
    for layer in all_layers(backbone):
        if getattr(layer, "layers", None):  # a nested model: its leaves are visited too
            continue
        if method == "lora":
            _lora_trainability(layer, train_batchnorm)
        else:
            _norm_trainability(layer)


def _lora_trainability(layer: keras.layers.Layer, train_batchnorm: bool) -> None:
    if getattr(layer, "lora_enabled", False):
        for variable in layer.weights:
            variable.trainable = variable.name.startswith("lora_kernel")
    else:
        is_batchnorm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = is_batchnorm and train_batchnorm


def _norm_trainability(layer: keras.layers.Layer) -> None:
    is_norm = isinstance(layer, NORM_LAYERS)
    for variable in layer.trainable_weights:
        variable.trainable = is_norm or variable.name == "bias"


def trainable_share(model: keras.Model) -> dict[str, Any]:
    """Trainable parameters against all parameters (non-trainable statistics included)."""
    trainable = sum(math.prod(v.shape) for v in model.trainable_weights)
    total = sum(math.prod(v.shape) for v in model.weights)
    return {
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_share": trainable / total if total else 0.0,
    }
