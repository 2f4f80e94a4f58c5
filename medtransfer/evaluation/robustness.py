"""How a model holds up under attack and under acquisition corruptions, on one split.

``assess_robustness`` predicts the split clean, under FGSM and PGD at each epsilon
(``medtransfer.models.attacks``, through the whole Keras model and its in-graph preprocessing,
against the true labels with the spec's training loss) and under each corruption at each
severity (``medtransfer.evaluation.corruptions``). Every condition gets the report's figures:
AUROC with DeLong and stratified bootstrap intervals (``clinical.discrimination``) and accuracy
with a Wilson interval. Images are attacked and corrupted batch by batch and only the
probabilities are kept, so memory stays that of one batch whatever the split's size.

Attacks need the Keras model of a run directory (gradients, the loss). An export is a serving
graph: it gets the corruptions only, and the result says why the attacks are missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from medtransfer.data.manifest import targets
from medtransfer.data.pipeline import load_images
from medtransfer.errors import SpecError
from medtransfer.evaluation.assessment import provenance, split_rows
from medtransfer.evaluation.clinical import ClinicalSettings, discrimination
from medtransfer.evaluation.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from medtransfer.evaluation.metrics import compute_metrics
from medtransfer.evaluation.stats import wilson_interval
from medtransfer.models.attacks import Attack, search
from medtransfer.models.build import make_loss
from medtransfer.predictor import KerasPredictor, ModelInfo, Predictor, load_predictor
from medtransfer.spec import Spec, reported_classes

DEFAULT_EPSILONS = (1 / 255, 2 / 255, 4 / 255)
_CORRUPTION_STREAM = 0x0C0FFE  # separates corruption draws from the attacks' random starts


@dataclass(frozen=True)
class RobustnessSettings:
    """What ``assess_robustness`` runs; recorded in robustness.json.

    PGD takes ``pgd_steps`` steps of ``pgd_step_size`` (None: 2.5 * epsilon / steps) from a
    random start (``random_start``), drawn from ``seed``; the corruptions draw from ``seed``
    too. ``batch_size`` images are attacked or corrupted at a time."""

    epsilons: tuple[float, ...] = DEFAULT_EPSILONS
    methods: tuple[str, ...] = ("fgsm", "pgd")
    pgd_steps: int = 10
    pgd_step_size: float | None = None
    random_start: bool = True
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severities: tuple[int, ...] = SEVERITIES
    seed: int = 0
    batch_size: int = 32
    clinical: ClinicalSettings = field(default_factory=ClinicalSettings)

    def attacks(self) -> list[Attack]:
        return [
            Attack(method, epsilon, self.pgd_steps, self.pgd_step_size, self.random_start)
            for method in self.methods
            for epsilon in self.epsilons
        ]

    def to_json(self) -> dict:
        return {
            "epsilons": list(self.epsilons),
            "epsilons_in_255ths": [round(255 * e, 3) for e in self.epsilons],
            "methods": list(self.methods),
            "corruptions": list(self.corruptions),
            "severities": list(self.severities),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "bootstrap_resamples": self.clinical.bootstrap_resamples,
            "ci_seed": self.clinical.seed,
            "level": self.clinical.level,
        }


@dataclass(frozen=True)
class Robustness:
    """What ``assess_robustness`` found: robustness.json's record and robustness.csv's rows."""

    model_dir: Path
    metrics: dict
    table: pd.DataFrame


def assess_robustness(
    model_dir: str | Path,
    spec: Spec,
    *,
    split: str = "test",
    workers: int | None = None,
    settings: RobustnessSettings | None = None,
) -> Robustness:
    """Clean, adversarial and corrupted figures of one split, computed, nothing written."""
    settings = settings or RobustnessSettings()
    source = Path(model_dir)
    predictor = load_predictor(source, batch_size=settings.batch_size)
    info = predictor.info
    if list(spec.classes) != info.class_names:
        raise SpecError(
            f"{spec.origin}: classes: {spec.classes} differ from the model's {info.class_names}"
        )
    if info.tabular:
        raise SpecError(f"{source}: robustness covers image-only models, not tabular features")
    rows = split_rows(spec, source, split)
    if rows.empty:
        raise SpecError(f"{spec.origin}: the {split} split has no images")
    images = load_images(
        rows, info.image_size, info.channels, window=info.window, frames=info.frames,
        workers=workers,
    )  # fmt: skip
    y = targets(rows, spec.classes)
    conditions = [_condition("clean", "none", 0.0, predictor.predict_batch(images))]
    metrics: dict = {"split": split, "provenance": provenance(source, info, split, rows)}
    metrics["settings"] = settings.to_json()
    if isinstance(predictor, KerasPredictor):
        loss = make_loss(spec)
        metrics["attack_loss"] = keras.saving.serialize_keras_object(loss)["class_name"]
        metrics["attacks"] = [a.to_json() for a in settings.attacks()]
        conditions += _attacked(predictor.model, loss, images, y, settings)
    else:
        metrics["attacks_skipped"] = (
            "an export is a serving graph without the training loss or input gradients: "
            "attacks need the run directory's Keras model (pass the run directory)"
        )
    conditions += _corrupted(predictor, images, settings)
    for entry in conditions:
        entry |= _intervals(y, entry.pop("_p"), info, settings.clinical)
    metrics["conditions"] = conditions
    metrics["summary"] = summary(conditions)
    return Robustness(source, metrics, _table(conditions))


def _condition(kind: str, name: str, level: float, probabilities: np.ndarray) -> dict:
    """One condition's entry (its figures replace the probabilities once all are predicted)."""
    return {"kind": kind, "name": name, "level": level, "_p": probabilities}


