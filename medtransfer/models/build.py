"""Assemble the full model: in-graph preprocessing -> backbone -> head.

The model takes images in [0, 1] of any height and width with the spec's channel count, so the
same graph serves training, evaluation and TF Serving. Binary tasks use a two-class softmax
(mathematically a sigmoid) so every task returns one probability column per class.

A spec with tabular features gets a model with named inputs: ``image`` and one per feature
(numeric float32, NaN = missing; categorical string, "" = missing), encoded inside the graph
and fused with the pooled image features before the head.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import keras
import numpy as np

from medtransfer.errors import RunError, WeightsUnavailableError
from medtransfer.models.backbones import build_backbone, get_backbone
from medtransfer.models.layers import (
    BackbonePreprocessing,
    ChannelAdapter,
    ModelResizing,
    StandardizeWithMissing,
)
from medtransfer.models.losses import MaskedAUC, MaskedBinaryAccuracy, MaskedMultilabelLoss
from medtransfer.models.peft import enable_lora
from medtransfer.models.saved import load_run_model
from medtransfer.rundir import RUN_WEIGHTS, open_run
from medtransfer.spec import Spec

TABULAR_UNITS = 16


def build_model(
    spec: Spec, tabular_statistics: Mapping[str, tuple[float, float]] | None = None
) -> keras.Model:
    """The model for ``spec``; ``tabular_statistics`` (``medtransfer.data.tabular``) gives the
    training mean and sd of each numeric tabular feature, which the model standardises with."""
    inputs = keras.Input((None, None, spec.image.channels), name="image")
    x, backbone = _image_features(spec, inputs)
    tune = spec.training.fine_tune
    if tune.method == "lora":  # before any training or checkpoint: the variables are fixed now
        enable_lora(backbone, tune.rank)
    if spec.tabular:
        tabular_inputs, tabular = _tabular_branch(spec, tabular_statistics or {})
        x = keras.layers.Concatenate(name="fusion")([x, tabular])
        inputs = {"image": inputs, **tabular_inputs}
    x = keras.layers.Dropout(spec.model.dropout, name="head_dropout")(x)
    activation = "sigmoid" if spec.task == "multilabel" else "softmax"
    outputs = keras.layers.Dense(
        len(spec.classes), activation=activation, dtype="float32", name="probabilities"
    )(x)
    return keras.Model(inputs, outputs, name=f"medtransfer_{spec.name}")


def build_encoder(spec: Spec) -> keras.Model:
    """Images in [0, 1] -> the backbone's pooled features, with the classifier's own in-graph
    preprocessing and a layer named ``backbone``: what self-supervised pretraining trains and
    saves (so ``run:`` takes its backbone), and what a linear probe extracts features with."""
    inputs = keras.Input((None, None, spec.image.channels), name="image")
    features, _ = _image_features(spec, inputs)
    return keras.Model(inputs, features, name=f"encoder_{spec.name}")


def _image_features(spec: Spec, inputs: keras.KerasTensor) -> tuple[keras.KerasTensor, keras.Model]:
    """Resize, channels, the backbone's normalisation, then the backbone (named ``backbone``):
    its pooled output, and the backbone."""
    height, width = spec.image.size
    backbone_info = get_backbone(spec.model.backbone)
    x = ModelResizing(height, width, antialias=True, name="resize")(inputs)
    x = ChannelAdapter(3, name="to_rgb")(x)
    x = BackbonePreprocessing(backbone_info.preprocessing, name="backbone_preprocessing")(x)
    backbone = _backbone_with_weights(spec, (height, width, 3))
    backbone.name = "backbone"
    if spec.model.weights == "none":
        _fast_batchnorm_statistics(backbone)
    return backbone(x), backbone


def _tabular_branch(
    spec: Spec, statistics: Mapping[str, tuple[float, float]]
) -> tuple[dict[str, keras.KerasTensor], keras.KerasTensor]:
    """Named inputs and their encoding: numeric standardised plus a missing flag; categorical
    one-hot over the spec's values plus one "other or missing" slot; then a small Dense layer,
    so the tabular signal reaches the head at a scale comparable to the image features."""
    inputs, encoded = {}, []
    for feature in spec.tabular:
        if feature.type == "numeric":
            if feature.name not in statistics:
                raise ValueError(f"no training statistics for numeric feature {feature.name!r}")
            mean, std = statistics[feature.name]
            inputs[feature.name] = keras.Input((1,), dtype="float32", name=feature.name)
            layer = StandardizeWithMissing(mean, std, name=f"{feature.name}_standardize")
        else:
            inputs[feature.name] = keras.Input((1,), dtype="string", name=feature.name)
            layer = keras.layers.StringLookup(
                vocabulary=feature.values,
                num_oov_indices=1,
                output_mode="one_hot",
                name=f"{feature.name}_lookup",
            )
        encoded.append(layer(inputs[feature.name]))
    joined = (
        keras.layers.Concatenate(name="tabular_concat")(encoded) if len(encoded) > 1 else encoded[0]
    )
    units = keras.layers.Dense(TABULAR_UNITS, activation="relu", name="tabular_dense")(joined)
    return inputs, units


def _backbone_with_weights(spec: Spec, input_shape: tuple[int, int, int]) -> keras.Model:
    weights = spec.model.weights
    if not weights.startswith(RUN_WEIGHTS):
        return build_backbone(spec.model.backbone, weights, input_shape)
    return _backbone_from_run(Path(weights.removeprefix(RUN_WEIGHTS)), spec, input_shape)


def _backbone_from_run(run_dir: Path, spec: Spec, input_shape: tuple[int, int, int]) -> keras.Model:
    """Medical-source pretraining: start from the backbone another medtransfer run trained.

    Only the backbone transfers (its head answered another question). Convolutional weights do
    not depend on the input size, so the source run may have trained at another resolution.
    """
    try:
        source_run = open_run(run_dir)
    except RunError as error:
        raise WeightsUnavailableError(f"model.weights run:{run_dir}: {error}") from None
    if source_run.info.backbone != spec.model.backbone:
        raise WeightsUnavailableError(
            f"run {run_dir} trained a {source_run.info.backbone} backbone; this spec asks "
            f"for {spec.model.backbone}"
        )
    source = load_run_model(source_run, encoder=True).get_layer("backbone")
    # Through a weights file rather than set_weights: loading a file is what refreshes derived
    # state such as EfficientNet's Normalization statistics and its ImageNet stem rescaling.
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "backbone.weights.h5"
        source.save_weights(path)
        return build_backbone(spec.model.backbone, str(path), input_shape)


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


def compile_model(
    model: keras.Model,
    spec: Spec,
    steps_per_epoch: int,
    *,
    learning_rate: float | None = None,
    epochs: int | None = None,
    warmup_epochs: int = 0,
    jit_compile: bool | str = "auto",
) -> keras.Model:
    """Loss, metrics and optimiser for the task; AUROC is macro over classes (binary: the AUROC).

    AdamW (``weight_decay`` 0 makes it Adam). The learning rate rises linearly over
    ``warmup_epochs`` and then follows a cosine decay over the rest of ``epochs`` (default: the
    whole run; a fine-tuning phase passes its own): small datasets make the last epochs noisy
    at a constant rate, and the best-epoch choice then rewards luck.
    """
    training = spec.training
    rate = learning_rate or training.learning_rate
    decay_epochs = (epochs or training.epochs) - warmup_epochs
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup_epochs else rate,
        decay_steps=max(decay_epochs, 1) * steps_per_epoch,
        alpha=0.01,
        warmup_target=rate if warmup_epochs else None,
        warmup_steps=warmup_epochs * steps_per_epoch,
    )
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=training.weight_decay)
    model.compile(
        optimizer=optimizer,
        loss=make_loss(spec),
        metrics=make_metrics(spec),
        jit_compile=jit_compile,
    )
    return model


def make_metrics(spec: Spec) -> list[keras.metrics.Metric]:
    """AUROC (macro over classes, named ``auc``: checkpoints select on ``val_auc``) and accuracy.

    Multilabel metrics skip unknown labels (see ``medtransfer.models.losses``).
    """
    if spec.task == "multilabel":
        k = len(spec.classes)
        return [MaskedAUC(multi_label=True, num_labels=k, name="auc"), MaskedBinaryAccuracy()]
    return [
        keras.metrics.AUC(multi_label=True, num_labels=len(spec.classes), name="auc"),
        keras.metrics.CategoricalAccuracy(name="accuracy"),
    ]


def make_loss(spec: Spec) -> keras.losses.Loss:
    """Cross-entropy, or focal loss, which down-weights the easy majority-class examples.

    Focal loss uses ``alpha=1`` so that ``focal_gamma: 0`` is exactly cross-entropy; class
    balance is ``class_weight``'s job, not a second, scalar re-weighting here. Multilabel
    losses skip unknown labels.
    """
    training = spec.training
    smoothing = training.label_smoothing
    focal = training.loss == "focal"
    gamma = training.focal_gamma if focal else 0.0
    if spec.task == "multilabel":
        return MaskedMultilabelLoss(gamma=gamma, label_smoothing=smoothing)
    if focal:
        return keras.losses.CategoricalFocalCrossentropy(
            alpha=1.0, gamma=gamma, label_smoothing=smoothing
        )
    return keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)


def balanced_class_weights(targets: np.ndarray) -> dict[int, float]:
    """Weights n / (k * n_class) per class index, so each class carries equal total weight.

    A class absent from the training split gets weight 0 (it has no examples to weigh).
    """
    counts = targets.sum(axis=0)
    n, k = float(counts.sum()), len(counts)
    return {i: (n / (k * c) if c else 0.0) for i, c in enumerate(counts.tolist())}
