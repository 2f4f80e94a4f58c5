"""Domain adaptation: gradient reversal, CORAL/MMD, AdaBN and the DomainAdaptationModel.

Tiny models (Conv2D + BatchNormalization + global pooling on 16x16 images, Dense head) keep the
whole file to seconds; every check has an exact expectation.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import typing

import keras
import numpy as np
import pytest
import tensorflow as tf

from medtransfer.models.adaptation import (
    ALIGNMENT_LOSSES,
    DomainAdaptationModel,
    GradientReversal,
    GradientReversalSchedule,
    adapt_batchnorm,
    coral_loss,
    dann_strength,
    domain_classifier,
    mmd_loss,
    with_class_weights,
)
from medtransfer.models.adaptation_methods import ADAPTATION_METHODS, ALIGNMENT_METHODS
from medtransfer.spec import AdaptationMethod as SpecMethodNames

SIZE = 16
FEATURES = 4
HIDDEN = 7  # a shape nothing else has, to spot domain-classifier variables in an export


def make_features(name: str = "features") -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Conv2D(FEATURES, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, x, name=name)


def make_head() -> keras.Model:
    inputs = keras.Input((FEATURES,), name="pooled")
    outputs = keras.layers.Dense(2, activation="softmax", name="probabilities")(inputs)
    return keras.Model(inputs, outputs, name="head")


def make_model(method: str, weight: float = 0.5, dropout: float = 0.5) -> DomainAdaptationModel:
    classifier = domain_classifier(FEATURES, HIDDEN, dropout) if method == "dann" else None
    return DomainAdaptationModel(
        make_features(), make_head(), method=method, weight=weight, domain_classifier=classifier
    )


def toy_domains(n: int = 64, seed: int = 0):
    """Separable source (a bright square marks class 1); target: same task, darker, noisier."""
    rng = np.random.default_rng(seed)

    def images(labels, gain, offset, noise):
        x = rng.normal(0.3, noise, (len(labels), SIZE, SIZE, 1)).astype(np.float32)
        x[labels == 1, 4:12, 4:12] += 0.6
        return (x * gain + offset).astype(np.float32)

    source_labels = rng.integers(0, 2, n)
    target_labels = rng.integers(0, 2, n)
    xs = images(source_labels, 1.0, 0.0, 0.05)
    xt = images(target_labels, 0.5, 0.2, 0.15)
    ys = keras.utils.to_categorical(source_labels, 2).astype(np.float32)
    return xs, ys, xt


def zipped(xs, ys, xt, batch: int = 16) -> tf.data.Dataset:
    source = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(batch)
    return tf.data.Dataset.zip((source, tf.data.Dataset.from_tensor_slices(xt).batch(batch)))


# --- gradient reversal ----------------------------------------------------------------------------


def test_gradient_reversal_is_identity_forward_and_negates_the_gradient():
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(5, 3)).astype(np.float32))
    upstream = rng.normal(size=(5, 3)).astype(np.float32)
    layer = GradientReversal(1.0)
    np.testing.assert_array_equal(np.asarray(layer(x)), x.numpy())
    for strength in (1.0, 0.37):
        layer.strength.assign(strength)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        gradient = tape.gradient(y, x, output_gradients=tf.constant(upstream))
        np.testing.assert_array_equal(gradient.numpy(), -np.float32(strength) * upstream)


def test_changing_strength_changes_the_gradient_without_retracing():
    layer = GradientReversal(1.0)
    x = tf.ones((2, 3))

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(layer(x) * 2.0)
        return tape.gradient(y, x)

    np.testing.assert_array_equal(gradient(x).numpy(), np.full((2, 3), -2.0, np.float32))
    layer.strength.assign(0.25)
    np.testing.assert_array_equal(gradient(x).numpy(), np.full((2, 3), -0.5, np.float32))
    assert gradient.experimental_get_tracing_count() == 1


def test_gradient_reversal_config_round_trip_and_non_trainable_strength():
    layer = GradientReversal(0.3, name="reverse")
    layer.strength.assign(0.9)  # a scheduled value is state, not config
    assert layer.get_config()["strength"] == 0.3
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 1
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer), safe_mode=True
    )
    assert isinstance(clone, GradientReversal) and clone.name == "reverse"
    assert float(clone.strength.numpy()) == pytest.approx(0.3)


def test_dann_schedule_values():
    assert dann_strength(0.0) == 0.0
    assert dann_strength(1.0, max_strength=0.8) == pytest.approx(
        0.8 * (2 / (1 + math.exp(-10)) - 1), rel=1e-12
    )
    assert dann_strength(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1, rel=1e-12)
    values = [dann_strength(p) for p in np.linspace(0, 1, 21)]
    assert all(b > a for a, b in itertools.pairwise(values))
    assert dann_strength(-1.0) == 0.0 and dann_strength(2.0) == dann_strength(1.0)


# --- alignment losses -----------------------------------------------------------------------------


def _numpy_coral(s, t):
    d = s.shape[1]
    return np.sum((np.cov(s, rowvar=False) - np.cov(t, rowvar=False)) ** 2) / (4 * d * d)


def _numpy_mmd(s, t, sigmas=None, multipliers=(0.25, 0.5, 1.0, 2.0, 4.0)):
    pooled = np.concatenate([s, t]).astype(np.float64)
    distances = ((pooled[:, None, :] - pooled[None, :, :]) ** 2).sum(-1)
    if sigmas is None:
        median = np.median(distances[~np.eye(len(pooled), dtype=bool)])
        variances = [m * m * median for m in multipliers]
    else:
        variances = [b * b for b in sigmas]
    kernel = np.mean([np.exp(-distances / (2 * v)) for v in variances], axis=0)
    n = len(s)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


def test_coral_matches_a_numpy_computation():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(40, 6)).astype(np.float32)
    t = (rng.normal(size=(30, 6)) @ rng.normal(size=(6, 6))).astype(np.float32)
    assert float(coral_loss(s, t)) == pytest.approx(_numpy_coral(s, t), rel=1e-5)


def test_mmd_matches_a_numpy_computation():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(20, 5)).astype(np.float32)
    t = rng.normal(0.5, 1.5, size=(24, 5)).astype(np.float32)
    assert float(mmd_loss(s, t)) == pytest.approx(_numpy_mmd(s, t), rel=1e-4)
    fixed = (0.5, 2.0)
    assert float(mmd_loss(s, t, bandwidths=fixed)) == pytest.approx(
        _numpy_mmd(s, t, sigmas=fixed), rel=1e-4
    )


def test_alignment_losses_are_zero_for_identical_batches_and_grow_with_the_shift():
    rng = np.random.default_rng(4)
    s = rng.normal(size=(32, 8)).astype(np.float32)
    assert abs(float(coral_loss(s, s))) < 1e-6
    assert abs(float(mmd_loss(s, s))) < 1e-6

    shifts = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    mmd_by_shift = [float(mmd_loss(s, s + shift)) for shift in shifts]
    assert all(b > a for a, b in itertools.pairwise(mmd_by_shift))
    # CORAL compares covariances only: a pure mean shift costs nothing.
    assert max(abs(float(coral_loss(s, s + shift))) for shift in shifts) < 1e-6

    mean = s.mean(axis=0)
    scales = [1.0, 1.25, 1.5, 2.0, 3.0]
    for loss in (coral_loss, mmd_loss):
        by_scale = [float(loss(s, mean + (s - mean) * k)) for k in scales]
        assert abs(by_scale[0]) < 1e-6
        assert all(b > a for a, b in itertools.pairwise(by_scale)), loss.__name__


# --- AdaBN ------------------------------------------------------------------------------------


def make_two_bn_model() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Conv2D(3, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(5, 3, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2", momentum=0.7)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, name="dense")(x)
    return keras.Model(inputs, outputs)


def _inputs_statistics(model, layer_name, images):
    """Mean and variance (ddof 0) of what the layer receives at inference, over all images."""
    probe = keras.Model(model.input, model.get_layer(layer_name).input)
    values = np.asarray(probe(images, training=False), np.float64)
    return values.mean(axis=(0, 1, 2)), values.var(axis=(0, 1, 2))


def test_adapt_batchnorm_sets_population_statistics_and_nothing_else():
    keras.utils.set_random_seed(5)
    model = make_two_bn_model()
    model.get_layer("bn2").trainable = False  # frozen layers are adapted too
    model.get_layer("bn1").moving_mean.assign([5.0, -5.0, 1.0])  # "source" statistics
    _, _, target = toy_domains(50, seed=5)
    target = target * 3.0 + 1.0
    before = {v.path: np.array(v.numpy()) for v in model.variables}

    adapted = adapt_batchnorm(model, target, batch_size=7)  # 50 = 7 * 7 + 1: uneven batches

    assert adapted == ["bn1", "bn2"]
    for name in adapted:
        layer = model.get_layer(name)
        mean, variance = _inputs_statistics(model, name, target)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-4, atol=1e-4)
        assert "call" not in layer.__dict__  # the collection hook is gone
    statistics = {f"{n}/moving_{s}" for n in adapted for s in ("mean", "variance")}
    for variable in model.variables:
        if variable.path not in statistics:
            np.testing.assert_array_equal(variable.numpy(), before[variable.path], variable.path)
        else:
            assert not np.array_equal(variable.numpy(), before[variable.path]), variable.path
    assert model.get_layer("bn1").trainable and not model.get_layer("bn2").trainable
    assert model.get_layer("bn2").momentum == 0.7 and model.get_layer("bn1").momentum == 0.99
    assert [v.path for v in model.trainable_variables] == [
        p for p in before if "moving" not in p and not p.startswith("bn2/")
    ]


def test_adapt_batchnorm_is_independent_of_batching_and_takes_datasets():
    keras.utils.set_random_seed(6)
    _, _, target = toy_domains(40, seed=6)
    model = make_two_bn_model()
    weights = model.get_weights()
    adapt_batchnorm(model, target, batch_size=40)
    whole = [v.numpy() for v in model.non_trainable_variables]

    model.set_weights(weights)
    labelled = tf.data.Dataset.from_tensor_slices((target, np.zeros(40))).batch(9)
    adapt_batchnorm(model, labelled)
    for a, b in zip(whole, [v.numpy() for v in model.non_trainable_variables], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_single_pass_adabn_is_exact_for_the_first_layer():
    keras.utils.set_random_seed(7)
    _, _, target = toy_domains(30, seed=7)
    model = make_two_bn_model()
    assert adapt_batchnorm(model, target, batch_size=8, exact=False) == ["bn1", "bn2"]
    mean, variance = _inputs_statistics(model, "bn1", target)
    np.testing.assert_allclose(model.get_layer("bn1").moving_mean.numpy(), mean, atol=1e-4)
    np.testing.assert_allclose(model.get_layer("bn1").moving_variance.numpy(), variance, atol=1e-4)


def test_adapt_batchnorm_keeps_renorm_stddev_consistent():
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Conv2D(3, 3)(inputs)
    outputs = keras.layers.BatchNormalization(renorm=True, name="bn")(x)
    model = keras.Model(inputs, outputs)
    _, _, target = toy_domains(12, seed=13)
    adapt_batchnorm(model, target)
    layer = model.get_layer("bn")
    mean, variance = _inputs_statistics(model, "bn", target)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        layer.moving_stddev.numpy(), np.sqrt(variance + layer.epsilon), rtol=1e-4
    )


# --- DomainAdaptationModel ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["coral", "mmd", "dann"])
def test_fit_on_zipped_domains(method):
    keras.utils.set_random_seed(8)
    xs, ys, xt = toy_domains()
    model = make_model(method)
    model.compile(keras.optimizers.Adam(0.02), "categorical_crossentropy", metrics=["accuracy"])
    strengths = []
    recorder = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: strengths.append(
            float(model.domain_classifier.get_layer("gradient_reversal").strength.numpy())
        )
    )
    callbacks = [GradientReversalSchedule(max_strength=0.8), recorder] if method == "dann" else []
    history = model.fit(
        zipped(xs, ys, xt),
        epochs=2,
        validation_data=(xs, ys),
        callbacks=callbacks,
        shuffle=False,
        verbose=0,
    ).history

    alignment = "domain_loss" if method == "dann" else "alignment_loss"
    expected = {"loss", "task_loss", alignment, "accuracy", "val_loss", "val_accuracy"}
    if method == "dann":
        expected.add("domain_accuracy")
    assert set(history) == expected
    assert all(np.isfinite(v).all() for v in history.values())
    assert history["task_loss"][1] < history["task_loss"][0]
    assert min(history[alignment]) > 0.0
    if method == "dann":
        assert strengths == pytest.approx([dann_strength(i / 8, 0.8) for i in range(8)])


@pytest.fixture
def float64():
    """Exact arithmetic for update comparisons: in float32, BatchNormalization's backward pass
    amplifies rounding to ~1e-4 relative, which would blur a linearity check."""
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(previous[0])
    keras.config.set_dtype_policy(previous[1])


def test_dann_reverses_the_domain_gradient_into_the_features(float64):
    """One SGD step with strength s: the feature update is task - s * weight * domain.

    s = -1 is a domain classifier *without* reversal, s = 0 cuts it off: the domain part of the
    feature update flips sign, equals plain backprop of the domain loss, and leaves the head
    and the domain classifier's own update alone.
    """
    keras.utils.set_random_seed(9)
    xs, ys, xt = (a.astype(np.float64) for a in toy_domains(24, seed=9))
    lr, weight = 0.1, 0.5
    model = make_model("dann", weight=weight, dropout=0.0)
    model.compile(keras.optimizers.SGD(lr), "categorical_crossentropy")
    batch = ((tf.constant(xs[:12]), tf.constant(ys[:12])), tf.constant(xt[:12]))
    initial = model.get_weights()
    reverse = model.domain_classifier.get_layer("gradient_reversal")

    def step(strength):
        model.set_weights(initial)
        reverse.strength.assign(strength)
        model.train_step(batch)
        return {v.path: v.numpy() - w for v, w in zip(model.weights, initial, strict=True)}

    reversed_, cut, plain = step(1.0), step(0.0), step(-1.0)

    model.set_weights(initial)
    features = model.features.trainable_variables
    with tf.GradientTape() as tape:
        z = model.features(tf.concat([xs[:12], xt[:12]], 0), training=True)
        for layer in model.domain_classifier.layers[1:]:  # skip the reversal
            z = layer(z, training=True)
        domains = tf.concat([tf.zeros((12, 1), tf.float64), tf.ones((12, 1), tf.float64)], 0)
        domain_loss = tf.reduce_mean(keras.losses.binary_crossentropy(domains, z, True))
    backprop = dict(
        zip([v.path for v in features], tape.gradient(domain_loss, features), strict=True)
    )

    for path in backprop:
        domain_part = plain[path] - cut[path]
        np.testing.assert_allclose(domain_part, -lr * weight * backprop[path].numpy(), atol=1e-12)
        np.testing.assert_allclose(reversed_[path] - cut[path], -domain_part, atol=1e-12)
    assert max(np.abs(backprop[p].numpy()).max() for p in backprop) > 1e-3
    others = [v.path for v in model.trainable_variables if v.path not in backprop]
    assert len(others) == 6  # head kernel/bias, domain classifier 2 x kernel/bias
    for path in others:
        np.testing.assert_allclose(reversed_[path], cut[path], atol=1e-14)
        np.testing.assert_allclose(plain[path], cut[path], atol=1e-14)


def test_sample_weights_in_the_source_and_class_weight_guard():
    keras.utils.set_random_seed(10)
    xs, ys, xt = toy_domains(8, seed=10)
    model = make_model("coral")
    model.compile("sgd", "categorical_crossentropy")
    zero = model.train_step(((xs, ys, np.zeros(8, np.float32)), (xt,)))
    assert float(zero["task_loss"]) == 0.0
    one = model.train_step(((xs, ys, np.ones(8, np.float32)), xt))
    assert float(one["task_loss"]) > 0.1
    with pytest.raises(ValueError, match="with_class_weights"):
        model.fit(zipped(xs, ys, xt), class_weight={0: 1.0, 1: 2.0}, verbose=0)

    source = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(8)
    _, targets, weights = next(iter(with_class_weights(source, {0: 1.0, 1: 3.0})))
    np.testing.assert_array_equal(weights.numpy(), np.where(ys[:, 1] == 1, 3.0, 1.0))
    np.testing.assert_array_equal(targets.numpy(), ys)


def test_constructor_rejects_a_dann_without_reversal():
    with pytest.raises(ValueError, match="needs a domain_classifier"):
        DomainAdaptationModel(make_features(), make_head(), method="dann")
    no_reversal = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="no GradientReversal"):
        DomainAdaptationModel(
            make_features(), make_head(), method="dann", domain_classifier=no_reversal
        )
    with pytest.raises(ValueError, match="does not use"):
        DomainAdaptationModel(
            make_features(), make_head(), domain_classifier=domain_classifier(FEATURES)
        )


def test_fit_under_a_distribution_strategy():
    """Keras builds compiled metrics from an (x, y) unpacking of one batch under a strategy."""
    xs, ys, xt = toy_domains(32, seed=11)
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = make_model("mmd")
        model.compile("adam", "categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(zipped(xs, ys, xt), epochs=1, shuffle=False, verbose=0).history
    assert np.isfinite(history["alignment_loss"][0]) and "accuracy" in history


def test_save_load_and_export_only_carry_the_classifier(tmp_path):
    keras.utils.set_random_seed(12)
    xs, ys, xt = toy_domains(32, seed=12)
    model = make_model("dann")
    model.compile("adam", "categorical_crossentropy", metrics=["accuracy"])
    model.fit(
        zipped(xs, ys, xt),
        epochs=1,
        callbacks=[GradientReversalSchedule()],
        shuffle=False,
        verbose=0,
    )
    expected = model.predict(xt, verbose=0)
    strength = float(model.domain_classifier.get_layer("gradient_reversal").strength.numpy())
    assert strength > 0

    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    assert isinstance(loaded, DomainAdaptationModel)
    assert (loaded.method, loaded.weight) == ("dann", 0.5)
    np.testing.assert_array_equal(loaded.predict(xt, verbose=0), expected)
    reverse = loaded.domain_classifier.get_layer("gradient_reversal")
    assert float(reverse.strength.numpy()) == strength
    assert int(loaded.optimizer.iterations.numpy()) == 2
    assert adapt_batchnorm(loaded, xt) == ["bn"]  # nested BN layers are found

    model.export(tmp_path / "sm", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "sm"))
    outputs = served.signatures["serving_default"](tf.constant(xt))
    (probabilities,) = outputs.values()
    np.testing.assert_allclose(probabilities.numpy(), expected, atol=1e-5)
    inference = model.features.variables + model.head.variables
    assert sorted(v.name for v in served.variables) == sorted(f"{v.path}:0" for v in inference)
    saved_shapes = [
        shape
        for name, shape in tf.train.list_variables(str(tmp_path / "sm" / "variables" / "variables"))
        if name.endswith("VARIABLE_VALUE")
    ]
    assert [FEATURES, HIDDEN] not in saved_shapes and [] not in saved_shapes


# --- models saved by earlier versions ---------------------------------------------------------

# A GradientReversal as a model saved before adaptation.py became a package names it (copied
# from such a file's config.json): the old module, and the registered name Keras looks up.
OLD_REVERSAL_CONFIG = """
{"module": "medtransfer.models.adaptation", "class_name": "GradientReversal",
 "config": {"name": "reverse", "trainable": true, "dtype": {"module": "keras",
   "class_name": "DTypePolicy", "config": {"name": "float32"}, "registered_name": null},
   "strength": 0.3},
 "registered_name": "medtransfer>GradientReversal", "build_config": {"input_shape": [null, 4]}}
