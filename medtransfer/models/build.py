"""Assemble the full model: in-graph preprocessing -> backbone -> head.

The model takes images in [0, 1] of any height and width with the spec's channel count, so the
same graph serves training, evaluation and TF Serving. Binary tasks use a two-class softmax
(mathematically a sigmoid) so every task returns one probability column per class.
"""

from __future__ import annotations

import keras

from medtransfer.models.backbones import build_backbone, get_backbone
from medtransfer.models.layers import BackbonePreprocessing, ChannelAdapter
from medtransfer.spec import Spec


def build_model(spec: Spec) -> keras.Model:
    height, width = spec.image.size
    backbone_info = get_backbone(spec.model.backbone)
    inputs = keras.Input((None, None, spec.image.channels), name="image")
    x = keras.layers.Resizing(height, width, antialias=True, name="resize")(inputs)
    x = ChannelAdapter(3, name="to_rgb")(x)
    x = BackbonePreprocessing(backbone_info.preprocessing, name="backbone_preprocessing")(x)
    backbone = build_backbone(spec.model.backbone, spec.model.weights, (height, width, 3))
    backbone.name = "backbone"
    if spec.model.weights == "none":
        _fast_batchnorm_statistics(backbone)
    x = backbone(x)
    x = keras.layers.Dropout(spec.model.dropout, name="head_dropout")(x)
    activation = "sigmoid" if spec.task == "multilabel" else "softmax"
    outputs = keras.layers.Dense(
        len(spec.classes), activation=activation, dtype="float32", name="probabilities"
    )(x)
    return keras.Model(inputs, outputs, name=f"medtransfer_{spec.name}")


def _fast_batchnorm_statistics(backbone: keras.Model, momentum: float = 0.9) -> None:
    """Let BatchNormalization's moving statistics follow a randomly initialised network.

    Keras applications use momentum 0.99: the inference-mode statistics then trail the training
    batches by ~100 steps, which on a small dataset trained from scratch is several epochs of
    meaningless validation scores (and a best-checkpoint picked on noise). Pretrained backbones
    keep their own statistics and are left alone.
    """
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def compile_model(model: keras.Model, spec: Spec, steps_per_epoch: int) -> keras.Model:
    """Loss, metrics and optimiser for the task; AUROC is macro over classes (binary: the AUROC).

    The learning rate follows a cosine decay over the whole run: small datasets make the last
    epochs noisy at a constant rate, and the best-epoch choice then rewards luck.
    """
    loss = (
        keras.losses.BinaryCrossentropy()
        if spec.task == "multilabel"
        else keras.losses.CategoricalCrossentropy()
    )
    metrics = [
        keras.metrics.AUC(multi_label=True, num_labels=len(spec.classes), name="auc"),
        keras.metrics.BinaryAccuracy(name="accuracy")
        if spec.task == "multilabel"
        else keras.metrics.CategoricalAccuracy(name="accuracy"),
    ]
    schedule = keras.optimizers.schedules.CosineDecay(
        spec.training.learning_rate, decay_steps=spec.training.epochs * steps_per_epoch, alpha=0.01
    )
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=metrics)
    return model
