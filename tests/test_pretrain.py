"""Self-supervised pretraining (``medtransfer pretrain``) on real BreastMNIST images: the loss
(SimSiam's and SimCLR's) falls, the validation and test images are never read, the backbone
round-trips into ``train`` as ``run:`` weights, and a killed run resumes to the same weights."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from medtransfer import rundir
from medtransfer.cli import main
from medtransfer.data import pipeline
from medtransfer.data.augment import GraphAugmenter
from medtransfer.data.augment_presets import PRETRAINING_PRESETS, SSL_PRESET
from medtransfer.data.cache import UnreadableImages
from medtransfer.data.manifest import build_manifest
from medtransfer.data.pipeline import load_split
from medtransfer.errors import RunError, SpecError
from medtransfer.models.build import build_encoder, build_model
from medtransfer.models.saved import load_run_model
from medtransfer.models.ssl import SimCLR, SimSiam, nt_xent, predictor, projector
from medtransfer.spec import load_spec
from medtransfer.training.pretrain import TwoViews, pretrain, pretraining_rows, readable_images

CLASSES = ["malignant", "normal_or_benign"]
PER_CLASS = 12  # training images per class; 8 more in the unlabelled folder
SPEC = """\
name: breast-folders
task: binary
classes: [malignant, normal_or_benign]
data: {format: folders, path: data}
image: {size: [32, 32], channels: 1}
model: {backbone: mobilenetv3small, weights: none}
training: {epochs: 2, batch_size: 8, seed: 3}
"""


def _breast_images(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(shared_data / "medmnist" / "breastmnist.npz") as archive:
        return archive["train_images"], archive["train_labels"].ravel()


@pytest.fixture(scope="module")
def breast_folders(shared_data, tmp_path_factory) -> Path:
    """Real BreastMNIST images as PNG class folders; the val and test files are not images at
    all, so any attempt to decode one fails (and the decode spy below names it)."""
    root = tmp_path_factory.mktemp("ssl")
    images, labels = _breast_images(shared_data)
    for k, name in enumerate(CLASSES):
        chosen = np.flatnonzero(labels == k)
        for i in chosen[:PER_CLASS]:
            folder = root / "data" / "train" / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
        for split in ("val", "test"):
            folder = root / "data" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(3):
                (folder / f"{j}.png").write_bytes(b"held out: never to be read by pretrain")
    (root / "unlabeled").mkdir()
    for i in range(400, 408):
        Image.fromarray(images[i]).save(root / "unlabeled" / f"u{i}.png")
    (root / "spec.yaml").write_text(SPEC)
    return root


@pytest.fixture(scope="module")
def pretrained(breast_folders) -> tuple[Path, list[str]]:
    """``medtransfer pretrain`` through the CLI, with every decoded path recorded."""
    decoded: list[str] = []
    original = pipeline._decode_files

    def spy(paths, settings, pool):
        decoded.extend(paths)
        return original(paths, settings, pool)

    run = breast_folders / "ssl_run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "_decode_files", spy)
        args = ["pretrain", "--spec", str(breast_folders / "spec.yaml"), "--out", str(run)]
        code = main([*args, "--unlabeled", str(breast_folders / "unlabeled"), "--workers", "0"])
    assert code == 0
    return run, decoded


def test_pretrain_never_reads_validation_or_test_images(breast_folders, pretrained):
    run, decoded = pretrained
    train = sorted(str(p) for p in (breast_folders / "data" / "train").rglob("*.png"))
    unlabeled = sorted(str(p) for p in (breast_folders / "unlabeled").glob("*.png"))
    assert sorted(decoded) == sorted(train + unlabeled)
    # the trap is live: the held-out files cannot be decoded by anyone
    spec = load_spec(breast_folders / "spec.yaml")
    with pytest.raises(UnreadableImages, match="6 image"):
        load_split(spec, build_manifest(spec).query("split == 'val'"), "val", workers=0)
    info = rundir.open_run(run).info
    assert info.kind == "pretrain"
    assert info.images == {"train": 2 * PER_CLASS, "unlabeled": 8}
    assert set(rundir.open_run(run).manifest()["split"]) == {"train", "unlabeled"}
    assert info.epochs_run == 2 and len(info.pretraining["loss"]) == 2
    assert info.best_val_auroc is None and info.seed == 3


def test_an_unreadable_unlabelled_file_is_left_out_and_reported(breast_folders, tmp_path):
    """An archive holds broken files: pretraining goes on without them and says which; a
    training image that cannot be read still stops it (the spec says it is data)."""
    spec = load_spec(breast_folders / "spec.yaml")
    archive = tmp_path / "archive"
    shutil.copytree(breast_folders / "unlabeled", archive)
    broken = archive / "u999.png"
    broken.write_bytes((archive / "u400.png").read_bytes()[:40])  # cut inside the header
    rows = pretraining_rows(spec, [str(archive)])
    with pytest.warns(UserWarning, match=r"leaves out 1 unlabelled file\(s\)"):
        kept, images, skipped = readable_images(spec, rows, workers=0)
    assert len(rows) == len(kept) + 1 == len(images) + 1
    assert str(broken) not in set(kept["path"])
    assert len(skipped) == 1 and skipped[0].startswith(f"{broken}: ")
    trained = rows.copy()
    trained.loc[trained["path"] == str(broken), "split"] = "train"
    with pytest.raises(UnreadableImages, match="1 image"):
        readable_images(spec, trained, workers=0)


def _run_spec(breast_folders: Path, run: Path, data: Path):
    return load_spec(breast_folders / "spec.yaml").with_overrides(
        model={"weights": f"run:{run}"},
        data={"path": str(data)},
        training={"epochs": 1, "fine_tune": {"head_epochs": 1}},
    )


def _assert_same_weights(ours: keras.Model, theirs: keras.Model) -> None:
    assert len(ours.weights) == len(theirs.weights) > 100
    for mine, source in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(source), err_msg=mine.path)


def test_pretrained_backbone_is_what_a_run_weights_model_starts_from(breast_folders, pretrained):
    """``weights: run:PRETRAIN`` is accepted by the spec and ``build_model`` (what ``train``
    builds) starts from exactly the pretrained backbone, BatchNormalization statistics included."""
    run, _ = pretrained
    spec = _run_spec(breast_folders, run, breast_folders / "data")
    source = load_run_model(run, encoder=True).get_layer("backbone")
    _assert_same_weights(build_model(spec).get_layer("backbone"), source)


def test_a_pretrain_run_is_not_taken_for_a_classifier(pretrained, tmp_path, capsys):
    """Its model outputs features: scoring, evaluating or exporting it must fail clearly,
    never read the first features as class probabilities."""
    run, _ = pretrained
    with pytest.raises(RunError, match="is a pretrain run: its model maps images to features"):
        load_run_model(run)
    folder = tmp_path / "in"
    folder.mkdir()
    out = tmp_path / "scores.csv"
    assert main(["score", str(folder), "--model", str(run), "--out", str(out)]) == 2
    assert main(["export", str(run), "--out", str(tmp_path / "m" / "1")]) == 2
    assert capsys.readouterr().err.count("is a pretrain run") == 2
    assert not out.exists() and not (tmp_path / "m").exists()


@pytest.mark.slow
def test_pretrained_backbone_round_trips_through_train(breast_folders, pretrained, tmp_path):
    """The whole ``train`` path: a head-only epoch (the backbone frozen, BatchNormalization in
    inference mode) keeps the pretrained backbone bit for bit in the run's model.keras."""
    from medtransfer.training.run import train

    run, _ = pretrained
    readable = tmp_path / "readable"  # held-out images that can be read this time
    for split in ("train", "val"):
        for name in CLASSES:
            (readable / split / name).mkdir(parents=True)
            pngs = sorted((breast_folders / "data" / "train" / name).glob("*.png"))[:4]
            for png in pngs:
                (readable / split / name / png.name).write_bytes(png.read_bytes())
    with pytest.warns(UserWarning, match="stays frozen throughout"):
        trained = train(_run_spec(breast_folders, run, readable), tmp_path / "run", workers=0)
    _assert_same_weights(
        load_run_model(trained).get_layer("backbone"), load_run_model(run).get_layer("backbone")
    )
    assert trained.info.fine_tune["phases"]["head"]["trainable_params"] == 576 * 2 + 2


