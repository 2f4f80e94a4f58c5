"""Learning-rate range test (Leslie Smith 2015, as popularised by fastai's ``lr_find``).

Before a real run, train the spec's model for a fixed number of batches while the learning rate
rises exponentially from ``min_lr`` to ``max_lr``, and record the loss of every batch. At rates
that are too low the loss does not move, at good rates it falls, and at rates that are too high
it blows up; the curve shows where training can go fast without diverging, for the cost of ~100
batches instead of a grid of full runs.

The test runs on the spec's own training split, model, loss and optimiser family (AdamW with the
spec's weight decay), in one fine-tuning phase of ``plan_phases``, so its answer applies to that
phase's ``learning_rate``. It builds and trains a throwaway model: nothing in a run directory
changes, but the training split is decoded exactly as ``train`` decodes it, which warms the
decode cache for the run that follows.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from matplotlib.figure import Figure

from medtransfer import atomic
from medtransfer.data.augment import make_augmenter
from medtransfer.data.manifest import build_manifest
from medtransfer.data.pipeline import load_split, make_training_dataset
from medtransfer.data.tabular import numeric_statistics
from medtransfer.errors import MedtransferError
from medtransfer.models.build import balanced_class_weights, build_model, make_loss
from medtransfer.models.inputs import Inputs, input_count
from medtransfer.spec import Spec
from medtransfer.training.domain import labelled_rows
from medtransfer.training.schedule import Phase, plan_phases

CSV_FILE = "lr_find.csv"
JSON_FILE = "lr_find.json"
PNG_FILE = "lr_find.png"
PHASES = ("head", "fine_tune", "full")
SMOOTHING_BETA = 0.98  # fastai's: averages over roughly the last 50 batches
DIVERGENCE_FACTOR = 4.0  # stop once the smoothed loss exceeds 4x its best value (fastai's rule)
SKIP_START = 10  # leading points the suggestion ignores (at most a tenth of the steps)


class LrFindError(MedtransferError, ValueError):
    """A range test that cannot run as asked (bad range, or a phase this spec does not train)."""


@dataclass(frozen=True)
class LrFindResult:
    """One range test: the rate and loss of every batch run, and what they suggest.

    ``learning_rates`` are the rates each batch was trained at; the lists stop early when the loss
    diverged (``stopped_early``). ``suggestion`` is the steepest-descent rate and
    ``min_loss_lr`` the rate at the smoothed loss's minimum (see ``suggest_learning_rate``).
    """

    learning_rates: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    suggestion: float
    min_loss_lr: float
    phase: str
    stopped_early: bool
    min_lr: float
    max_lr: float
    steps: int

    @property
    def min_loss_suggestion(self) -> float:
        """The second heuristic: a tenth of the rate at the loss minimum."""
        return self.min_loss_lr / 10

    def summary(self) -> str:
        """One line for a terminal or log."""
        ran = len(self.learning_rates)
        stop = f", stopped after {ran} of {self.steps} steps (loss diverged)"
        return (
            f"lr-find ({self.phase} phase, {self.min_lr:.1e} to {self.max_lr:.1e} over "
            f"{self.steps} steps{stop if self.stopped_early else ''}): "
            f"suggested learning rate {self.suggestion:.2e} (steepest descent); "
            f"minimum-loss rate / 10 = {self.min_loss_suggestion:.2e}"
        )


def smooth_losses(losses: Sequence[float], beta: float = SMOOTHING_BETA) -> list[float]:
    """Exponential moving average with bias correction, as fastai smooths its range test.

    Batch losses are noisy (each batch holds different images), so the raw curve's slope is mostly
    noise. The plain EMA starts at 0 and so underestimates the first ~1/(1-beta) values;
    dividing by ``1 - beta**(i + 1)`` removes that start-up bias (the first value is then exactly
    the first loss, and a constant curve stays constant). A non-finite loss makes every later
    value non-finite, which is what divergence detection wants.
    """
    average, smoothed = 0.0, []
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * float(loss)
        smoothed.append(average / (1 - beta ** (i + 1)))
    return smoothed


def suggest_learning_rate(
    learning_rates: Sequence[float],
    smoothed_losses: Sequence[float],
    *,
    skip_start: int = SKIP_START,
    half_window: int = 1,
) -> tuple[float, float]:
    """``(suggestion, min_loss_lr)`` from a range test's rates and smoothed losses.

    ``suggestion`` is the rate where the smoothed loss falls fastest per decade of learning rate
    (the most negative gradient against ``log10(lr)``): there the rate is already large enough
    to make quick progress and still well below where training becomes unstable. The gradient
    at point i is the central difference over ``i - half_window .. i + half_window``: even the
    smoothed curve jitters from batch to batch, and a one-step difference picks that jitter
    (``lr_find`` uses a twentieth of the steps each side).

    ``min_loss_lr`` is the rate at the smoothed loss's minimum. The minimum itself is *not* a
    good training rate: it is where the loss stops improving because the rate is already
    too high (the smoothed loss also lags the raw one, so the true turning point lies lower), so
    the common second heuristic is ``min_loss_lr / 10``.

    Only the stretch from ``skip_start`` to the minimum is searched: the first points are an
    average over a handful of batches at rates too small to matter, so their slope is noise, and
    everything after the minimum is the diverging tail, whose drops are not learning. Points
    from the first non-finite loss on are ignored. When fewer than three points would remain after
    ``skip_start``, nothing is skipped. When the loss never falls after ``skip_start`` (the range
    started too high), the suggestion falls back to ``min_loss_lr / 10``.
    """
    rates = np.asarray(learning_rates, dtype=np.float64)
    smooth = np.asarray(smoothed_losses, dtype=np.float64)
    if rates.ndim != 1 or rates.shape != smooth.shape:
        raise LrFindError("learning rates and losses must be two lists of the same length")
    if not (np.all(rates > 0) and np.all(np.diff(rates) > 0)):
        raise LrFindError("learning rates must be positive and strictly increasing")
    if skip_start < 0 or half_window < 1:
        raise LrFindError(
            f"need skip_start >= 0 and half_window >= 1, got {skip_start}, {half_window}"
        )
    bad = np.flatnonzero(~np.isfinite(smooth))
    n = int(bad[0]) if len(bad) else len(smooth)
    if n == 0:
        raise LrFindError(
            "the loss was not finite even at the lowest learning rate: check the data and the "
            "model before choosing a rate"
        )
    start = skip_start if n - skip_start >= 3 else 0
    best = start + int(np.argmin(smooth[start:n]))
    min_loss_lr = float(rates[best])
    if best == start:
        return min_loss_lr / 10, min_loss_lr
    candidates = np.arange(start, best + 1)
    below = np.clip(candidates - half_window, start, n - 1)
    above = np.clip(candidates + half_window, start, n - 1)
    log_rates = np.log10(rates)
    gradient = (smooth[above] - smooth[below]) / (log_rates[above] - log_rates[below])
    return float(rates[candidates[int(np.argmin(gradient))]]), min_loss_lr


class LrRangeTest(keras.callbacks.Callback):
    """Raise the optimiser's learning rate geometrically per batch and record each batch's loss.

    Works with any compiled model whose optimiser has a plain (variable) learning rate, not a
    schedule. Keras reports ``logs["loss"]`` as the running mean since the start of the epoch,
    not the batch's own loss; the metrics are therefore reset before every batch, which makes
    the reported value exactly the batch loss. Training stops (``model.stop_training``) once the
    smoothed loss is not finite or exceeds ``divergence_factor`` times its best value so far.
    """

    def __init__(
        self,
        min_lr: float,
        max_lr: float,
        steps: int,
        *,
        beta: float = SMOOTHING_BETA,
        divergence_factor: float = DIVERGENCE_FACTOR,
    ) -> None:
        super().__init__()
        _check_range(min_lr, max_lr, steps)
        self.schedule = [float(r) for r in np.geomspace(min_lr, max_lr, steps)]
        self.beta, self.divergence_factor = beta, divergence_factor
        self.learning_rates: list[float] = []
        self.losses: list[float] = []
        self.smoothed_losses: list[float] = []
        self.diverged = False
        self._best = math.inf

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        step = len(self.losses)
        if step >= len(self.schedule):  # fit runs longer than the range: this batch is the
            # last one (at max_lr, unrecorded)
            self.model.stop_training = True
            return
        self.model.reset_metrics()  # so that logs["loss"] is this batch's loss alone
        self.model.optimizer.learning_rate.assign(self.schedule[step])

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        step = len(self.losses)
        if step >= len(self.schedule):
            return
        self.learning_rates.append(self.schedule[step])
        self.losses.append(float((logs or {})["loss"]))
        smoothed = smooth_losses(self.losses, self.beta)[-1]  # ~100 points: recomputing is free
        self.smoothed_losses.append(smoothed)
        if not math.isfinite(smoothed) or smoothed > self.divergence_factor * self._best:
            self.diverged = True
            self.model.stop_training = True
        else:
            self._best = min(self._best, smoothed)


def _check_range(min_lr: float, max_lr: float, steps: int) -> None:
    if not (0 < min_lr < max_lr and math.isfinite(max_lr)):
        raise LrFindError(f"need 0 < min_lr < max_lr, got min_lr {min_lr:g}, max_lr {max_lr:g}")
    if steps < 2:
        raise LrFindError(f"steps must be at least 2, got {steps}")


def _select_phase(spec: Spec, name: str | None) -> Phase:
    """The named phase of the spec's plan (default: the first one ``train`` runs)."""
    planned = plan_phases(spec)
    if name is None:
        return planned[0]
    if name not in PHASES:
        raise LrFindError(f"unknown phase {name!r}; choose one of {', '.join(PHASES)}")
    for phase in planned:
        if phase.name == name:
            return phase
    runs = ", ".join(repr(p.name) for p in planned)
    why = (
        "model.weights is 'none', so the backbone trains whole from the start"
        if spec.model.weights.lower() == "none"
        else "with pretrained weights the phases are 'head' then 'fine_tune' "
        "(see training.epochs and training.fine_tune.head_epochs)"
    )
    raise LrFindError(
        f"{spec.origin}: phase {name!r} does not fit this spec: training runs {runs} ({why})"
    )


