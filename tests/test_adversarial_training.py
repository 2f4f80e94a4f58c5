"""Adversarial training: the spec section, the ``train_step`` wrapper, resume, and what a run keeps.

The wrapper is exercised on real BreastMNIST images with a small convolutional model that has
BatchNormalization and Dropout (the parts whose training and inference modes matter); the
full ``train`` path (phases, checkpoint, resume, ``model.keras``) runs in a slow test.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from medtransfer.errors import SpecError
from medtransfer.models.attacks import Attack, perturb
from medtransfer.models.saved import load_keras_model
from medtransfer.spec import spec_from_dict
from medtransfer.training.adversarial import AdversarialTrainingModel, spec_attack
from medtransfer.training.checkpoint import Checkpoint, TrainingState, snapshot

from .conftest import SHARED_DATA, make_png_folders, tiny_config

BREAST = SHARED_DATA / "medmnist" / "breastmnist.npz"


def breast_spec(**adversarial):
    return spec_from_dict(
        {
            "name": "breast",
            "task": "binary",
            "classes": ["malignant", "normal_or_benign"],
            "data": {"format": "npz", "path": str(BREAST)},
            "image": {"size": [32, 32], "channels": 1},
            "model": {"backbone": "mobilenetv3small", "weights": "none"},
            "training": {"adversarial": adversarial},
        }
    )


def spec_error(**adversarial) -> str:
    with pytest.raises(SpecError) as caught:
        breast_spec(**adversarial)
    return str(caught.value)


def test_the_spec_section_reads_budgets_in_grey_levels_and_resolves_defaults():
    adversarial = breast_spec(epsilon="2/255", weight=0.3).training.adversarial
    assert adversarial.epsilon == 2 / 255 and adversarial.weight == 0.3
    assert spec_attack(adversarial) == Attack("pgd", 2 / 255, 3, None, True)
    fgsm = spec_attack(breast_spec(method="fgsm", epsilon=0.01).training.adversarial)
    assert fgsm.to_json() == {
        "method": "fgsm", "epsilon": 0.01, "steps": 1, "step_size": 0.01, "random_start": False
    }  # fmt: skip


def test_spec_errors_name_the_field_and_the_fix():
    assert "training.adversarial.epsilon: Input should be greater than 0" in spec_error(epsilon=0)
    assert "training.adversarial.epsilon: '2/0' divides by zero" in spec_error(epsilon="2/0")
    assert "training.adversarial.weight: Input should be less than or equal to 1" in spec_error(
        weight=1.5
    )
    assert "training.adversarial.method: Input should be 'pgd' or 'fgsm'" in spec_error(
        method="pdg"
    )
    assert "(did you mean 'pgd'?)" in spec_error(method="pdg")
    assert "training.adversarial.epsilion: unknown field (did you mean 'epsilon'?)" in spec_error(
        epsilion=0.01
    )
    assert (
        "training.adversarial: method fgsm is one step of size epsilon from the image; steps, "
        "random_start only apply to method pgd"
    ) in spec_error(method="fgsm", steps=5, random_start=False)


def test_adversarial_training_refuses_tabular_and_feature_alignment(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text("path,label,site,age\na.png,plain,a,50\nb.png,spot,b,60\n")
    config = tiny_config(tmp_path)
    config["training"] = {"adversarial": {}}
    config["data"] = {"format": "manifest", "path": str(table), "site_column": "site"}
    dann = {"method": "dann", "source": ["a"], "target": ["b"]}
    with pytest.raises(SpecError) as caught:
        spec_from_dict({**config, "domain_adaptation": dann})
    assert "cannot be combined with domain_adaptation method dann" in str(caught.value)
    with pytest.raises(SpecError, match="attacks images only; a model with tabular"):
        spec_from_dict({**config, "tabular": [{"name": "age", "type": "numeric"}]})


@pytest.fixture(scope="module")
def breast_arrays() -> tuple[np.ndarray, np.ndarray]:
    """96 real BreastMNIST training images (28 px) and one-hot labels."""
    with np.load(BREAST) as archive:
        x = archive["train_images"][:96, :, :, None].astype(np.float32) / 255
        y = np.eye(2, dtype=np.float32)[archive["train_labels"].reshape(-1)[:96]]
    return x, y


def small_classifier(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 1), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3, name="head_dropout")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="small")


def wrapped(seed: int = 0) -> AdversarialTrainingModel:
    attack = Attack("pgd", 8 / 255, steps=2)
    model = AdversarialTrainingModel(small_classifier(seed), attack, weight=0.5, seed=seed)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc")],
    )
    return model


def adversarial_loss(classifier: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    attack = Attack("pgd", 8 / 255, steps=5)
    x_adv = perturb(classifier, keras.losses.CategoricalCrossentropy(), x, y, attack, seed=(9, 9))
    return float(keras.losses.CategoricalCrossentropy()(y, classifier(x_adv, training=False)))


def test_a_short_fit_lowers_the_adversarial_loss_and_logs_both_parts(breast_arrays):
    x, y = breast_arrays
    model = wrapped()
    model.fit(x[:4], y[:4], epochs=1, batch_size=4, verbose=0)  # builds optimizer and metrics
    before = adversarial_loss(model.classifier, x, y)
    history = model.fit(x, y, epochs=4, batch_size=32, shuffle=False, verbose=0).history
    after = adversarial_loss(model.classifier, x, y)
    assert after < before * 0.95, (before, after)
    assert {"loss", "clean_loss", "adversarial_loss", "auc"} <= set(history)
    np.testing.assert_allclose(
        history["loss"], 0.5 * np.add(history["clean_loss"], history["adversarial_loss"]), 1e-5
    )
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert "adversarial_loss" not in logs and "auc" in logs


def test_a_resumed_fit_matches_an_uninterrupted_one_bit_for_bit(breast_arrays):
    x, y = breast_arrays[0][:64], breast_arrays[1][:64]
    whole = wrapped()
    whole.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    first = wrapped()
    first.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    arrays = snapshot(first, TrainingState())
    count = sum(1 for key in arrays if key.startswith("m"))
    saved = Checkpoint(
        TrainingState(),
        [arrays[f"m{i}"] for i in range(count)],
        [arrays[f"o{i}"] for i in range(len(arrays) - count - 1)],
    )
    resumed = wrapped(seed=5)  # other initial weights and seed state: the checkpoint decides
    resumed.optimizer.build(resumed.trainable_variables)
    saved.restore(resumed, optimizer=True)
    resumed.fit(x, y, epochs=2, initial_epoch=1, batch_size=16, shuffle=False, verbose=0)
    for got, want in zip(resumed.variables, whole.variables, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_the_saved_classifier_is_plain_and_the_wrapper_serialises(breast_arrays, tmp_path):
    model = wrapped()
    model.fit(*breast_arrays, epochs=1, batch_size=32, verbose=0)
    model.classifier.save(tmp_path / "model.keras")
    loaded = load_keras_model(tmp_path / "model.keras")  # safe_mode=True
    assert loaded.__class__.__name__ == "Functional"
    names = [layer.__class__.__name__ for layer in loaded._flatten_layers(include_self=True)]
    assert "AdversarialTrainingModel" not in names
    x = breast_arrays[0][:8]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), 1e-6)
    again = AdversarialTrainingModel.from_config(model.get_config())
    assert again.attack == model.attack and again.weight == 0.5 and again.seed == 0


@pytest.mark.slow
def test_a_killed_adversarial_run_resumes_and_keeps_the_plain_classifier(tmp_path):
    from medtransfer.models.saved import load_run_model
    from medtransfer.training.checkpoint import load_checkpoint
    from medtransfer.training.run import train

    from .test_resume import KillAfterEpoch, Killed

    config = tiny_config(make_png_folders(tmp_path / "data", per_class=8))
    config["training"] = {"epochs": 2, "batch_size": 8, "adversarial": {"epsilon": "4/255"}}
    spec = spec_from_dict(config, base_dir=tmp_path)
    whole = train(spec, tmp_path / "whole", workers=0)
    with pytest.raises(Killed):
        train(spec, tmp_path / "killed", workers=0, callbacks=[KillAfterEpoch(0)])
    resumed = train(None, tmp_path / "killed", resume=True, workers=0)
    for got, want in zip(
        load_checkpoint(resumed.path).model_values,
        load_checkpoint(whole.path).model_values,
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    model = load_run_model(resumed)  # safe_mode=True
    assert model.__class__.__name__ == "Functional"
    assert [layer.name for layer in model.layers][-2:] == ["head_dropout", "probabilities"]
    assert not any(
        layer.__class__.__name__ == "AdversarialTrainingModel"
        for layer in model._flatten_layers(include_self=True)
    )


class BackboneAtEpochEnd(keras.callbacks.Callback):
    """The backbone's weights after each epoch, read through the wrapper ``fit`` trains."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[np.ndarray]] = []

    def on_epoch_end(self, epoch, logs=None):
        backbone = self.model.classifier.get_layer("backbone")
        self.weights.append([[np.asarray(w) for w in layer.weights] for layer in backbone.layers])