def _intervals(y: np.ndarray, p: np.ndarray, info: ModelInfo, clinical: ClinicalSettings) -> dict:
    """AUROC (macro, and per reported class with DeLong and bootstrap intervals) and accuracy
    with its Wilson interval (binary and multiclass: argmax right or wrong, a proportion)."""
    classes, task, positive = info.class_names, info.task, info.positive_class
    basic = compute_metrics(y, p, classes, task, positive)
    out = {
        "auroc": basic["auroc"]["macro"],
        "accuracy": basic["accuracy"],
        "accuracy_ci": None,
        "discrimination": discrimination(y, p, classes, task, positive, clinical),
    }
    if task != "multilabel":
        right = int(np.sum(np.argmax(p, 1) == np.argmax(y, 1)))
        out["accuracy_ci"] = wilson_interval(right, len(y), clinical.level)
    headline = reported_classes(classes, task, positive)[0]
    out["headline_class"] = headline
    return out


def _batches(count: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, count)) for i in range(0, count, size)]


def _attacked(
    model: keras.Model,
    loss: Callable,
    images: np.ndarray,
    y: np.ndarray,
    settings: RobustnessSettings,
) -> list[dict]:
    """Probabilities under each attack, batch by batch; one traced graph serves them all
    (settings enter as tensors), the random starts drawn from (seed, batch)."""

    @tf.function(reduce_retracing=True)
    def attack_and_predict(x, labels, epsilon, step, steps, random_start, seed):
        adversarial = search(
            model, loss, x, labels, epsilon=epsilon, step=step, steps=steps,
            random_start=random_start, seed=seed,
        )  # fmt: skip
        return model(adversarial, training=False)

    out = []
    for attack in settings.attacks():
        parts = []
        for index, rows in enumerate(_batches(len(images), settings.batch_size)):
            probabilities = attack_and_predict(
                tf.constant(images[rows]),
                tf.constant(y[rows], tf.float32),
                tf.constant(attack.epsilon, tf.float32),
                tf.constant(attack.step, tf.float32),
                tf.constant(attack.attack_steps),
                tf.constant(attack.starts_at_random),
                tf.constant([settings.seed, index]),
            )
            parts.append(probabilities.numpy())
        probabilities = np.concatenate(parts)
        out.append(_condition(attack.method, attack.method, attack.epsilon, probabilities))
    return out


def _corrupted(
    predictor: Predictor, images: np.ndarray, settings: RobustnessSettings
) -> list[dict]:
    """Probabilities under each corruption and severity, batch by batch, each batch's random
    draws from (seed, corruption, severity, batch)."""
    out = []
    for number, name in enumerate(settings.corruptions):
        for severity in settings.severities:
            parts = []
            for index, rows in enumerate(_batches(len(images), settings.batch_size)):
                seed = [settings.seed, _CORRUPTION_STREAM]
                for key in (number, severity, index):
                    seed = tf.random.experimental.stateless_fold_in(seed, key)
                parts.append(predictor.predict_batch(corrupt(images[rows], name, severity, seed)))
            out.append(_condition("corruption", name, severity, np.concatenate(parts)))
    return out


def summary(conditions: Sequence[dict]) -> dict:
    """The headline numbers: clean AUROC, AUROC under each attack and epsilon, and the
    mean-corruption AUROC (over every corruption and severity run), with each corruption's
    mean over its severities."""
    clean = next(c for c in conditions if c["kind"] == "clean")
    attacked = {}
    for c in conditions:
        if c["kind"] in ("fgsm", "pgd"):
            attacked.setdefault(c["kind"], {})[f"{255 * c['level']:g}/255"] = c["auroc"]
    corrupted = [c for c in conditions if c["kind"] == "corruption" and c["auroc"] is not None]
    per_corruption = {}
    for c in corrupted:
        per_corruption.setdefault(c["name"], []).append(c["auroc"])
    return {
        "clean_auroc": clean["auroc"],
        "clean_accuracy": clean["accuracy"],
        "adversarial_auroc": attacked,
        "mean_corruption_auroc": (
            float(np.mean([c["auroc"] for c in corrupted])) if corrupted else None
        ),
        "corruption_auroc": {k: float(np.mean(v)) for k, v in per_corruption.items()},
    }


def _table(conditions: Sequence[dict]) -> pd.DataFrame:
    """robustness.csv: one row per condition, the headline class's intervals beside AUROC."""
    rows = []
    for c in conditions:
        d = c["discrimination"].get(c["headline_class"], {})
        delong, boot = d.get("auroc_ci_delong"), d.get("auroc_ci_bootstrap")
        acc = c["accuracy_ci"]
        rows.append(
            {
                "kind": c["kind"],
                "name": c["name"],
                "level": c["level"],
                "epsilon_255": round(255 * c["level"], 3) if c["kind"] in ("fgsm", "pgd") else None,
                "auroc": c["auroc"],
                "auroc_ci_delong_low": delong[0] if delong else None,
                "auroc_ci_delong_high": delong[1] if delong else None,
                "auroc_ci_bootstrap_low": boot[0] if boot else None,
                "auroc_ci_bootstrap_high": boot[1] if boot else None,
                "accuracy": c["accuracy"],
                "accuracy_ci_low": acc[0] if acc else None,
                "accuracy_ci_high": acc[1] if acc else None,
            }
        )
    return pd.DataFrame(rows)
