"""Training runs: a spec in, a self-describing run directory out.

A run directory holds everything needed to evaluate, export or reproduce the model without the
original command line: the resolved spec, the seed, package versions, a fingerprint of the data,
the PHI-free manifest with its splits, the training history and the best model.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from medtransfer import atomic, rundir
from medtransfer.data.augment import Augmenter, make_augmenter
from medtransfer.data.decode_pool import DecodePool
from medtransfer.data.manifest import build_manifest, fingerprint
from medtransfer.data.pipeline import load_split, make_dataset
from medtransfer.data.profile import training_profile
from medtransfer.data.summary import data_summary, format_data_summary
from medtransfer.data.tabular import numeric_statistics
from medtransfer.data.tabular import summary as tabular_summary
from medtransfer.errors import RunError
from medtransfer.models import ood
from medtransfer.models.build import balanced_class_weights, build_model, compile_model
from medtransfer.models.degenerate import degenerate_model, warn_degenerate
from medtransfer.models.inputs import Inputs, input_count
from medtransfer.models.peft import apply_method, trainable_share
from medtransfer.models.saved import load_run_model
from medtransfer.rundir import (
    CHECKPOINT_FILE,
    HISTORY_FILE,
    LOGS_DIR,
    MANIFEST_FILE,
    MODEL_FILE,
    OOD_FILE,
    PROFILE_FILE,
    RUN_FILE,
    SPEC_FILE,
    ImagePolicy,
    Run,
    RunInfo,
    package_versions,
)
from medtransfer.spec import Spec, dump_spec, load_spec
from medtransfer.training import adversarial, domain
from medtransfer.training.checkpoint import (
    Checkpoint,
    EpochCheckpoint,
    TrainingState,
    load_checkpoint,
)
from medtransfer.training.devices import (
    ExecutionPlan,
    apply_precision,
    leave_together,
    make_strategy,
    plan_execution,
    sharded,
    synchronize_batchnorm,
)
from medtransfer.training.schedule import Phase, find_backbone, plan_phases


def train(
    spec: Spec | None,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    workers: int | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> Run:
    """Train the spec's model with ``model.fit`` and write a run directory.

    The best epoch by validation AUROC is kept (``model.keras``), the complete training state
    after every epoch in ``checkpoint.npz``; ``run.json`` is written last, so a run directory
    with a ``run.json`` is a finished one. ``resume=True`` carries on an unfinished run from its
    last completed epoch (``spec`` may then be None: the run's own is used) and ends with the
    same weights an uninterrupted run would have. ``callbacks`` are added to every ``fit``.

    A train that raises before its first checkpoint (offline ImageNet weights, unreadable data)
    removes what it created, so the same command can simply run again; after a checkpoint the
    run stays for ``resume``. A model whose validation predictions do not vary across images
    is recorded in ``run.json`` (``degenerate_model``) and warned about
    (:class:`~medtransfer.errors.DegenerateModelWarning`).

    In a multi-worker cluster (``TF_CONFIG``) every worker calls this with the same arguments;
    only the chief writes ``out`` (see :func:`_worker_scratch` for the others), and a worker
    returns the run as the chief writes it there.
    """
    out = Path(out_dir)
    plan = plan_execution()
    strategy = make_strategy(plan)
    apply_precision(plan)
    if plan.is_chief:
        with undone_if_failed_before_a_checkpoint(out):
            run = _train(spec, out, plan, strategy, overwrite, resume, workers, callbacks)
    else:
        with _worker_scratch(out, resume) as scratch:
            info = _train(spec, scratch, plan, strategy, overwrite, resume, workers, callbacks).info
        run = Run(out, info)
    leave_together(plan, strategy)
    warn_degenerate(run.info.degenerate_model, f"train {out}")
    return run


@contextmanager
def _worker_scratch(out: Path, resume: bool) -> Iterator[Path]:
    """The run directory of a worker other than the chief: a temporary folder, removed at the
    end whether training succeeded or not.

    Every worker must take the same steps (training's collective operations, and any that
    saving a model or reading a metric performs, wait for all of them), so a worker writes its
    checkpoints, model and logs as the chief does, but here, never into ``out``, the chief's
    run. To resume it starts from the run's spec and last checkpoint, read from ``out``: the
    same folder on a shared filesystem, or a copy of the chief's.
    """
    with tempfile.TemporaryDirectory(prefix="medtransfer-worker-") as scratch:
        run_dir = Path(scratch) / "run"
        if resume:
            if not (out / SPEC_FILE).is_file():
                raise RunError(
                    f"{out} has no {SPEC_FILE}: to resume, every worker reads the chief's run "
                    "directory; give each the same --out on a shared filesystem (or a copy)"
                )
            run_dir.mkdir()
            for name in (SPEC_FILE, CHECKPOINT_FILE, RUN_FILE):  # RUN_FILE: "finished" check
                if (out / name).is_file():
                    shutil.copy2(out / name, run_dir / name)
        yield run_dir


def _train(
    spec: Spec | None,
    out: Path,
    plan: ExecutionPlan,
    strategy: tf.distribute.Strategy,
    overwrite: bool,
    resume: bool,
    workers: int | None,
    callbacks: Sequence[keras.callbacks.Callback],
) -> Run:
    spec, checkpoint = start_or_resume(spec, out, overwrite=overwrite, resume=resume)
    started, cpu_started = time.time(), time.process_time()
    keras.utils.set_random_seed(spec.training.seed)
    manifest = build_manifest(spec)
    state = _training_state(out, manifest, checkpoint)
    if plan.is_chief:
        summary = data_summary(manifest, spec.classes)
        print(format_data_summary(summary, spec.classes, spec.task), flush=True)
    splits = _load_splits(spec, manifest, workers)
    atomic.write_json(out / PROFILE_FILE, splits.profile)
    if checkpoint is None:
        atomic.write_text(out / SPEC_FILE, dump_spec(spec))
        atomic.write_text(out / MANIFEST_FILE, manifest_for_run(manifest).to_csv(index=False))
    else:
        _truncate_history(out / HISTORY_FILE, state.epochs)

    with strategy.scope():  # model and optimizer variables live on the strategy's devices
        phases, tuning = _fit_phases(spec, out, state, checkpoint, splits, callbacks, plan)
        # the best model, re-normalised for the target site if the method does that (AdaBN)
        adabn = domain.adapt_after_training(spec, out / MODEL_FILE, splits.target)
    adaptation = domain.run_info(
        spec,
        manifest,
        input_count(splits.train[0]),
        input_count(splits.val[0]),
        0 if splits.target is None else len(splits.target),
        adabn,
    )
    info = _run_info(spec, state, phases, manifest, adaptation)
    # a worker's run is thrown away: only the chief's model is worth checking
    checked = _check_kept_model(Run(out, info), spec, splits) if plan.is_chief else None
    return rundir.write_info(
        out,
        info.replace(
            degenerate_model=checked,
            train_seconds=round(time.time() - started, 1),
            # this process's CPU time, all threads (decode worker processes not included)
            cpu_seconds=round(time.process_time() - cpu_started, 1),
            resumed=resume,
            fine_tune=tuning,
            execution=plan.describe(),
            versions=package_versions(),
        ),
    )


def start_or_resume(
    spec: Spec | None, out: Path, *, overwrite: bool, resume: bool
) -> tuple[Spec, Checkpoint | None]:
    """The spec to train and, for a resumed run that got to one, its last checkpoint."""
    if resume:
        return _resumable(out, spec)
    if spec is None:
        raise RunError("a spec is needed to start a run")
    rundir.start(out, overwrite)
    return spec, None


def _resumable(out: Path, spec: Spec | None) -> tuple[Spec, Checkpoint | None]:
    """The stored spec and last checkpoint of an unfinished run (``spec``, if given, must match).

    A run killed before its first epoch ended has no checkpoint: it starts again from scratch.
    """
    if (out / RUN_FILE).is_file():
        raise RunError(f"{out} is a finished run: there is nothing to resume")
    if not (out / SPEC_FILE).is_file():
        raise RunError(f"{out} is not a medtransfer run directory (no {SPEC_FILE})")
    stored = load_spec(out / SPEC_FILE)
    if spec is not None and dump_spec(spec) != dump_spec(stored):
        raise RunError(
            f"the spec given differs from the one {out} was started with; resume without a "
            f"spec (it is read from {out / SPEC_FILE}) or start a new run"
        )
    if not (out / CHECKPOINT_FILE).is_file():
        rundir.start(out, overwrite=True)
        return stored, None
    return stored, load_checkpoint(out)


def _training_state(
    out: Path, manifest: pd.DataFrame, checkpoint: Checkpoint | None
) -> TrainingState:
    """The checkpoint's state, or a fresh one; a resumed run must see the data it started on,
    or its remaining epochs would train on other images than the first ones did."""
    data_fingerprint = fingerprint(manifest)
    state = checkpoint.state if checkpoint else TrainingState(data_fingerprint=data_fingerprint)
    if state.data_fingerprint != data_fingerprint:
        raise RunError(f"the data behind {out} changed since the run started; it cannot resume")
    return state


class _Splits(NamedTuple):
    """The arrays a run trains on and picks its best epoch by."""

    train: tuple[Inputs, np.ndarray]
    val: tuple[Inputs, np.ndarray]
    target: np.ndarray | None  # unlabelled target-site images, for domain adaptation
    profile: dict[str, Any]  # what the training images were (medtransfer.data.profile)


def _load_splits(spec: Spec, manifest: pd.DataFrame, workers: int | None) -> _Splits:
    """Domain adaptation: labels train from the source sites only; target images come
    unlabelled (``medtransfer.training.domain`` says which rows play which part)."""
    domain.check_sites(spec, manifest)
    labelled = domain.labelled_rows(spec, manifest)
    with DecodePool(workers) as pool:  # one pool's start-up for every split
        train_xy = load_split(spec, labelled, "train", workers=pool)
        val_xy = load_split(spec, domain.validation_rows(spec, manifest), "val", workers=pool)
        target = domain.load_target_images(spec, manifest, workers=pool)
    train_paths = labelled.loc[labelled["split"] == "train", "path"].tolist()
    images = train_xy[0]["image"] if isinstance(train_xy[0], dict) else train_xy[0]
    profile = training_profile(train_paths, images, seed=spec.training.seed)
    return _Splits(train_xy, val_xy, target, profile)


def _run_info(
    spec: Spec,
    state: TrainingState,
    phases: list[Phase],
    manifest: pd.DataFrame,
    adaptation: dict[str, Any],
) -> RunInfo:
    """What ``run.json`` says about the model and its training (the data behind it included)."""
    val_auc = state.val_auc
    best = int(np.nanargmax(val_auc))
    return RunInfo(
        **model_record(spec),
        phases=[
            {
                "name": phase.name,
                "epochs": phase.epochs,  # planned; early stopping can end a phase sooner
                "learning_rate": phase.learning_rate,
                "first_epoch": start + 1,  # 1-based, as in history.csv and on the console
                "epochs_run": end - start,
            }
            for phase, start, end in zip(
                phases, state.phase_starts, [*state.phase_starts[1:], len(val_auc)], strict=True
            )
        ],
        epochs_run=len(val_auc),
        best_epoch=best + 1,
        best_val_auroc=float(val_auc[best]),
        images={str(k): int(v) for k, v in manifest["split"].value_counts().items()},
        tabular=[feature.model_dump(mode="json") for feature in spec.tabular],
        tabular_summary=tabular_summary(manifest[manifest["split"] == "train"], spec.tabular),
        domain_adaptation=adaptation,
        data_fingerprint=state.data_fingerprint,
    )


def model_record(spec: Spec) -> dict[str, Any]:
    """The ``RunInfo`` fields every run takes from its spec: what the model answers, how
    images reach it, its backbone and starting weights, and the seed."""
    return {
        "name": spec.name,
        "task": spec.task,
        "classes": list(spec.classes),
        "positive_class": spec.positive if spec.task == "binary" else None,
        "image": ImagePolicy.from_json(spec.image.model_dump(mode="json")),
        "modality": spec.modality,
        "backbone": spec.model.backbone,
        "weights": "file" if Path(spec.model.weights).is_absolute() else spec.model.weights,
        "seed": spec.training.seed,
    }


def _check_kept_model(run: Run, spec: Spec, splits: _Splits) -> dict | None:
    """Load the model the run keeps (``model.keras``: the best epoch, after AdaBN) once, to
    record its OOD reference (``ood_reference.npz``, with the validation probabilities) and to
    tell whether it gives the validation images (almost) the same prediction: the degenerate
    model ``medtransfer.models.degenerate`` describes, which training alone would not reveal."""
    model = load_run_model(run)
    batch_size = spec.training.batch_size
    reference = ood.reference(
        model,
        splits.train[0],
        splits.val[0],
        backbone=spec.model.backbone,
        batch_size=batch_size,
        seed=spec.training.seed,
    )
    p_val = model.predict(make_dataset(*splits.val, batch_size=batch_size), verbose=0)
    # the validation probabilities: what a drift monitor compares predicted prevalence with
    reference["validation_probabilities"] = p_val.astype(np.float32)
    with atomic.replace_on_success(run.path / OOD_FILE, "wb") as handle:
        np.savez(handle, **reference)
    info = run.info
    return degenerate_model({"val": p_val}, info.classes, info.task, info.positive_class)


@contextmanager
def undone_if_failed_before_a_checkpoint(out: Path) -> Iterator[None]:
    """Remove what a train created when it raises before its first checkpoint was written, so
    that the same command can be run again instead of finding "not empty" in its way.

    Only what this train created goes: the folder (and any parents) it made, or the new entries
    of a folder that existed (empty, or with content under ``overwrite``, or a run being
    resumed). Once ``checkpoint.npz`` exists the run stays, for ``resume``. A
    KeyboardInterrupt keeps everything too: the CLI then offers ``--resume``.
    """
    created = _outermost_missing(out)
    before = {e.name for e in out.iterdir()} if created is None and out.is_dir() else set()
    try:
        yield
    except Exception:
        if not (out / CHECKPOINT_FILE).is_file():
            _remove_created(out, created, before)
        raise


def _outermost_missing(path: Path) -> Path | None:
    """The outermost folder on the way to ``path`` that does not exist yet, if any."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            break
        missing = folder
    return missing


def _remove_created(out: Path, created: Path | None, before: set[str]) -> None:
    """Best effort: a cleanup that fails must not hide the error that caused it."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for entry in out.iterdir() if out.is_dir() else ():
        if entry.name in before:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def _fit_phases(
    spec: Spec,
    out: Path,
    state: TrainingState,
    checkpoint: Checkpoint | None,
    splits: _Splits,
    callbacks: Sequence[keras.callbacks.Callback],
    plan: ExecutionPlan,
) -> tuple[list[Phase], dict[str, Any]]:
    """Build the model and run the phases still to run, one ``model.fit`` each; the phases,
    and what trained in each (``fine_tune`` in run.json).

    ``model.keras`` is always the classifier ``build_model`` makes; with feature alignment,
    ``fit`` trains a ``DomainAdaptationModel`` around it (``medtransfer.training.domain``).
    """
    fit = _prepare_fit(spec, out, state, splits)
    phases = plan_phases(spec)
    for index, phase in enumerate(phases):
        if index < state.phase or (index == state.phase and state.phase_finished):
            continue  # done before the restart
        if index > state.phase:
            state.phase, state.phase_epochs, state.early_stopping = index, 0, {}
        _compile_phase(fit, phase, index, plan)
        if checkpoint is not None:  # the first phase after a restart
            checkpoint.restore(fit.model, optimizer=state.phase_epochs > 0)
            checkpoint = None
        if not fit.model.optimizer.built:  # built inside fit, the train step would be traced twice
            fit.model.optimizer.build(fit.model.trainable_variables)
        _fit_phase(fit, state, splits, phase, index, callbacks)
        state.phase_finished = True
    return phases, fit.tuning


@dataclass(frozen=True)
class _Fit:
    """What every phase's ``model.fit`` shares, made once before the first phase: the phases
    train one model on, and the best-model checkpoint keeps its best value from phase to phase."""

    spec: Spec
    out: Path
    model: keras.Model  # the classifier, or the DomainAdaptationModel around it
    steps: int  # per epoch
    early_stopping: keras.callbacks.EarlyStopping | None
    standing: list[keras.callbacks.Callback]  # before each phase's checkpoint and the caller's
    val_data: tf.data.Dataset
    augment: Augmenter | None
    class_weight: dict[int, float] | None
    tuning: dict[str, Any] = field(default_factory=dict)  # run.json fine_tune: per phase


def _prepare_fit(spec: Spec, out: Path, state: TrainingState, splits: _Splits) -> _Fit:
    train_x, train_y = splits.train
    steps = -(-input_count(train_x) // spec.training.batch_size)
    classifier = build_model(spec, numeric_statistics(train_x, spec.tabular))
    # a DomainAdaptationModel or an AdversarialTrainingModel around it (the spec allows one)
    model = adversarial.training_model(domain.training_model(classifier, spec), spec)
    synchronize_batchnorm(model, tf.distribute.get_strategy())
    early_stopping = _early_stopping(spec)
    return _Fit(
        spec=spec,
        out=out,
        model=model,
        steps=steps,
        early_stopping=early_stopping,
        standing=_standing_callbacks(spec, out, state, classifier, model, early_stopping, steps),
        val_data=sharded(make_dataset(*splits.val, batch_size=spec.training.batch_size)),
        augment=make_augmenter(spec),
        class_weight=(
            balanced_class_weights(train_y) if spec.training.class_weight == "balanced" else None
        ),
    )


def _early_stopping(spec: Spec) -> keras.callbacks.EarlyStopping | None:
    """Stops on validation AUROC, the measure the best epoch is kept by (patience 0: never)."""
    patience = spec.training.early_stopping_patience
    if not patience:
        return None
    return keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=patience)


def _standing_callbacks(
    spec: Spec,
    out: Path,
    state: TrainingState,
    classifier: keras.Model,
    model: keras.Model,
    early_stopping: keras.callbacks.EarlyStopping | None,
    steps: int,
) -> list[keras.callbacks.Callback]:
    """The callbacks of every phase. The best-model checkpoint starts from the best validation
    AUROC so far, so a resumed run does not replace a better model with a worse one."""
    return [
        domain.BestClassifierCheckpoint(
            classifier,
            out / MODEL_FILE,
            monitor="val_auc",
            mode="max",
            save_best_only=True,
            initial_value_threshold=max(state.val_auc, default=None),
        ),
        HistoryLogger(out / HISTORY_FILE, append=True),  # one file across phases
        keras.callbacks.TensorBoard(out / LOGS_DIR),
        *([early_stopping] if early_stopping else []),
        *domain.training_callbacks(model, spec, steps),
    ]


def _compile_phase(fit: _Fit, phase: Phase, index: int, plan: ExecutionPlan) -> None:
    """Each phase compiles afresh: its own trainable layers, learning rate and schedule (the
    warmup belongs to the first phase only)."""
    phase.apply(fit.model, fit.spec)
    _apply_fine_tune_method(fit, phase)
    compile_model(
        fit.model,
        fit.spec,
        fit.steps,
        learning_rate=phase.learning_rate,
        epochs=phase.epochs,
        warmup_epochs=min(fit.spec.training.warmup_epochs, phase.epochs - 1) if index == 0 else 0,
        jit_compile=plan.jit_compile,
    )


def _apply_fine_tune_method(fit: _Fit, phase: Phase) -> None:
    """``fine_tune.method`` lora or norm decides what trains in the fine-tuning phase (after
    ``phase.apply``: setting ``trainable`` resets Keras's per-variable flags); every phase's
    trainable share is printed and kept for run.json."""
    tune = fit.spec.training.fine_tune
    if phase.name == "fine_tune":
        train_batchnorm = tune.trains_batchnorm(fit.spec.model.weights)
        apply_method(find_backbone(fit.model), tune.method, train_batchnorm=train_batchnorm)
    share = trainable_share(fit.model)
    fit.tuning["method"] = tune.method
    if tune.method == "lora":
        fit.tuning["lora_rank"] = tune.rank
    fit.tuning.setdefault("phases", {})[phase.name] = share
    print(
        f"phase {phase.name}: {share['trainable_params']:,} of {share['total_params']:,} "
        f"parameters trainable ({share['trainable_share']:.2%})",
        flush=True,
    )


def _fit_phase(
    fit: _Fit,
    state: TrainingState,
    splits: _Splits,
    phase: Phase,
    index: int,
    callbacks: Sequence[keras.callbacks.Callback],
) -> None:
    """The phase's remaining epochs in one ``model.fit``, a checkpoint after each."""
    first, last = state.epochs, state.epochs + phase.epochs - state.phase_epochs
    if len(state.phase_starts) == index:  # this phase starts now (not resumed mid-way)
        state.phase_starts.append(first)
    saver = EpochCheckpoint(fit.out, state, phase.epochs, fit.early_stopping)
    train_x, train_y = splits.train
    train_data, class_weight = domain.training_dataset(
        fit.spec,
        train_x,
        train_y,
        splits.target,
        epochs=range(first, last),
        steps_per_epoch=fit.steps,
        augment=fit.augment,
        class_weight=fit.class_weight,
    )
    try:
        fit.model.fit(
            sharded(train_data),
            validation_data=fit.val_data,
            initial_epoch=first,
            epochs=last,
            steps_per_epoch=fit.steps,
            shuffle=False,  # the dataset orders itself, keyed by (seed, epoch)
            callbacks=[*fit.standing, saver, *callbacks],
            class_weight=class_weight,
            verbose=fit_verbosity(),
        )
    finally:
        saver.close()


def fit_verbosity(stream: Any = None) -> int:
    """Keras ``verbose`` for ``fit``: 1 (a progress bar within each epoch) when ``stream``
    (default ``sys.stdout``) is a terminal, 2 (one line per epoch) in logs, CI and notebooks."""
    stream = sys.stdout if stream is None else stream
    try:
        return 1 if stream.isatty() else 2
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return 2


class HistoryLogger(keras.callbacks.CSVLogger):
    """``history.csv`` with epochs counted from 1, as the console and ``run.json`` count them
    (Keras's CSVLogger writes its 0-based epoch index)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch + 1, logs)


def _truncate_history(path: Path, epochs: int) -> None:
    """Drop history rows of an epoch that ran after the last checkpoint (it will run again).

    A run started by a version that counted history.csv's epochs from 0 is renumbered from 1,
    so the rows the resumed run appends continue its numbering.
    """
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)[: 1 + epochs]
        if len(lines) > 1 and lines[0].startswith("epoch,") and lines[1].startswith("0,"):
            lines[1:] = [_renumbered(line) for line in lines[1:]]
        atomic.write_text(path, "".join(lines))


def _renumbered(line: str) -> str:
    epoch, sep, rest = line.partition(",")
    return f"{int(epoch) + 1}{sep}{rest}" if epoch.isdigit() else line


def manifest_for_run(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest as stored in a run: hashed patient keys, no per-class target columns."""
    return manifest[["path", "split", "patient", "site", "label"]]
