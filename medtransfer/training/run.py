"""Training runs: a spec in, a self-describing run directory out.

A run directory holds everything needed to evaluate, export or reproduce the model without the
original command line: the resolved spec, the seed, package versions, a fingerprint of the data,
the PHI-free manifest with its splits, the training history and the best model.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from medtransfer import atomic
from medtransfer.data.manifest import build_manifest, fingerprint, targets
from medtransfer.data.pipeline import load_images, make_dataset
from medtransfer.errors import RunError
from medtransfer.models.build import balanced_class_weights, build_model, compile_model
from medtransfer.spec import Spec, dump_spec, load_spec
from medtransfer.training.schedule import plan_phases

MODEL_FILE = "model.keras"
RUN_FILE = "run.json"
SPEC_FILE = "spec.yaml"
MANIFEST_FILE = "manifest.csv"
HISTORY_FILE = "history.csv"
LOGS_DIR = "logs"
EVALUATION_DIR = "evaluation"
_VERSIONED = ("medtransfer", "tensorflow", "keras", "numpy", "pydicom", "pandas", "scikit-learn")


@dataclass(frozen=True)
class Run:
    """A finished run directory, as evaluate/export/score read it."""

    path: Path
    info: dict[str, Any]

    @property
    def spec(self) -> Spec:
        return load_spec(self.path / SPEC_FILE)

    @property
    def class_names(self) -> list[str]:
        return list(self.info["classes"])

    def load_model(self) -> keras.Model:
        import medtransfer.models.layers  # noqa: F401  (registers the custom layers)

        return keras.saving.load_model(self.path / MODEL_FILE, safe_mode=True)


def open_run(path: str | Path) -> Run:
    run_dir = Path(path)
    info_file = run_dir / RUN_FILE
    if not info_file.is_file() or not (run_dir / MODEL_FILE).is_file():
        raise RunError(f"{run_dir} is not a finished medtransfer run (no {RUN_FILE}/{MODEL_FILE})")
    return Run(run_dir, json.loads(info_file.read_text()))


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _prepare_run_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunError(f"{out} already exists and is not empty (pass overwrite=True / --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    for stale in (RUN_FILE, MODEL_FILE, HISTORY_FILE):
        (out / stale).unlink(missing_ok=True)


def train(
    spec: Spec, out_dir: str | Path, *, overwrite: bool = False, workers: int | None = None
) -> Run:
    """Train the spec's model with ``model.fit`` and write a run directory.

    The best epoch by validation AUROC is kept (``model.keras``); ``run.json`` is written last,
    so a run directory with a ``run.json`` is a finished one.
    """
    out = Path(out_dir)
    _prepare_run_dir(out, overwrite)
    started = time.time()
    keras.utils.set_random_seed(spec.training.seed)
    manifest = build_manifest(spec)

    def split_data(name: str) -> tuple[np.ndarray, np.ndarray]:
        rows = manifest[manifest["split"] == name]
        images = load_images(
            rows,
            spec.image.size,
            spec.image.channels,
            window=spec.image.window_policy,
            frames=spec.image.frames,
            workers=workers,
        )
        return images, targets(rows, spec.classes)

    train_x, train_y = split_data("train")
    val_x, val_y = split_data("val")
    atomic.write_text(out / SPEC_FILE, dump_spec(spec))
    atomic.write_text(out / MANIFEST_FILE, manifest_for_run(manifest).to_csv(index=False))

    batch = spec.training.batch_size
    steps = -(-len(train_x) // batch)
    model = build_model(spec)
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.ModelCheckpoint(
            out / MODEL_FILE, monitor="val_auc", mode="max", save_best_only=True
        ),
        keras.callbacks.CSVLogger(out / HISTORY_FILE, append=True),  # one file across phases
        keras.callbacks.TensorBoard(out / LOGS_DIR),
    ]
    if spec.training.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_auc", mode="max", patience=spec.training.early_stopping_patience
            )
        )
    train_data = make_dataset(
        train_x, train_y, batch_size=batch, shuffle=True, seed=spec.training.seed
    )
    val_data = make_dataset(val_x, val_y, batch_size=batch)
    val_auc: list[float] = []
    phases = plan_phases(spec)
    class_weight = (
        balanced_class_weights(train_y) if spec.training.class_weight == "balanced" else None
    )
    for index, phase in enumerate(phases):
        phase.apply(model, spec)
        compile_model(
            model,
            spec,
            steps,
            learning_rate=phase.learning_rate,
            epochs=phase.epochs,
            warmup_epochs=min(spec.training.warmup_epochs, phase.epochs - 1) if index == 0 else 0,
        )
        history = model.fit(
            train_data,
            validation_data=val_data,
            initial_epoch=len(val_auc),
            epochs=len(val_auc) + phase.epochs,
            shuffle=False,  # the dataset shuffles itself, seeded
            callbacks=callbacks,
            class_weight=class_weight,
            verbose=2,
        )
        val_auc += history.history["val_auc"]
    best = int(np.nanargmax(val_auc))
    info = {
        "name": spec.name,
        "task": spec.task,
        "classes": list(spec.classes),
        "positive_class": spec.positive if spec.task == "binary" else None,
        "image": spec.image.model_dump(mode="json"),
        "backbone": spec.model.backbone,
        "weights": "file" if Path(spec.model.weights).is_absolute() else spec.model.weights,
        "seed": spec.training.seed,
        "phases": [
            {"name": p.name, "epochs": p.epochs, "learning_rate": p.learning_rate} for p in phases
        ],
        "epochs_run": len(val_auc),
        "best_epoch": best + 1,
        "best_val_auroc": float(val_auc[best]),
        "images": manifest["split"].value_counts().to_dict(),
        "data_fingerprint": fingerprint(manifest),
        "train_seconds": round(time.time() - started, 1),
        "versions": package_versions(),
    }
    atomic.write_text(out / RUN_FILE, json.dumps(info, indent=2))
    return Run(out, info)


def manifest_for_run(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest as stored in a run: hashed patient keys, no per-class target columns."""
    return manifest[["path", "split", "patient", "site", "label"]]