def test_adversarial_training_runs_both_fine_tuning_phases_of_a_pretrained_source(
    tiny_run, tmp_path
):
    """With pretrained weights (here another run's backbone, as ``run:`` gives) training has two
    phases, each compiling the wrapper around the classifier it unfroze: both phases log the
    adversarial loss, the head phase leaves the backbone alone, the fine-tuning phase moves
    its top block and nothing below it, and the run keeps the plain classifier."""
    import pandas as pd

    from medtransfer.models.backbones import backbone_blocks
    from medtransfer.models.saved import load_run_model
    from medtransfer.training.run import train

    config = tiny_config(make_png_folders(tmp_path / "data", per_class=6))
    config["model"]["weights"] = f"run:{tiny_run}"
    config["training"] = {
        "epochs": 2, "batch_size": 8, "fine_tune": {"head_epochs": 1, "unfreeze": 1},
        "adversarial": {"epsilon": "4/255", "steps": 2},
    }  # fmt: skip
    seen = BackboneAtEpochEnd()
    spec = spec_from_dict(config, base_dir=tmp_path)
    run = train(spec, tmp_path / "run", workers=0, callbacks=[seen])
    assert [p["name"] for p in run.info.phases] == ["head", "fine_tune"]
    history = pd.read_csv(run.path / "history.csv")
    assert len(history) == 2 and (history["adversarial_loss"] > 0).all()
    backbone = load_run_model(tiny_run).get_layer("backbone")
    start = [[np.asarray(w) for w in layer.weights] for layer in backbone.layers]

    def moved(before, after) -> set[str]:
        return {
            layer.name
            for layer, old, new in zip(backbone.layers, before, after, strict=True)
            if any(not np.array_equal(a, b) for a, b in zip(old, new, strict=True))
        }

    assert moved(start, seen.weights[0]) == set()
    top = {layer.name for layer in backbone_blocks(backbone, "mobilenetv3small")[-1]}
    fine_tuned = moved(seen.weights[0], seen.weights[1])
    assert fine_tuned and fine_tuned <= top, sorted(fine_tuned - top)[:5]
    assert load_run_model(run).__class__.__name__ == "Functional"