def test_trained_features_differ_from_random_ones(breast_folders, pretrained, shared_data):
    run, _ = pretrained
    spec = load_spec(breast_folders / "spec.yaml")
    images, _ = _breast_images(shared_data)
    x = images[:16, ..., None].astype("float32") / 255
    random = build_encoder(spec).predict(x, verbose=0)
    trained = build_encoder(spec.with_overrides(model={"weights": f"run:{run}"}))
    assert not np.allclose(trained.predict(x, verbose=0), random, atol=1e-3)


def _tiny_encoder() -> keras.Model:
    """A small convolutional encoder (the objective, not a registered backbone, is under test:
    SimSiam takes any images -> features model)."""
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for filters in (16, 32):
        x = keras.layers.Conv2D(filters, 3, strides=2, use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def test_simsiam_loss_decreases_on_real_images(shared_data):
    """Eight steps on 64 fixed pairs of augmented real BreastMNIST images (the ``ssl`` preset):
    the negative cosine between the predictor's output and the other view's projection starts
    near 0 and falls at every step, by more than 0.2 in all; the projections have not
    collapsed (``z_std`` > 0)."""
    keras.utils.set_random_seed(0)
    first, second = _real_pairs(shared_data)
    assert not np.allclose(first, second)
    model = SimSiam(_tiny_encoder(), projector(), predictor())
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    # one step per epoch: the first loss is that of the untrained model
    history = model.fit(first, second, batch_size=64, epochs=8, verbose=0).history
    loss = history["loss"]
    assert -0.3 < loss[0] < 0.3
    assert all(later < earlier for earlier, later in itertools.pairwise(loss)), loss
    assert loss[-1] < loss[0] - 0.2, loss
    assert min(history["z_std"]) > 0.01


def _real_pairs(shared_data: Path):
    images, _ = _breast_images(shared_data)
    x = keras.ops.convert_to_tensor(images[:64, ..., None].astype("float32") / 255)
    augment = TwoViews(GraphAugmenter(PRETRAINING_PRESETS[SSL_PRESET], seed=0))
    return augment(x, keras.ops.zeros((64, 1)), keras.ops.convert_to_tensor([0, 1]))


def test_simclr_loss_decreases_on_real_images(shared_data):
    """SimCLR on the same 64 pairs: each view must find its partner among 127 views. The
    untrained model is near chance (log 127 = 4.84); eight steps lower the loss at every step,
    by more than 0.5 in all."""
    keras.utils.set_random_seed(0)
    first, second = _real_pairs(shared_data)
    model = SimCLR(_tiny_encoder(), projector(), temperature=0.2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(first, second, batch_size=64, epochs=8, verbose=0).history
    loss = history["loss"]
    assert 3.5 < loss[0] < 5.5, loss
    assert all(later < earlier for earlier, later in itertools.pairwise(loss)), loss
    assert loss[-1] < loss[0] - 0.5, loss
    assert min(history["z_std"]) > 0.01


def test_nt_xent_is_the_partner_cross_entropy():
    """Orthonormal projections, each view equal to its partner: every view scores 1/t for its
    partner and 0 for the 2n - 2 others, so the loss is -log(e^(1/t) / (e^(1/t) + 2n - 2)).
    Scale does not matter (cosine). Swapping two images' second views gives those four views
    a partner at 0 and a stranger at 1/t: -log(1 / (e^(1/t) + 2n - 2)) each."""
    n, t = 4, 0.5
    z = np.eye(8, dtype="float32")[:n]
    matched = -np.log(np.exp(1 / t) / (np.exp(1 / t) + 2 * n - 2))
    np.testing.assert_allclose(float(nt_xent(z, 3 * z, t)), matched, rtol=1e-5)
    swapped = -np.log(1 / (np.exp(1 / t) + 2 * n - 2))
    np.testing.assert_allclose(
        float(nt_xent(z, z[[1, 0, 2, 3]], t)), (swapped + matched) / 2, rtol=1e-5
    )
    sharper = float(nt_xent(z, z, 0.1))
    np.testing.assert_allclose(sharper, -np.log(np.exp(10) / (np.exp(10) + 6)), rtol=1e-4)


def test_pretrain_with_simclr_from_the_cli(breast_folders, tmp_path):
    """``--objective simclr --temperature 0.1`` is what the run trains and records: the run's
    spec and run.json say so, and its encoder is a weight source like SimSiam's."""
    out = tmp_path / "simclr"
    args = ["pretrain", "--spec", str(breast_folders / "spec.yaml"), "--out", str(out)]
    flags = ["--objective", "simclr", "--temperature", "0.1", "--epochs", "1", "--workers", "0"]
    assert main([*args, *flags]) == 0
    run = rundir.open_run(out)
    assert run.info.pretraining["objective"] == "simclr"
    assert run.info.pretraining["temperature"] == 0.1
    assert len(run.info.pretraining["loss"]) == 1 and run.info.pretraining["loss"][0] > 0
    stored = load_spec(out / rundir.SPEC_FILE)
    assert (stored.pretraining.objective, stored.pretraining.temperature) == ("simclr", 0.1)
    spec = _run_spec(breast_folders, out, breast_folders / "data")
    source = load_run_model(out, encoder=True).get_layer("backbone")
    _assert_same_weights(build_model(spec).get_layer("backbone"), source)


def test_the_pretraining_objective_is_checked_by_the_spec(breast_folders):
    spec = load_spec(breast_folders / "spec.yaml")
    assert (spec.pretraining.objective, spec.pretraining.temperature) == ("simsiam", 0.2)
    with pytest.raises(SpecError, match="did you mean 'simclr'"):
        spec.with_overrides(pretraining={"objective": "simclear"})
    with pytest.raises(SpecError, match="temperature"):
        spec.with_overrides(pretraining={"objective": "simclr", "temperature": 0})


@pytest.mark.slow
def test_a_killed_pretraining_resumes_to_the_same_weights(breast_folders, pretrained, tmp_path):
    class Killed(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    spec = load_spec(breast_folders / "spec.yaml").with_overrides(training={"epochs": 2})
    out = tmp_path / "killed"
    unlabeled = [breast_folders / "unlabeled"]
    with pytest.raises(KeyboardInterrupt):
        pretrain(spec, out, unlabeled=unlabeled, workers=0, callbacks=[Killed()])
    assert (out / rundir.CHECKPOINT_FILE).is_file() and not rundir.is_run(out)
    resumed = pretrain(None, out, resume=True, workers=0)
    assert resumed.info.resumed and resumed.info.epochs_run == 2
    expected = load_run_model(pretrained[0]).weights
    for ours, theirs in zip(load_run_model(resumed).weights, expected, strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-6)