"""


@pytest.mark.parametrize(
    ("cls", "registered"),
    [
        (GradientReversal, "medtransfer>GradientReversal"),
        (DomainAdaptationModel, "medtransfer>DomainAdaptationModel"),
    ],
)
def test_registered_names_stay_those_saved_models_refer_to(cls, registered):
    """Keras finds a custom class in a .keras file by its registered name: moving or renaming
    the class must keep it, or every model saved before stops loading."""
    assert keras.saving.get_registered_name(cls) == registered
    assert keras.saving.get_registered_object(registered) is cls


def test_a_layer_saved_before_the_package_split_loads():
    layer = keras.saving.deserialize_keras_object(json.loads(OLD_REVERSAL_CONFIG), safe_mode=True)
    assert isinstance(layer, GradientReversal) and layer.name == "reverse"
    assert layer.initial_strength == 0.3


# --- the method registry ----------------------------------------------------------------------


def test_the_spec_accepts_exactly_the_registered_methods():
    assert typing.get_args(SpecMethodNames) == tuple(ADAPTATION_METHODS)


def test_every_aligning_method_has_its_loss_and_the_model_trains_only_those():
    for name, method in ADAPTATION_METHODS.items():
        assert method.name == name and method.description
        if method.aligns_features:
            assert method.alignment_loss in ALIGNMENT_LOSSES, name
        assert method.aligns_features or not method.needs_domain_classifier, name
        assert method.uses_target_images == (name != "none")
    assert ALIGNMENT_METHODS == ("dann", "coral", "mmd")
    with pytest.raises(ValueError, match="method must be one of"):
        DomainAdaptationModel(make_features(), make_head(), method="adabn")


def test_the_method_registry_loads_without_tensorflow():
    """The spec validates method names against the registry; a spec loads without Keras."""
    code = (
        "import sys, medtransfer.models.adaptation_methods; "
        "print(sorted(m for m in ('keras', 'tensorflow') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
