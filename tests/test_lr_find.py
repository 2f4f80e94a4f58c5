"""Learning-rate range test: the rates are geometric and really used, batch losses are recorded
as such, divergence stops the test, the suggestion is the steepest descent before the minimum,
and a pretrained spec's head phase leaves the backbone untouched."""

from __future__ import annotations

import io
import json

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtransfer.models.backbones import build_backbone
from medtransfer.spec import spec_from_dict
from medtransfer.training.lr_find import (
    LrFindError,
    LrRangeTest,
    lr_find,
    smooth_losses,
    suggest_learning_rate,
)

from .conftest import make_png_folders


def tiny_spec(data, weights: str = "none"):
    return spec_from_dict(
        {
            "name": "lrf",
            "task": "binary",
            "classes": ["plain", "spot"],
            "data": {"format": "folders", "path": str(data)},
            "image": {"size": [32, 32], "channels": 1},
            "model": {"backbone": "mobilenetv3small", "weights": weights},
            "training": {"epochs": 4, "batch_size": 8},
        }
    )


class Probe(keras.callbacks.Callback):
    """Runs after the range test's callback: reads the optimiser's rate during each batch and
    keeps the model and its starting head weights for inspection after ``lr_find`` returns."""

    def __init__(self) -> None:
        super().__init__()
        self.rates: list[float] = []
        self.kernels: list[tuple[float, float]] = []

    def on_train_begin(self, logs=None):
        self.kept_model = self.model
        head = self.model.get_layer("probabilities").weights
        self.head_before = [keras.ops.convert_to_numpy(w).copy() for w in head]

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


# --- pure parts ------------------------------------------------------------------------------


def test_smoothing_is_a_bias_corrected_moving_average():
    assert smooth_losses([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0], rel=1e-12)
    beta = 0.5  # second value: (beta * l0 + l1) / (1 + beta)
    assert smooth_losses([1.0, 3.0], beta=beta) == pytest.approx([1.0, 3.5 / 1.5], rel=1e-12)
    nan_on = smooth_losses([1.0, float("nan"), 1.0])
    assert nan_on[0] == 1.0 and np.isnan(nan_on[1:]).all()


def synthetic_curve() -> tuple[np.ndarray, np.ndarray]:
    """Falls fastest at log10(lr) = -3 (index 40), minimum at index 60, then a diverging tail with
    an even steeper drop in it, a steep start, and a final NaN."""
    x = np.linspace(-7, 0, 71)
    loss = 2 - np.tanh(2 * (x + 3))  # slope -2 per decade at x = -3
    loss[61:] = loss[60] + 20 * (x[61:] + 1) ** 2
    loss[68:] -= 5  # still above the minimum, falling at -50 per decade
    loss[:3] += [3.0, 1.5, 0.0]  # -15 per decade
    loss[70] = np.nan
    return 10.0**x, loss


def test_suggestion_is_the_steepest_descent_between_the_start_and_the_minimum():
    rates, loss = synthetic_curve()
    for half_window in (1, 3):
        suggestion, min_loss_lr = suggest_learning_rate(
            rates, loss, skip_start=5, half_window=half_window
        )
        assert suggestion == rates[40]
        assert min_loss_lr == rates[60]
    suggestion, _ = suggest_learning_rate(rates, loss, skip_start=0)
    assert suggestion in (rates[0], rates[1])  # what skipping the start protects against


def test_suggestion_falls_back_to_a_tenth_of_the_minimum_when_the_loss_never_falls():
    rates = np.geomspace(1e-4, 1.0, 20)
    suggestion, min_loss_lr = suggest_learning_rate(rates, np.linspace(1.0, 2.0, 20))
    assert min_loss_lr == rates[10]  # the first point after the default skip of 10
    assert suggestion == rates[10] / 10


def test_suggestion_rejects_unusable_curves():
    with pytest.raises(LrFindError, match="not finite even at the lowest"):
        suggest_learning_rate([1e-3, 1e-2, 1e-1], [float("nan")] * 3)
    with pytest.raises(LrFindError, match="strictly increasing"):
        suggest_learning_rate([1e-3, 1e-3, 1e-1], [1.0, 0.5, 0.2])


# --- the callback on a model whose every step can be computed by hand ------------------------