def lr_find(
    spec: Spec,
    out_dir: str | Path | None = None,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    steps: int = 100,
    phase: str | None = None,
    workers: int | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> LrFindResult:
    """Run a learning-rate range test for ``spec`` and suggest a learning rate.

    ``phase`` is ``head``, ``fine_tune`` or ``full`` and must be one that ``train`` runs for this
    spec (default: its first, i.e. ``head`` with pretrained weights, ``full`` without); the
    suggestion is for that phase's rate (for ``fine_tune``, the spec's ``learning_rate`` times
    ``fine_tune.learning_rate_factor``). A ``fine_tune`` test starts from an untrained head,
    whereas ``train`` reaches that phase after the head epochs, so read its curve with care.

    The model is fitted for exactly ``steps`` batches of ``training.batch_size`` (fewer if the
    loss diverges) of the training pipeline itself (seeded epochs, augmentation included; an
    epoch's last batch may be short): the number of points does not depend on the dataset's
    size, and a small dataset is simply seen again.
    ``callbacks`` are added after the range-test callback. With ``out_dir``, ``lr_find.csv``,
    ``lr_find.json`` and ``lr_find.png`` are written there (atomically).
    """
    _check_range(min_lr, max_lr, steps)
    chosen = _select_phase(spec, phase)
    keras.utils.set_random_seed(spec.training.seed)
    # with domain_adaptation, only the source sites' labels train (the task loss alone is tested)
    labelled = labelled_rows(spec, build_manifest(spec))
    inputs, labels = load_split(spec, labelled, "train", workers=workers)

    model = _range_test_model(spec, chosen, inputs, min_lr)
    dataset = _range_test_dataset(spec, inputs, labels, steps)
    class_weight = (
        balanced_class_weights(labels) if spec.training.class_weight == "balanced" else None
    )
    range_test = LrRangeTest(min_lr, max_lr, steps)
    model.fit(
        dataset,
        epochs=1,
        steps_per_epoch=steps,
        shuffle=False,  # the dataset shuffles itself, seeded
        callbacks=[range_test, *callbacks],
        class_weight=class_weight,
        verbose=0,
    )
    result = _result(range_test, chosen.name, min_lr, max_lr, steps)
    if out_dir is not None:
        write_lr_find(result, out_dir, spec_name=spec.name)
    return result


def _range_test_model(spec: Spec, phase: Phase, inputs: Inputs, min_lr: float) -> keras.Model:
    """The spec's model, set up for ``phase``, with the optimiser family ``train`` uses but a
    plain variable learning rate (``LrRangeTest`` sets it batch by batch, no schedule)."""
    model = build_model(spec, numeric_statistics(inputs, spec.tabular))
    phase.apply(model, spec)
    optimizer = keras.optimizers.AdamW(
        learning_rate=float(min_lr), weight_decay=spec.training.weight_decay
    )
    model.compile(optimizer=optimizer, loss=make_loss(spec))
    return model


def _range_test_dataset(
    spec: Spec, inputs: Inputs, labels: np.ndarray, steps: int
) -> tf.data.Dataset:
    """As training sees it, augmentation included: enough seeded epochs for ``steps`` batches,
    however small the training split."""
    return make_training_dataset(
        inputs,
        labels,
        batch_size=spec.training.batch_size,
        seed=spec.training.seed,
        epochs=range(-(-steps // -(-input_count(inputs) // spec.training.batch_size))),
        augment=make_augmenter(spec),
    )


def _result(
    range_test: LrRangeTest, phase: str, min_lr: float, max_lr: float, steps: int
) -> LrFindResult:
    """The curve and its suggestions. The slope's window and the skipped start scale with
    ``steps``, so they span the same share of the rate range however many steps were asked for
    (see ``suggest_learning_rate``)."""
    suggestion, min_loss_lr = suggest_learning_rate(
        range_test.learning_rates,
        range_test.smoothed_losses,
        skip_start=min(SKIP_START, steps // 10),
        half_window=max(1, steps // 20),
    )
    return LrFindResult(
        learning_rates=range_test.learning_rates,
        losses=range_test.losses,
        smoothed_losses=range_test.smoothed_losses,
        suggestion=suggestion,
        min_loss_lr=min_loss_lr,
        phase=phase,
        stopped_early=len(range_test.losses) < steps,
        min_lr=float(min_lr),
        max_lr=float(max_lr),
        steps=steps,
    )


def write_lr_find(result: LrFindResult, out_dir: str | Path, *, spec_name: str) -> None:
    """Write ``lr_find.csv`` (one row per batch), ``lr_find.json`` and ``lr_find.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        {
            "learning_rate": result.learning_rates,
            "loss": result.losses,
            "smoothed_loss": result.smoothed_losses,
        }
    )
    atomic.write_text(out / CSV_FILE, table.to_csv(index=False, na_rep="nan"))
    info = {
        "spec": spec_name,
        "phase": result.phase,
        "suggestion": result.suggestion,
        "min_loss_lr": result.min_loss_lr,
        "min_loss_lr_over_10": result.min_loss_suggestion,
        "min_lr": result.min_lr,
        "max_lr": result.max_lr,
        "steps": result.steps,
        "steps_run": len(result.learning_rates),
        "stopped_early": result.stopped_early,
    }
    atomic.write_json(out / JSON_FILE, info)
    png = io.BytesIO()
    lr_find_figure(result).savefig(png, format="png", dpi=120)
    atomic.write_bytes(out / PNG_FILE, png.getvalue())


def lr_find_figure(result: LrFindResult) -> Figure:
    """Smoothed loss against learning rate (log axis), raw batch losses faint, suggestion marked.

    The y range follows the smoothed curve up to its minimum, so the diverging tail runs off the
    top instead of squashing the part of the curve that matters.
    """
    rates = np.asarray(result.learning_rates, dtype=np.float64)
    raw = np.asarray(result.losses, dtype=np.float64)
    smooth = np.asarray(result.smoothed_losses, dtype=np.float64)
    raw[~np.isfinite(raw)] = np.nan
    smooth[~np.isfinite(smooth)] = np.nan
    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.subplots()
    ax.plot(rates, raw, color="C0", alpha=0.25, lw=1, label="batch loss")
    ax.plot(rates, smooth, color="C0", lw=2, label="smoothed loss")
    finite = np.isfinite(smooth)
    if finite.any():
        at = np.interp(np.log10(result.suggestion), np.log10(rates[finite]), smooth[finite])
        ax.plot(
            [result.suggestion],
            [at],
            "o",
            color="C3",
            ms=8,
            label=f"suggestion {result.suggestion:.1e} (steepest descent)",
        )
        ax.annotate(
            f"{result.suggestion:.1e}",
            (result.suggestion, at),
            textcoords="offset points",
            xytext=(8, 8),
            color="C3",
        )
        low = float(np.nanmin(smooth))
        high = float(np.nanmax(smooth[: int(np.nanargmin(smooth)) + 1]))
        span = high - low if high > low else max(abs(low) * 0.1, 1e-3)
        ax.set_ylim(low - 0.15 * span, high + 0.35 * span)
    ax.axvline(
        result.min_loss_suggestion,
        color="grey",
        ls="--",
        lw=1,
        label=f"minimum-loss rate / 10 = {result.min_loss_suggestion:.1e}",
    )
    ax.set_xscale("log")
    ax.set(
        xlabel="learning rate",
        ylabel="training loss",
        title=f"Learning-rate range test ({result.phase} phase)",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig
