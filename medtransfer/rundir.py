"""The run directory: the one module that knows what a training run leaves behind.

Training writes a run through this module; ``run:`` weight sources (models), evaluation,
export, scoring and the predictor read it through this module. It knows file names and the
record in ``run.json`` (:class:`RunInfo`), not how models are built or loaded, so every layer
may use it. A run directory is self-contained: it opens wherever it is copied, without the
training data (nothing here re-validates the stored spec against the data it names).
"""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from medtransfer import atomic
from medtransfer.errors import RunError

MODEL_FILE = "model.keras"
RUN_FILE = "run.json"  # written last: a directory with it is a finished run
SPEC_FILE = "spec.yaml"
MANIFEST_FILE = "manifest.csv"
HISTORY_FILE = "history.csv"
CHECKPOINT_FILE = "checkpoint.npz"
SOURCE_MODEL_FILE = "model_source.keras"  # feature alignment: the classifier before AdaBN
LOGS_DIR = "logs"
EVALUATION_DIR = "evaluation"
THRESHOLDS_FILE = "thresholds.json"
PROFILE_FILE = "profile.json"  # what the training images were (medtransfer.data.profile)
OOD_FILE = "ood_reference.npz"  # stage taps, means, precisions; validation OOD scores, probs
SEEDS_FILE = "seeds.json"  # a seeds folder: one run per seed, seed_<N>/
UNLABELED_FILE = "unlabeled.json"  # a pretrain run: the unlabelled sources it reads
RUN_WEIGHTS = "run:"  # model.weights "run:DIR": start from the backbone run DIR trained
_VERSIONED = ("medtransfer", "tensorflow", "keras", "numpy", "pydicom", "pandas", "scikit-learn")


def thresholds_file_name(tta: bool) -> str:
    """Where a run keeps the thresholds of its plain or its test-time-augmented model."""
    return "thresholds_tta.json" if tta else THRESHOLDS_FILE


def metrics_file_name(split: str, tta: bool) -> str:
    """Where a run keeps the metrics of an evaluation of ``split``."""
    return f"metrics_{split}{'_tta' if tta else ''}.json"


def package_versions() -> dict[str, str]:
    """The versions a run records, so a result can be reproduced with the same stack."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass(frozen=True)
class ImagePolicy:
    """How images reach the model: its input size and channels, the window and frame rule."""

    size: tuple[int, int]
    channels: int
    window: str | dict[str, float] | list[str | dict[str, float]]
    frames: str

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ImagePolicy:
        return cls(
            size=(int(record["size"][0]), int(record["size"][1])),
            channels=int(record["channels"]),
            window=record.get("window", "dicom"),
            frames=record.get("frames", "first"),
        )

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "size": list(self.size)}


@dataclass(frozen=True)
class RunInfo:
    """``run.json``: what the model answers, what it was trained on, and how training went.

    Fields a run of an earlier version did not record take their defaults; keys a later
    version adds are kept in ``extra`` and written back unchanged.
    """

    name: str
    task: str
    classes: list[str]
    positive_class: str | None
    image: ImagePolicy
    backbone: str
    weights: str
    modality: str = "other"
    # "train": a classifier; "pretrain": a self-supervised encoder (model.keras maps images to
    # features, not probabilities), whose use is as a run: weight source. Older runs: "train".
    kind: str = "train"
    seed: int | list[int | None] | None = None
    data_fingerprint: str | None = None
    images: dict[str, int] = field(default_factory=dict)  # per split
    tabular: list[dict[str, Any]] = field(default_factory=list)  # the spec's feature records
    tabular_summary: dict[str, dict] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)
    epochs_run: int | None = None
    best_epoch: int | None = None  # 1-based; None for an ensemble
    best_val_auroc: float | None = None
    domain_adaptation: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    ensemble: dict[str, Any] | None = None
    # fine_tune.method and, per phase, trainable / total parameters (models.peft)
    fine_tune: dict[str, Any] | None = None
    pretraining: dict[str, Any] | None = None  # a pretrain run: objective, images, loss curve
    degenerate_model: dict[str, Any] | None = None
    train_seconds: float | None = None
    cpu_seconds: float | None = None  # the training process's CPU time, all threads
    resumed: bool = False
    execution: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RunInfo:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "image"}
        known = {key: value for key, value in record.items() if key in names}
        extra = {key: value for key, value in record.items() if key not in names | {"image"}}
        return cls(image=ImagePolicy.from_json(record["image"]), extra=extra, **known)

    def to_json(self) -> dict[str, Any]:
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        extra = record.pop("extra")
        return {**record, "image": self.image.to_json(), **extra}

    def replace(self, **changes: Any) -> RunInfo:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Run:
    """A finished run directory, as evaluate/export/score read it."""

    path: Path
    info: RunInfo

    @property
    def class_names(self) -> list[str]:
        return list(self.info.classes)

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def spec_file(self) -> Path:
        return self.path / SPEC_FILE

    def manifest(self) -> pd.DataFrame:
        """The stored manifest (path, split, hashed patient, site, label), as training split it."""
        return pd.read_csv(self.path / MANIFEST_FILE, keep_default_na=False)

    def profile(self) -> dict | None:
        """The training profile (None for a run trained before profiles were recorded)."""
        file = self.path / PROFILE_FILE
        return json.loads(file.read_text()) if file.is_file() else None

    def ood_reference(self) -> dict[str, np.ndarray] | None:
        """The OOD reference (``medtransfer.models.ood``), or None for a run without one."""
        file = self.path / OOD_FILE
        if not file.is_file():
            return None
        with np.load(file, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}

    def kept(self, name: str) -> Path:
        """A file the run keeps from its evaluations (``evaluation/``): metrics, thresholds."""
        return self.path / EVALUATION_DIR / name

    def kept_metrics(self, split: str, tta: bool = False) -> dict | None:
        """The metrics of the run's last evaluation of ``split`` (None if never evaluated)."""
        file = self.kept(metrics_file_name(split, tta))
        return json.loads(file.read_text()) if file.is_file() else None