def linear_fit(range_test: LrRangeTest, steps: int):
    """w -> w - lr * 2 (w - 1): SGD on the loss (w - 1)^2, one sample per batch."""

    class Kernel(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.before, self.after = [], []

        def on_train_batch_begin(self, batch, logs=None):
            self.before.append(float(keras.ops.convert_to_numpy(self.model.weights[0]).item()))

        def on_train_batch_end(self, batch, logs=None):
            self.after.append(float(keras.ops.convert_to_numpy(self.model.weights[0]).item()))

    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    kernel = Kernel()
    ones = np.ones((steps, 1), np.float32)
    model.fit(ones, ones, batch_size=1, callbacks=[range_test, kernel], shuffle=False, verbose=0)
    return np.array(kernel.before), np.array(kernel.after)


def test_callback_sets_the_rate_the_optimizer_uses_and_records_each_batch_loss():
    expected = np.geomspace(1e-2, 0.45, 6)
    range_test = LrRangeTest(1e-2, 0.45, 6)
    before, after = linear_fit(range_test, 6)
    assert range_test.learning_rates == expected.tolist()
    used = (before - after) / (2 * (before - 1))  # the rate each SGD step really applied
    np.testing.assert_allclose(used, expected, rtol=1e-4)
    # logs["loss"] would be the running mean over the epoch; the batch's own loss is (w - 1)^2
    np.testing.assert_allclose(range_test.losses, (before - 1) ** 2, rtol=1e-6)
    assert range_test.smoothed_losses == pytest.approx(smooth_losses(range_test.losses))
    assert not range_test.diverged


def test_callback_stops_training_once_the_loss_diverges():
    # SGD on (w - 1)^2 diverges once lr > 1, here slowly enough that the smoothed loss passes
    # 3x, 4x and 8x its best value at different steps
    range_test = LrRangeTest(0.8, 1.6, 40)
    before, _ = linear_fit(range_test, 40)
    n = len(range_test.losses)
    assert range_test.diverged and n < 40 and len(before) == n  # no batch ran after the stop
    smooth = range_test.smoothed_losses
    assert smooth[-1] > 4 * min(smooth[:-1])
    assert all(smooth[i] <= 4 * min(smooth[:i]) for i in range(1, n - 1))


def test_callback_and_phase_arguments_are_checked(tmp_path):
    spec = tiny_spec(make_png_folders(tmp_path / "data", per_class=2))
    with pytest.raises(LrFindError, match="min_lr < max_lr"):
        LrRangeTest(1e-2, 1e-3, 10)
    with pytest.raises(LrFindError, match="at least 2"):
        lr_find(spec, steps=1)
    with pytest.raises(LrFindError, match="unknown phase 'tail'"):
        lr_find(spec, phase="tail")
    with pytest.raises(LrFindError, match=r"phase 'head' does not fit.*runs 'full'"):
        lr_find(spec, phase="head")


# --- real range tests on MobileNetV3Small ------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_png_folders(tmp_path_factory.mktemp("lrf") / "data", per_class=8)


@pytest.mark.slow  # a whole range test (~35 s); the callback's stop is tested on its own
def test_diverging_range_test_writes_its_curve(folders, tmp_path):
    probe = Probe()
    steps, min_lr, max_lr = 16, 1e-4, 1e3
    result = lr_find(
        tiny_spec(folders),
        tmp_path / "out",
        min_lr=min_lr,
        max_lr=max_lr,
        steps=steps,
        workers=0,
        callbacks=[probe],
    )
    n = len(result.learning_rates)
    assert result.phase == "full" and result.stopped_early and 2 < n < steps
    assert result.learning_rates == np.geomspace(min_lr, max_lr, steps)[:n].tolist()
    np.testing.assert_allclose(probe.rates, result.learning_rates, rtol=1e-6)  # float32 variable
    assert len(result.losses) == len(result.smoothed_losses) == n
    smooth = result.smoothed_losses
    assert not smooth[-1] <= 4 * min(smooth[:-1])  # stopped by the 4x rule (or a NaN)
    assert result.min_loss_lr in result.learning_rates
    assert result.suggestion <= result.min_loss_lr
    assert "\n" not in result.summary() and f"{result.suggestion:.2e}" in result.summary()

    table = pd.read_csv(tmp_path / "out" / "lr_find.csv")
    assert list(table.columns) == ["learning_rate", "loss", "smoothed_loss"]
    np.testing.assert_allclose(table["learning_rate"], result.learning_rates, rtol=1e-12)
    np.testing.assert_allclose(table["loss"], result.losses, rtol=1e-12)
    info = json.loads((tmp_path / "out" / "lr_find.json").read_text())
    assert info["suggestion"] == result.suggestion
    assert info["min_loss_lr"] == result.min_loss_lr
    expected = {"phase": "full", "steps": steps, "steps_run": n, "stopped_early": True}
    assert {k: info[k] for k in expected} == expected
    assert (info["spec"], info["min_lr"], info["max_lr"]) == ("lrf", min_lr, max_lr)
    png = (tmp_path / "out" / "lr_find.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert Image.open(io.BytesIO(png)).size == (720, 480)  # 6 x 4 inches at 120 dpi


def test_head_phase_of_a_pretrained_spec_leaves_the_backbone_alone(folders, tmp_path):
    pretrained = build_backbone("mobilenetv3small", "none", (32, 32, 3))
    weights = tmp_path / "w.weights.h5"
    pretrained.save_weights(weights)
    probe = Probe()
    result = lr_find(
        tiny_spec(folders, str(weights)),
        min_lr=1e-5,
        max_lr=1e-2,
        steps=6,
        workers=0,
        callbacks=[probe],
    )
    assert result.phase == "head" and not result.stopped_early
    rates = result.learning_rates
    assert rates == np.geomspace(1e-5, 1e-2, 6).tolist()
    assert (rates[0], rates[-1]) == (1e-5, 1e-2)
    np.testing.assert_allclose(np.diff(np.log(rates)), np.log(10) * 3 / 5, rtol=1e-12)
    backbone = probe.kept_model.get_layer("backbone")
    unchanged = zip(pretrained.get_weights(), backbone.get_weights(), strict=True)
    assert all(np.array_equal(a, b) for a, b in unchanged)  # BatchNorm statistics included
    head = probe.kept_model.get_layer("probabilities").weights
    assert any(
        not np.array_equal(a, keras.ops.convert_to_numpy(b))
        for a, b in zip(probe.head_before, head, strict=True)
    )
