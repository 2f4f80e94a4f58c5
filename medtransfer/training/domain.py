"""Domain adaptation inside a training run: which images train, what the model is, what is saved.

The spec's ``domain_adaptation`` section (``medtransfer.spec.DomainAdaptationSpec``) names
source and target sites. A run then

- trains the task on **source-site** training images only (the labelled stream);
- for a method that aligns features (``dann``, ``coral``, ``mmd``), zips every labelled batch
  with a batch of **target-site** training images (the unlabelled stream: their labels are
  never loaded) and trains a ``DomainAdaptationModel`` built around the classifier
  ``build_model`` makes: the features are everything up to the ``backbone`` layer's pooled
  output, the head is ``head_dropout`` and ``probabilities``;
- for a method that re-normalises BatchNorm (``adabn``), trains on source alone, then
  re-estimates BatchNormalization statistics on the target training images
  (``adapt_batchnorm``) and saves that as the run's model, keeping the unadapted one as
  ``model_source.keras``;
- chooses the best epoch on source-site validation images by default: the honest setting when
  the target site has no labels (``validation: target`` or ``all`` use target labels, for
  model selection only).

The run's ``model.keras`` is always the plain classifier (the same layers, trained): it loads
with ``safe_mode=True``, and evaluation, Grad-CAM, export and ``run:`` weights treat it like
any other run's model. The domain classifier of DANN never reaches it.

Both streams are ordered statelessly from ``(seed, epoch)`` and augmented from
``(seed, epoch, batch)``, so a resumed run sees the same batches as an uninterrupted one.

What a method needs (target images, a DomainAdaptationModel, a domain classifier, AdaBN) comes
from its entry in the method registry, ``medtransfer.models.adaptation_methods``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from medtransfer.data.augment import Augmenter, batch_seed
from medtransfer.data.decode_pool import Workers
from medtransfer.data.pipeline import load_spec_images, make_training_dataset
from medtransfer.errors import SpecError
from medtransfer.models.adaptation import (
    DomainAdaptationModel,
    GradientReversalSchedule,
    adapt_batchnorm,
    domain_classifier,
    with_class_weights,
)
from medtransfer.models.adaptation_methods import ADAPTATION_METHODS, AdaptationMethod
from medtransfer.models.saved import load_keras_model
from medtransfer.rundir import SOURCE_MODEL_FILE
from medtransfer.spec import Spec

DANN_HIDDEN = 256
DANN_DROPOUT = 0.5
# Separates the target stream's random draws from the source stream's (same seed, epoch, batch).
_TARGET_STREAM = 0x7A46E7
# AdaBN: the exact estimate takes one pass over the target images per BatchNormalization layer;
# above this many (BN layers x images x pixels) the single train-mode pass is used instead. At 32 px
# MobileNetV3Small on 1,941 images, exact took 19 s and one pass 2.5 s, with target AUROC 0.868
# vs 0.866 (benchmarks/RESULTS.md); at 224 px a ResNet50 would need an hour for exact.
ADABN_EXACT_BUDGET = 100_000_000
ADABN_BATCH = 128


def adaptation_method(spec: Spec) -> AdaptationMethod:
    """The registry entry of the spec's ``domain_adaptation.method``."""
    return ADAPTATION_METHODS[spec.domain_adaptation.method]


def _sites(spec: Spec) -> tuple[list[str], list[str]]:
    adaptation = spec.domain_adaptation
    return list(adaptation.source), list(adaptation.target)


def _fail(spec: Spec, message: str) -> SpecError:
    return SpecError(f"{spec.origin}: domain_adaptation: {message}")


def check_sites(spec: Spec, manifest: pd.DataFrame) -> None:
    """Every named site exists in the data, and each role has the images it needs."""
    adaptation = spec.domain_adaptation
    if not adaptation.active:
        return
    known = sorted(set(manifest["site"].astype(str)))
    source, target = _sites(spec)
    unknown = [site for site in source + target if site not in known]
    if unknown:
        raise _fail(spec, f"site(s) {unknown} are not in the data; its sites are {known}")
    sites = manifest["site"].astype(str)
    train_sites = set(labelled_rows(spec, manifest)["site"].astype(str))
    if not train_sites:
        raise _fail(spec, "no site is left to train on")
    for split in ("train", "val"):
        if not (labelled_rows(spec, manifest)["split"] == split).any():
            raise _fail(spec, f"the source site(s) {sorted(train_sites)} have no {split} images")
    has_target = ((manifest["split"] == "train") & sites.isin(target)).any()
    if adaptation.method != "none" and not has_target:
        raise _fail(spec, f"the target site(s) {target} have no training images to adapt to")
    chosen = validation_rows(spec, manifest)
    if adaptation.validation != "source" and not (chosen["split"] == "val").any():
        raise _fail(spec, f"validation: {adaptation.validation} finds no validation images")


