"""Self-supervised pretraining runs: a spec's training images (and unlabelled folders) in, a
backbone weight source out.

``pretrain`` trains SimSiam or SimCLR (``medtransfer.models.ssl``; the spec's ``pretraining``
says which) with ``model.fit`` on two augmented views of every training image of the spec, plus
any unlabelled sources: folders of DICOM or image files, or other specs (their training split,
labels ignored). Images take the same path as training's: the decode pool, the decode-once
cache, the epoch-keyed batch order and the stateless per-batch augmentation (the ``ssl`` preset
of ``data.augment_presets``, drawn twice per batch with different seeds). It never reads the
validation or test images: those choose and judge the classifier later, and a representation
that had seen them would leak them.

The result is a run directory (``rundir``, kind ``pretrain``): ``model.keras`` is the encoder
(images -> pooled backbone features, its backbone layer named ``backbone``), so
``model.weights: run:DIR`` starts a classifier from it. A checkpoint after every epoch makes
it resumable exactly as ``train`` is (same final weights as an uninterrupted run).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from medtransfer import atomic, rundir
from medtransfer.data.augment import Augmenter, GraphAugmenter
from medtransfer.data.augment_presets import PRETRAINING_PRESETS, SSL_PRESET
from medtransfer.data.cache import UnreadableImages
from medtransfer.data.manifest import IMAGE_SUFFIXES, build_manifest, fingerprint
from medtransfer.data.pipeline import load_spec_images, make_training_dataset
from medtransfer.errors import DataError, RunError
from medtransfer.models.adaptation import adapt_batchnorm
from medtransfer.models.build import build_encoder
from medtransfer.models.ssl import SimCLR, SimSiam, predictor, projector
from medtransfer.rundir import (
    HISTORY_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    SPEC_FILE,
    UNLABELED_FILE,
    Run,
    RunInfo,
    package_versions,
)
from medtransfer.spec import Spec, dump_spec, load_spec
from medtransfer.training.checkpoint import Checkpoint, EpochCheckpoint, TrainingState
from medtransfer.training.devices import plan_execution
from medtransfer.training.run import (
    HistoryLogger,
    fit_verbosity,
    model_record,
    start_or_resume,
    undone_if_failed_before_a_checkpoint,
)

_SECOND_VIEW = 0x2D7669  # keeps the second view's draws apart from the first's


class TwoViews:
    """An ``Augmenter`` for the training pipeline that returns two views of each batch as
    ``(first, second)`` in place of ``(images, targets)``: the pipeline's seeded, epoch-keyed
    batches then carry SimSiam's pairs, and ``fit`` hands them to its ``train_step``."""

    def __init__(self, augment: Augmenter) -> None:
        self._augment = augment

    def __call__(
        self, images: tf.Tensor, targets: tf.Tensor, seed: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        fold = tf.random.experimental.stateless_fold_in
        first, _ = self._augment(images, targets, seed)
        second, _ = self._augment(images, targets, fold(seed, _SECOND_VIEW))
        return first, second


def pretrain(
    spec: Spec | None,
    out_dir: str | Path,
    *,
    unlabeled: Sequence[str | Path] = (),
    overwrite: bool = False,
    resume: bool = False,
    workers: int | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> Run:
    """Pretrain the spec's backbone self-supervised (``pretraining.objective``) for
    ``training.epochs`` epochs into a run directory.

    Batch size, learning rate (AdamW with cosine decay), weight decay and seed are the spec's
    ``training`` values; the backbone starts from ``model.weights`` (``none``: random).
    ``unlabeled``: folders of DICOM or image files, or spec files whose training split is
    added without its labels. ``resume`` carries on a killed run from its last epoch (``spec``
    and ``unlabeled`` may then be left out: the run's own are used).
    """
    out = Path(out_dir)
    with undone_if_failed_before_a_checkpoint(out):
        spec, checkpoint = start_or_resume(spec, out, overwrite=overwrite, resume=resume)
        sources = _unlabeled_sources(out, unlabeled, resume)
        return _pretrain(spec, out, sources, checkpoint, workers, callbacks, resume)


def _unlabeled_sources(out: Path, given: Sequence[str | Path], resume: bool) -> list[str]:
    """The unlabelled sources as absolute paths; a resumed run keeps the ones it started with."""
    sources = [str(Path(source).resolve()) for source in given]
    stored = out / UNLABELED_FILE
    if resume and stored.is_file():
        started = json.loads(stored.read_text())
        if sources and sources != started:
            raise RunError(f"{out} was started with unlabelled sources {started}, not {sources}")
        return started
    atomic.write_json(stored, sources)
    return sources


def _pretrain(
    spec: Spec,
    out: Path,
    sources: list[str],
    checkpoint: Checkpoint | None,
    workers: int | None,
    callbacks: Sequence[keras.callbacks.Callback],
    resume: bool,
) -> Run:
    started, cpu_started = time.time(), time.process_time()
    keras.utils.set_random_seed(spec.training.seed)
    rows, images, skipped = readable_images(spec, pretraining_rows(spec, sources), workers)
    state = checkpoint.state if checkpoint else TrainingState(data_fingerprint=fingerprint(rows))
    if state.data_fingerprint != fingerprint(rows):
        raise RunError(f"the images behind {out} changed since the run started; it cannot resume")
    if checkpoint is None:
        atomic.write_text(out / SPEC_FILE, dump_spec(spec))
        atomic.write_text(out / MANIFEST_FILE, rows.to_csv(index=False))
    model = _fit(spec, out, images, state, checkpoint, callbacks)
    # BatchNormalization trained on augmented views in batch mode; its moving averages trail
    # (and, after a short run, still hold their initial 0 and 1): estimate what the saved
    # encoder normalises with at inference from the images themselves, in one pass (AdaBN's).
    adapt_batchnorm(model.encoder, images, batch_size=spec.training.batch_size, exact=False)
    model.encoder.save(out / MODEL_FILE)
    info = _run_info(spec, rows, state, out, skipped)
    return rundir.write_info(
        out,
        info.replace(
            train_seconds=round(time.time() - started, 1),
            cpu_seconds=round(time.process_time() - cpu_started, 1),
            resumed=resume,
            versions=package_versions(),
        ),
    )


def readable_images(
    spec: Spec, rows: pd.DataFrame, workers: int | None
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """The rows' images, decoded once (through the cache). An unlabelled archive is what it
    is: a file there that cannot be decoded is left out and reported (its message is in the
    list returned, and warned about), not a failed run. A training image that cannot be read
    still stops the run, as in ``train``: the spec says it is data."""
    label = "decoding pretraining images"
    try:
        return rows, load_spec_images(spec, rows, workers=workers, label=label), []
    except UnreadableImages as error:
        unlabeled = set(rows.loc[rows["split"] == "unlabeled", "path"])
        if not error.paths or not set(error.paths) <= unlabeled:
            raise
        kept = rows[~rows["path"].isin(error.paths)].reset_index(drop=True)
        if kept.empty:
            raise
        warnings.warn(
            f"pretraining leaves out {len(error.paths)} unlabelled file(s) that cannot be "
            f"decoded: {error}",
            UserWarning,
            stacklevel=2,
        )
        return kept, load_spec_images(spec, kept, workers=workers, label=label), error.errors


def pretraining_rows(spec: Spec, sources: Sequence[str]) -> pd.DataFrame:
    """The images pretraining reads: the spec's training split, then each unlabelled source's
    files (split ``unlabeled``, no label). Validation and test rows are dropped here, before
    anything is decoded."""
    manifest = build_manifest(spec)
    parts = [manifest.loc[manifest["split"] == "train", ["path", "split", "patient", "site"]]]
    for source in sources:
        parts.append(pd.DataFrame({"path": _source_paths(Path(source)), "split": "unlabeled"}))
    rows = pd.concat(parts, ignore_index=True).fillna("")
    rows["label"] = ""
    return rows


def _source_paths(source: Path) -> list[str]:
    """A folder's image files (DICOM by extension or none, PNG, JPEG, TIFF, BMP), or the
    training split of a spec file."""
    if source.is_file() and source.suffix.lower() in (".yaml", ".yml"):
        manifest = build_manifest(load_spec(source))
        return manifest.loc[manifest["split"] == "train", "path"].tolist()
    if not source.is_dir():
        raise DataError(f"unlabelled source {source} is neither a folder nor a spec (.yaml)")
    paths = [
        str(path)
        for path in sorted(source.rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not paths:
        raise DataError(f"unlabelled source {source} holds no image or DICOM files")
    return paths


def _fit(
    spec: Spec,
    out: Path,
    images: np.ndarray,
    state: TrainingState,
    checkpoint: Checkpoint | None,
    callbacks: Sequence[keras.callbacks.Callback],
) -> SimSiam | SimCLR:
    """The objective's remaining epochs in one ``model.fit``, a checkpoint after each."""
    training, objective = spec.training, spec.pretraining.objective
    epochs, steps = training.epochs, -(-len(images) // training.batch_size)
    name = f"{objective}_{spec.name}"
    if objective == "simclr":
        temperature = spec.pretraining.temperature
        model = SimCLR(build_encoder(spec), projector(), temperature=temperature, name=name)
    else:
        model = SimSiam(build_encoder(spec), projector(), predictor(), name=name)
    model(images[:2])  # builds every variable, so a checkpoint can be restored into them
    schedule = keras.optimizers.schedules.CosineDecay(
        training.learning_rate, decay_steps=epochs * steps, alpha=0.01
    )
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=training.weight_decay)
    model.compile(optimizer=optimizer, jit_compile=plan_execution().jit_compile)
    model.optimizer.build(model.trainable_variables)
    if checkpoint is not None:
        checkpoint.restore(model, optimizer=True)
    augment = TwoViews(GraphAugmenter(PRETRAINING_PRESETS[SSL_PRESET], seed=training.seed))
    data = make_training_dataset(
        images,
        np.zeros((len(images), 1), np.float32),
        batch_size=training.batch_size,
        seed=training.seed,
        epochs=range(state.epochs, epochs),
        augment=augment,
    )
    saver = EpochCheckpoint(out, state, epochs, None)
    try:
        model.fit(
            data,
            initial_epoch=state.epochs,
            epochs=epochs,
            steps_per_epoch=steps,
            shuffle=False,  # the dataset orders itself, keyed by (seed, epoch)
            callbacks=[HistoryLogger(out / HISTORY_FILE, append=True), saver, *callbacks],
            verbose=fit_verbosity(),
        )
    finally:
        saver.close()
    return model


def _run_info(
    spec: Spec, rows: pd.DataFrame, state: TrainingState, out: Path, skipped: list[str]
) -> RunInfo:
    """``run.json`` of a pretraining run: what a ``run:`` source needs (backbone, image
    policy), what it read and left out (unreadable unlabelled files), and its loss curve
    (``history.csv``)."""
    history = pd.read_csv(out / HISTORY_FILE)
    counts = rows["split"].value_counts()
    return RunInfo(
        **model_record(spec),
        kind="pretrain",
        data_fingerprint=state.data_fingerprint,
        images={str(split): int(n) for split, n in counts.items()},
        epochs_run=state.epochs,
        pretraining={
            "objective": spec.pretraining.objective,
            "temperature": (
                spec.pretraining.temperature if spec.pretraining.objective == "simclr" else None
            ),
            "augmentation": SSL_PRESET,
            "batch_size": spec.training.batch_size,
            "learning_rate": spec.training.learning_rate,
            "loss": [round(float(v), 5) for v in history["loss"]],
            "z_std": [round(float(v), 5) for v in history["z_std"]],
            "unreadable_skipped": skipped,
        },
    )
