"""Attacks (FGSM, PGD), corruptions and the ``robustness`` command.

The attacks are checked against a gradient worked out by hand on a one-layer model, and on a
model with the in-graph preprocessing a real one has (resize, grey to RGB); the corruptions on
real BreastMNIST test images.
"""

from __future__ import annotations

import itertools
import json

import keras
import numpy as np
import pandas as pd
import pytest

from medtransfer import cli
from medtransfer.evaluation.corruptions import CORRUPTIONS, corrupt
from medtransfer.models.attacks import Attack, perturb
from medtransfer.models.inputs import to_model_input
from medtransfer.models.layers import ChannelAdapter, ModelResizing
from medtransfer.rundir import SEEDS_FILE

LOSS = keras.losses.CategoricalCrossentropy()


def one_layer(size: int = 6) -> tuple[keras.Model, np.ndarray]:
    """softmax(flatten(x) @ W + b) with W's two columns at least 0.1 apart everywhere, so the
    sign of every pixel's gradient is clear-cut: sign(p0 - y0) * sign(W[:, 0] - W[:, 1])."""
    rng = np.random.default_rng(1)
    inputs = keras.Input((size, size, 1))
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    first = rng.normal(0, 0.3, size * size)
    gap = rng.choice([-1, 1], size * size) * rng.uniform(0.1, 0.4, size * size)
    weights = np.stack([first, first - gap], axis=1).astype(np.float32)
    dense.set_weights([weights, np.array([0.05, -0.05], np.float32)])
    return model, weights


def batch(n: int = 8, size: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, size, size, 1)).astype(np.float32)
    x[0, 0, :3, 0] = [0.0, 1.0, 0.999]  # on and next to the borders of [0, 1]
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, n)]
    return x, y


def preprocessing_model() -> keras.Model:
    """Grey images of any size -> resized to 8 px inside the graph -> RGB -> conv -> softmax:
    the attack must see through the resize, as with a model ``build_model`` makes."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((None, None, 1))
    x = ChannelAdapter(3)(ModelResizing(8, 8, antialias=True)(inputs))
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


def loss_of(model, x, y) -> float:
    return float(LOSS(y, model(x, training=False)))


def test_fgsm_is_the_hand_computed_sign_gradient_step():
    model, weights = one_layer()
    x, y = batch()
    logits = x.reshape(len(x), -1) @ weights + np.array([0.05, -0.05])
    p0 = np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1)
    sign = np.sign(p0 - y[:, 0])[:, None] * np.sign(weights[:, 0] - weights[:, 1])[None, :]
    epsilon = np.float32(3 / 255)
    expected = np.clip(x + epsilon * sign.reshape(x.shape).astype(np.float32), 0, 1)
    got = perturb(model, LOSS, x, y, Attack("fgsm", 3 / 255)).numpy()
    np.testing.assert_array_equal(got, expected)
    assert got[0, 0, 0, 0] in (0.0, epsilon) and got[0, 0, 1, 0] in (1.0, 1 - epsilon)


def test_pgd_stays_in_the_epsilon_ball_and_the_unit_range():
    model = preprocessing_model()
    x, y = batch(n=6, size=13)  # 13 px: resized to 8 inside the model
    epsilon = 4 / 255
    attack = Attack("pgd", epsilon, steps=5, step_size=1.5 / 255, random_start=True)
    adversarial = perturb(model, LOSS, x, y, attack, seed=(3, 4)).numpy()
    assert adversarial.shape == x.shape and adversarial.dtype == np.float32
    assert np.abs(adversarial - x).max() <= np.float32(epsilon) + 1e-7
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert np.mean(np.isclose(np.abs(adversarial - x), epsilon, atol=1e-6)) > 0.5  # it moved
    again = perturb(model, LOSS, x, y, attack, seed=(3, 4)).numpy()
    np.testing.assert_array_equal(adversarial, again)  # seeded random start
    assert attack.to_json() | {"step_size": 0} == {
        "method": "pgd", "epsilon": epsilon, "steps": 5, "step_size": 0, "random_start": True
    }  # fmt: skip
    assert Attack("pgd", 0.02, steps=4).step == pytest.approx(2.5 * 0.02 / 4)


def test_attacks_raise_the_loss():
    model = preprocessing_model()
    x, y = batch(n=16, size=10, seed=5)
    clean = loss_of(model, x, y)
    fgsm = loss_of(model, perturb(model, LOSS, x, y, Attack("fgsm", 8 / 255)), y)
    pgd = loss_of(model, perturb(model, LOSS, x, y, Attack("pgd", 8 / 255, steps=5)), y)
    assert fgsm > clean * 1.01 and pgd > clean * 1.01, (clean, fgsm, pgd)
    assert pgd >= fgsm * 0.99  # several steps find at least about as much as one


def test_an_epsilon_of_zero_changes_nothing():
    model = preprocessing_model()
    x, y = batch(n=4, size=9)
    for attack in (Attack("fgsm", 0.0), Attack("pgd", 0.0, steps=3, random_start=True)):
        np.testing.assert_array_equal(perturb(model, LOSS, x, y, attack, seed=(1, 1)).numpy(), x)


@pytest.fixture(scope="module")
def breast_images(shared_data) -> np.ndarray:
    """16 real BreastMNIST test images at the shipped spec's 64 px, as the model takes them."""
    with np.load(shared_data / "medmnist" / "breastmnist.npz") as archive:
        raw = archive["test_images"][:16].astype(np.float32) / 255
    return to_model_input(list(raw), (64, 64), 1)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruptions_grow_with_severity_and_repeat_with_the_seed(breast_images, name):
    images = breast_images
    np.testing.assert_array_equal(corrupt(images, name, 0, (0, 1)), images)
    errors = []
    for severity in range(1, 6):
        changed = corrupt(images, name, severity, (0, 1))
        assert changed.shape == images.shape and changed.dtype == np.float32
        assert changed.min() >= 0 and changed.max() <= 1
        np.testing.assert_array_equal(changed, corrupt(images, name, severity, (0, 1)))
        errors.append(float(np.mean((changed - images) ** 2)))
    assert errors[0] > 0 and all(b > a for a, b in itertools.pairwise(errors)), errors
    other_seed = corrupt(images, name, 3, (7, 7))
    random = name in ("gaussian_noise", "rotation")
    assert np.array_equal(other_seed, corrupt(images, name, 3, (0, 1))) is not random