def labelled_rows(spec: Spec, manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows whose labels may train: the source sites (every site outside
    ``target`` when ``source`` is not given; everything when the section is inactive)."""
    if not spec.domain_adaptation.active:
        return manifest
    source, target = _sites(spec)
    sites = manifest["site"].astype(str)
    return manifest[sites.isin(source)] if source else manifest[~sites.isin(target)]


def validation_rows(spec: Spec, manifest: pd.DataFrame) -> pd.DataFrame:
    """The rows whose ``val`` images choose the best epoch (``domain_adaptation.validation``)."""
    choice = spec.domain_adaptation.validation
    if not spec.domain_adaptation.active or choice == "source":
        return labelled_rows(spec, manifest)
    if choice == "all":
        return manifest
    return manifest[manifest["site"].astype(str).isin(spec.domain_adaptation.target)]


def target_rows(spec: Spec, manifest: pd.DataFrame) -> pd.DataFrame:
    """The target sites' training rows: the unlabelled stream (and AdaBN's images)."""
    target = spec.domain_adaptation.target
    return manifest[(manifest["split"] == "train") & manifest["site"].astype(str).isin(target)]


def load_target_images(
    spec: Spec, manifest: pd.DataFrame, *, workers: Workers = None
) -> np.ndarray | None:
    """The target-site training images (no labels), or None when the method needs none."""
    if not adaptation_method(spec).uses_target_images:
        return None
    rows = target_rows(spec, manifest)
    return load_spec_images(spec, rows, workers=workers)


# --- the model ------------------------------------------------------------------------------------


def split_classifier(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """``(features, head)`` sharing the layers of a model ``build_model`` made (images only).

    ``features``: the model's input up to the ``backbone`` layer's pooled output (resize,
    channel handling and normalisation included); ``head``: ``head_dropout`` then
    ``probabilities``. Training either trains the classifier itself.
    """
    dropout, dense = model.get_layer("head_dropout"), model.get_layer("probabilities")
    pooled = dropout.input  # the backbone's output where the classifier calls it
    features = keras.Model(model.inputs, pooled, name="features")
    head_input = keras.Input(tuple(pooled.shape[1:]), name="pooled")
    head = keras.Model(head_input, dense(dropout(head_input)), name="head")
    return features, head


def training_model(model: keras.Model, spec: Spec) -> keras.Model:
    """What ``fit`` trains: the classifier itself, or a ``DomainAdaptationModel`` around it."""
    adaptation = spec.domain_adaptation
    if not adaptation_method(spec).aligns_features:
        return model
    features, head = split_classifier(model)
    classifier = None
    if adaptation_method(spec).needs_domain_classifier:
        # Starts at strength 0; GradientReversalSchedule raises it before every batch.
        classifier = domain_classifier(
            int(features.outputs[0].shape[-1]), DANN_HIDDEN, DANN_DROPOUT, strength=0.0
        )
    return DomainAdaptationModel(
        features,
        head,
        method=adaptation.method,
        weight=adaptation.weight,
        domain_classifier=classifier,
        name=f"{model.name}_{adaptation.method}",
    )


def training_callbacks(
    trained: keras.Model, spec: Spec, steps_per_epoch: int
) -> list[keras.callbacks.Callback]:
    """The gradient-reversal schedule of a domain classifier (DANN's) over the whole run (every
    phase), keyed by the absolute epoch, so a resumed run continues the same curve."""
    if not adaptation_method(spec).needs_domain_classifier:
        return []
    return [GradientReversalSchedule(epochs=spec.training.epochs, steps_per_epoch=steps_per_epoch)]


class BestClassifierCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that saves ``classifier`` whatever model ``fit`` trains.

    With a ``DomainAdaptationModel`` the best epoch's file is then the plain classifier (which
    shares the trained layers), not the training wrapper with its domain classifier.
    """

    def __init__(self, classifier: keras.Model, filepath: str | Path, **kwargs: Any) -> None:
        super().__init__(filepath, **kwargs)
        self._classifier = classifier

    def set_model(self, model: keras.Model) -> None:
        super().set_model(self._classifier)


# --- the data ------------------------------------------------------------------------------------