def is_run(path: str | Path) -> bool:
    """Whether ``path`` is a finished run (training wrote ``run.json`` last)."""
    return (Path(path) / RUN_FILE).is_file() and (Path(path) / MODEL_FILE).is_file()


def open_run(path: str | Path) -> Run:
    """The finished run at ``path``, from any version of medtransfer."""
    run_dir = Path(path)
    if not is_run(run_dir):
        raise RunError(f"{run_dir} is not a finished medtransfer run (no {RUN_FILE}/{MODEL_FILE})")
    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
        if "modality" not in record:  # older runs have it only in spec.yaml
            record["modality"] = _stored_modality(run_dir / SPEC_FILE)
        info = RunInfo.from_json(record)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # truncated or edited
        raise RunError(f"{run_dir / RUN_FILE} is not a run record ({type(exc).__name__})") from None
    return Run(run_dir, info)


def _stored_modality(spec_file: Path) -> str:
    """The modality an older run's spec names, read as plain YAML: the stored spec is not
    validated again (that would require the training data to still exist). Anything but a
    readable regular file (a FIFO would block the read) counts as unrecorded: "other"."""
    if not spec_file.is_file():
        return "other"
    try:
        raw = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "other"
    return str(raw.get("modality", "other")) if isinstance(raw, dict) else "other"


def write_info(run_dir: str | Path, info: RunInfo) -> Run:
    """Write ``run.json`` (atomically; training writes it last) and return the finished run."""
    atomic.write_json(Path(run_dir) / RUN_FILE, info.to_json())
    return Run(Path(run_dir), info)


def start(run_dir: str | Path, overwrite: bool) -> Path:
    """An empty folder to train into (``overwrite`` clears what a previous run left)."""
    out = Path(run_dir)
    if atomic.is_occupied(out) and not overwrite:
        raise RunError(f"{out} already exists and is not empty (pass overwrite=True / --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    for stale in (RUN_FILE, MODEL_FILE, HISTORY_FILE, CHECKPOINT_FILE, SOURCE_MODEL_FILE):
        (out / stale).unlink(missing_ok=True)
    return out


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; 0 for a single value) with the values."""
    values = [atomic.float_or(v) for v in values]  # null (NaN written as JSON) reads as NaN
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"values": values, "mean": float(np.mean(values)), "sd": sd}


def format_spread(stats: dict[str, Any], digits: int = 4) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f} (n={len(stats['values'])})"


@dataclass(frozen=True)
class SeedRuns:
    """A seeds folder: one ordinary run per seed (``seed_<N>``) and ``seeds.json``."""

    path: Path
    runs: list[Run]

    @property
    def info(self) -> dict[str, Any]:
        info = {
            "seeds": [run.info.seed for run in self.runs],
            "runs": [run.path.name for run in self.runs],
            "best_val_auroc": spread([run.info.best_val_auroc for run in self.runs]),
            "train_seconds": spread([run.info.train_seconds for run in self.runs]),
        }
        if all(run.info.cpu_seconds is not None for run in self.runs):  # not in older runs
            info["cpu_seconds"] = spread([run.info.cpu_seconds for run in self.runs])
        return info

    def summary(self) -> str:
        info = self.info
        return (
            f"{len(self.runs)} seeds {info['seeds']} in {self.path}: best validation AUROC "
            f"{format_spread(info['best_val_auroc'])}, "
            f"{info['train_seconds']['mean']:.0f} s per seed"
        )


def seed_run_dir(out_dir: str | Path, seed: int) -> Path:
    return Path(out_dir) / f"seed_{seed}"


def is_seeds_dir(path: str | Path) -> bool:
    """Whether ``path`` is a seeds folder (``train --seeds``), not a single run."""
    return (Path(path) / SEEDS_FILE).is_file()


def open_seed_runs(path: str | Path) -> SeedRuns:
    """The runs of a seeds folder, in the order they were trained."""
    info = json.loads((Path(path) / SEEDS_FILE).read_text())
    return SeedRuns(Path(path), [open_run(Path(path) / name) for name in info["runs"]])
