"""Parameter-efficient fine-tuning (``fine_tune.method``): what trains, how much, and that a
LoRA model saves, reloads and keeps its base weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from medtransfer.errors import SpecError
from medtransfer.models.peft import apply_method, enable_lora, trainable_share
from medtransfer.spec import spec_from_dict
from tests.conftest import make_png_folders, tiny_config

# The small backbone below, parameter by parameter:
#   conv_a   Conv2D 3 -> 4, 3x3:        kernel 3*3*3*4 = 108, bias 4
#   bn       BatchNormalization(4):     gamma 4, beta 4; moving mean 4, variance 4 (never trained)
#   depth    DepthwiseConv2D 3x3 on 4:  kernel 3*3*4 = 36, bias 4
#   conv_b   Conv2D 4 -> 6, 1x1:        kernel 24, bias 6
#   dense    Dense 6 -> 5:              kernel 30, bias 5
TOTAL = 108 + 4 + 16 + 36 + 4 + 24 + 6 + 30 + 5  # 233
# LoRA rank 2 on conv_a, conv_b and dense (A: kernel shape without the last axis x rank; B: rank x
# outputs); the depthwise convolution has no LoRA form.
LORA = (3 * 3 * 3 * 2 + 2 * 4) + (1 * 1 * 4 * 2 + 2 * 6) + (6 * 2 + 2 * 5)  # 62 + 20 + 22 = 104
# norm: gamma and beta, and every bias
NORM = 8 + 4 + 4 + 6 + 5  # 27


def small_backbone() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv_a")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.DepthwiseConv2D(3, name="depth")(x)
    x = keras.layers.Conv2D(6, 1, name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="dense")(x), name="backbone")


def test_trainable_share_is_exact_for_each_method():
    full = small_backbone()
    assert trainable_share(full) == {
        "trainable_params": TOTAL - 8,  # moving statistics are not trainable
        "total_params": TOTAL,
        "trainable_share": (TOTAL - 8) / TOTAL,
    }
    norm = small_backbone()
    apply_method(norm, "norm", train_batchnorm=False)
    assert trainable_share(norm)["trainable_params"] == NORM
    lora = small_backbone()
    assert enable_lora(lora, 2) == 3
    apply_method(lora, "lora", train_batchnorm=False)
    assert trainable_share(lora) == {
        "trainable_params": LORA,
        "total_params": TOTAL + LORA,
        "trainable_share": LORA / (TOTAL + LORA),
    }
    apply_method(lora, "lora", train_batchnorm=True)
    assert trainable_share(lora)["trainable_params"] == LORA + 8


def _classifier(method: str) -> tuple[keras.Model, keras.Model]:
    backbone = small_backbone()
    if method == "lora":
        enable_lora(backbone, 2)
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(backbone(inputs))
    model = keras.Model(inputs, outputs)
    apply_method(backbone, method, train_batchnorm=False)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="categorical_crossentropy")
    return model, backbone


def _values(backbone: keras.Model, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {v.path: keras.ops.convert_to_numpy(v) for v in backbone.weights if v.name in names}


@pytest.mark.parametrize("method", ["lora", "norm"])
def test_a_fit_step_moves_only_what_the_method_trains(method):
    keras.utils.set_random_seed(0)
    model, backbone = _classifier(method)
    base = ("kernel", "depthwise_kernel", "moving_mean", "moving_variance")
    moved = ("lora_kernel_b",) if method == "lora" else ("gamma", "beta", "bias")
    before_base, before_moved = _values(backbone, base), _values(backbone, moved)
    x = np.random.default_rng(0).random((16, 8, 8, 3)).astype("float32")
    y = np.eye(2, dtype="float32")[np.arange(16) % 2]
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    after_base, after_moved = _values(backbone, base), _values(backbone, moved)
    assert len(before_base) == 6  # 4 kernels (conv_a, depth, conv_b, dense), 2 statistics
    for path, value in before_base.items():
        if method == "lora" or "moving" not in path:  # norm trains BatchNormalization
            np.testing.assert_array_equal(after_base[path], value, err_msg=path)
    assert all(not np.array_equal(after_moved[p], v) for p, v in before_moved.items())


def test_a_lora_model_reloads_in_safe_mode_with_the_same_outputs(tmp_path):
    keras.utils.set_random_seed(1)
    model, _ = _classifier("lora")
    x = np.random.default_rng(1).random((8, 8, 8, 3)).astype("float32")
    model.fit(x, np.eye(2, dtype="float32")[np.arange(8) % 2], epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )


def _spec(tmp_path, **fine_tune):
    config = tiny_config(make_png_folders(tmp_path / "data", per_class=2))
    config["model"]["weights"] = "imagenet"
    config["training"]["fine_tune"] = fine_tune
    return spec_from_dict(config, base_dir=tmp_path)


def test_spec_errors_for_fine_tune_methods_are_precise(tmp_path):
    assert _spec(tmp_path, method="lora").training.fine_tune.rank == 4
    assert _spec(tmp_path, method="lora", lora_rank=8).training.fine_tune.rank == 8
    with pytest.raises(SpecError) as error:
        _spec(tmp_path, method="lora", lora_rank=0)
    assert "training.fine_tune.lora_rank: Input should be greater than or equal to 1" in str(
        error.value
    )
    with pytest.raises(SpecError) as error:
        _spec(tmp_path, lora_rank=8)
    assert "training.fine_tune: lora_rank applies to method: lora only (method is full)" in str(
        error.value
    )
    with pytest.raises(SpecError) as error:
        _spec(tmp_path, method="lorra")
    assert "training.fine_tune.method: " in str(error.value)
    assert "(did you mean 'lora'?)" in str(error.value)
    config = tiny_config(tmp_path / "data")
    config["training"]["fine_tune"] = {"method": "norm"}
    with pytest.raises(SpecError) as error:
        spec_from_dict(config, base_dir=tmp_path)
    assert (
        "training.fine_tune.method norm adapts a pretrained backbone, but model.weights is none"
        in str(error.value)
    )


@pytest.mark.slow
def test_a_lora_run_records_its_share_reloads_and_exports(tmp_path):
    """``train`` with ``method: lora`` end to end: the fine-tuning phase trains the adapters
    (and the head) only, run.json says how many, model.keras reloads in safe mode, and the
    export serves the same probabilities."""
    import tensorflow as tf

    from medtransfer.export import export_model
    from medtransfer.models.backbones import build_backbone
    from medtransfer.models.saved import load_run_model
    from medtransfer.training.run import train

    weights = tmp_path / "random.weights.h5"
    build_backbone("mobilenetv3small", "none", (32, 32, 3)).save_weights(weights)
    config = tiny_config(make_png_folders(tmp_path / "data", per_class=6))
    config["model"]["weights"] = str(weights)
    config["training"] |= {"epochs": 2, "fine_tune": {"head_epochs": 1, "method": "lora"}}
    run = train(spec_from_dict(config, base_dir=tmp_path), tmp_path / "run", workers=0)
    tuning = run.info.fine_tune
    assert tuning["method"] == "lora" and tuning["lora_rank"] == 4
    model = load_run_model(run)  # safe_mode=True
    backbone = model.get_layer("backbone")
    lora_params = sum(
        int(np.prod(v.shape)) for v in backbone.weights if v.name.startswith("lora_kernel")
    )
    assert lora_params > 0
    head = 576 * 2 + 2
    assert tuning["phases"]["head"]["trainable_params"] == head
    assert tuning["phases"]["fine_tune"]["trainable_params"] == lora_params + head
    x = np.random.default_rng(0).random((4, 32, 32, 1)).astype("float32")
    exported = export_model(run.path, tmp_path / "export" / "1")
    served = tf.saved_model.load(str(exported)).signatures["serving_default"](image=x)
    np.testing.assert_allclose(served["probabilities"], model.predict(x, verbose=0), atol=1e-5)