def make_target_dataset(
    images: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    epochs: range,
    steps_per_epoch: int,
    classes: int,
    augment: Augmenter | None = None,
) -> tf.data.Dataset:
    """``steps_per_epoch`` batches of ``batch_size`` target images per epoch, images only.

    Each epoch walks through as many fresh permutations of the target images as it needs (the
    target set is cycled when smaller than an epoch's worth, sampled when larger), drawn
    statelessly from ``(seed, epoch)`` on a stream of its own; augmentation is seeded from
    ``(seed, epoch, batch)``, again on its own stream. ``classes`` sizes the dummy targets an
    augmenter's signature needs (label-mixing options mix them and they are dropped).
    """
    count = len(images)
    if count == 0:
        raise ValueError("no target images")
    per_epoch = steps_per_epoch * batch_size
    rounds = -(-per_epoch // count)
    images_t = tf.constant(images)
    base = tf.constant([seed, _TARGET_STREAM], tf.int64)
    fold = tf.random.experimental.stateless_fold_in

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        keys = tf.random.stateless_uniform([rounds, count], seed=fold(base, epoch))
        order = tf.reshape(tf.argsort(keys, axis=1), [-1])[:per_epoch]
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
        return batches.enumerate().map(lambda batch, index: (epoch, batch, index))

    def load(epoch: tf.Tensor, batch: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
        x = tf.gather(images_t, index)
        if augment:
            dummy = tf.zeros([tf.shape(index)[0], classes], tf.float32)
            x, _ = augment(x, dummy, fold(batch_seed(seed, epoch, batch), _TARGET_STREAM))
        return x

    batches = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch_batches)
    return batches.map(load, num_parallel_calls=tf.data.AUTOTUNE)


def training_dataset(
    spec: Spec,
    train_x: np.ndarray,
    train_y: np.ndarray,
    target_x: np.ndarray | None,
    *,
    epochs: range,
    steps_per_epoch: int,
    augment: Augmenter | None,
    class_weight: dict[int, float] | None,
) -> tuple[tf.data.Dataset, dict[int, float] | None]:
    """The dataset ``fit`` takes and the ``class_weight`` to pass along with it.

    Without feature alignment: ``make_training_dataset`` on the labelled rows, unchanged. With
    it: ``((source_images, source_targets[, weights]), target_images)`` batches, the class
    weights folded into the source part (``DomainAdaptationModel.fit`` cannot take them).
    """
    batch, seed = spec.training.batch_size, spec.training.seed
    labelled = make_training_dataset(
        train_x, train_y, batch_size=batch, seed=seed, epochs=epochs, augment=augment
    )
    if not adaptation_method(spec).aligns_features:
        return labelled, class_weight
    if class_weight is not None:
        labelled = with_class_weights(labelled, class_weight)
    unlabelled = make_target_dataset(
        target_x,
        batch_size=batch,
        seed=seed,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        classes=train_y.shape[1],
        augment=augment,
    )
    zipped = tf.data.Dataset.zip((labelled, unlabelled))
    return zipped.prefetch(tf.data.AUTOTUNE), None


# --- after training -------------------------------------------------------------------------------


def adabn_exact(model: keras.Model, images: np.ndarray) -> bool:
    """Whether the exact AdaBN estimate (one pass per BN layer) fits ``ADABN_EXACT_BUDGET``."""
    layers = sum(
        isinstance(layer, keras.layers.BatchNormalization)
        for layer in model._flatten_layers(include_self=False, recursive=True)
    )
    return layers * len(images) * int(np.prod(images.shape[1:3])) <= ADABN_EXACT_BUDGET


def adapt_after_training(
    spec: Spec, model_file: Path, target_images: np.ndarray | None
) -> dict[str, Any] | None:
    """AdaBN on the run's best model when the method re-normalises BatchNorm, and what it did
    (``run.json``'s ``adabn``); None, the model untouched, for every other method."""
    if not adaptation_method(spec).renormalises_batchnorm:
        return None
    return apply_adabn(model_file, target_images)


def apply_adabn(model_file: Path, target_images: np.ndarray) -> dict[str, Any]:
    """AdaBN on the run's best model: keep it as ``model_source.keras``, write the adapted one
    as ``model_file`` (atomically). Idempotent: a resumed run adapts the kept source model."""
    source_file = model_file.with_name(SOURCE_MODEL_FILE)
    if not source_file.is_file():
        os.replace(model_file, source_file)
    model = load_keras_model(source_file)
    exact = adabn_exact(model, target_images)
    started = time.time()
    adapted = adapt_batchnorm(model, target_images, batch_size=ADABN_BATCH, exact=exact)
    seconds = time.time() - started
    partial = model_file.with_name(f".adabn.{model_file.name}")
    model.save(partial)
    os.replace(partial, model_file)
    return {
        "adapted_layers": len(adapted),
        "exact": exact,
        "batch_size": ADABN_BATCH,
        "target_images": len(target_images),
        "seconds": round(seconds, 1),
        "source_model": SOURCE_MODEL_FILE,
    }


def run_info(
    spec: Spec,
    manifest: pd.DataFrame,
    train_count: int,
    val_count: int,
    target_count: int,
    adabn: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``domain_adaptation`` entry of ``run.json``."""
    adaptation = spec.domain_adaptation
    if not adaptation.active:
        return {"method": "none"}
    trained_sites = sorted(set(labelled_rows(spec, manifest)["site"].astype(str)))
    validation = {
        "source": "source-site validation images (no target labels used)",
        "target": "target-site validation images (target labels choose the best epoch)",
        "all": "all validation images (target labels help choose the best epoch)",
    }[adaptation.validation]
    info: dict[str, Any] = {
        "method": adaptation.method,
        "weight": adaptation.weight,
        "source": adaptation.source,
        "target": adaptation.target,
        "labelled_sites": trained_sites,
        "validation": adaptation.validation,
        "best_epoch_chosen_on": validation,
        "images": {
            "labelled_train": train_count,
            "validation": val_count,
            "target_train_unlabelled": target_count,
        },
    }
    if adabn is not None:
        info["adabn"] = adabn
    return info