def test_corrupt_refuses_unknown_names_and_severities(breast_images):
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(breast_images, "fog", 1, (0, 0))
    with pytest.raises(ValueError, match="severity must be 0 to 5, got 6"):
        corrupt(breast_images, "blur", 6, (0, 0))


def test_cli_writes_the_robustness_files(tiny_run, tmp_path, capsys):
    out = tmp_path / "robustness"
    code = cli.main(
        [
            "robustness", str(tiny_run), "--out", str(out), "--workers", "0",
            "--epsilons", "1/255,4/255", "--pgd-steps", "3", "--bootstrap", "50",
            "--corruptions", "gaussian_noise,rotation",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {
        "robustness.json", "robustness.csv", "robustness.html", "adversarial.png",
        "corruptions.png",
    }  # fmt: skip
    record = json.loads((out / "robustness.json").read_text())
    conditions = record["conditions"]
    assert len(conditions) == 1 + 2 * 2 + 2 * 5
    pgd = [c for c in conditions if c["kind"] == "pgd"]
    assert [c["level"] for c in pgd] == [1 / 255, 4 / 255]
    assert record["attacks"][-1] == {
        "method": "pgd", "epsilon": 4 / 255, "steps": 3, "step_size": 2.5 * (4 / 255) / 3,
        "random_start": True,
    }  # fmt: skip
    assert record["settings"]["bootstrap_resamples"] == 50
    assert set(record["summary"]["corruption_auroc"]) == {"gaussian_noise", "rotation"}
    table = pd.read_csv(out / "robustness.csv")
    assert len(table) == len(conditions) and table["kind"].iloc[0] == "clean"
    assert (out / "adversarial.png").read_bytes()[:4] == b"\x89PNG"
    assert "PGD epsilon 4/255: 3 step(s)" in (out / "robustness.html").read_text()
    assert "mean corruption AUROC" in capsys.readouterr().out


def test_cli_refuses_bad_epsilons_and_corruptions(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["robustness", str(tiny_run), "--out", str(tmp_path), "--epsilons", "2/0"])
    assert "expected epsilons such as 2/255 or 0.01, got '2/0'" in capsys.readouterr().err
    code = cli.main(["robustness", str(tiny_run), "--out", str(tmp_path), "--corruptions", "fog"])
    assert code == 2 and "unknown corruption(s) ['fog']" in capsys.readouterr().err


def test_the_robustness_verb_explains_itself():
    from .test_cli_help import examples, verb_parser

    parser = verb_parser("robustness")
    assert "an export gets the corruptions only" in " ".join(parser.description.split())
    commands = examples(parser.epilog, "robustness")
    assert len(commands) == 3
    for command in commands:
        assert cli.build_parser().parse_args(command.split()[1:]).command == "robustness"
    assert "(default: 1/255,2/255,4/255)" in parser.format_help()


def test_evaluate_with_robustness_adds_a_section_to_the_report(tiny_run, tmp_path, capsys):
    """``evaluate --robustness``: the report gets a robustness section on the report's own
    images, the full files land beside it, and each attack and each corruption's mildest and
    harshest severity are in the section's table."""
    out = tmp_path / "report"
    code = cli.main(
        ["evaluate", str(tiny_run), "--out", str(out), "--workers", "0", "--bootstrap", "50",
         "--robustness"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "mean corruption AUROC" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    section = metrics["robustness"]
    assert (section["split"], section["n_images"]) == ("test", metrics["n_images"])
    assert section["report"] == "robustness/robustness.html"
    full = json.loads((out / "robustness" / "robustness.json").read_text())
    assert len(full["conditions"]) == 1 + 2 * 3 + 7 * 5
    kept = [(c["kind"], c["name"], c["level"]) for c in section["conditions"]]
    assert len(kept) == 1 + 2 * 3 + 7 * 2
    assert ("corruption", "blur", 1.0) in kept and ("corruption", "blur", 5.0) in kept
    assert ("corruption", "blur", 3.0) not in kept
    assert {p.name for p in out.iterdir()} >= {
        "report.html", "robustness_adversarial.png", "robustness_corruptions.png", "robustness"
    }  # fmt: skip
    html = (out / "report.html").read_text()
    assert "<h2 id='robustness'>Robustness</h2>" in html
    assert "href='robustness/robustness.html'" in html
    assert html.count("/255</td>") == 2 * 3  # one row per attack and epsilon
    assert "AUROC against severity" in html


def test_evaluate_refuses_robustness_with_tta_or_a_seeds_folder(tiny_run, tmp_path, capsys):
    code = cli.main(["evaluate", str(tiny_run), "--out", str(tmp_path), "--robustness", "--tta"])
    assert code == 2
    assert "evaluate with --tta and with --robustness separately" in capsys.readouterr().err
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / SEEDS_FILE).write_text('{"runs": []}')
    code = cli.main(["evaluate", str(seeds), "--out", str(tmp_path / "r"), "--robustness"])
    assert code == 2 and "--robustness assesses one model" in capsys.readouterr().err
