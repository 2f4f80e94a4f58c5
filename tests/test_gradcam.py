"""Grad-CAM and Grad-CAM++: the target layer every backbone family gets, heatmaps checked
against an independent class activation map, a hand-built model whose answer is known, the
tabular (dict-input) form, a model reloaded from a run, tracing for export, the pointing game
and the overlay figure."""

from __future__ import annotations

import io
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from medtransfer.evaluation.gradcam import CamModel, default_target_layer, grad_cam, grad_cam_fn
from medtransfer.evaluation.plots import cam_overlay_figure
from medtransfer.evaluation.pointing import heatmap_peaks, point_hits, pointing_game
from medtransfer.models.build import build_model
from medtransfer.models.layers import BackbonePreprocessing, ChannelAdapter
from medtransfer.spec import spec_from_dict


def make_spec(backbone: str, size: int = 64, tabular=None, data=None):
    """A spec for build_model only: the data path must exist but is never read."""
    return spec_from_dict(
        {
            "name": "cam",
            "task": "binary",
            "classes": ["normal", "finding"],
            "data": data or {"format": "folders", "path": str(Path(__file__).parent)},
            "image": {"size": [size, size], "channels": 1},
            "model": {"backbone": backbone, "weights": "none"},
            **({"tabular": tabular} if tabular else {}),
        }
    )


def images(n: int = 2, height: int = 72, width: int = 56, seed: int = 0) -> np.ndarray:
    """Noise with one bright square per image, at another size than the model's input."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 0.4, (n, height, width, 1)).astype(np.float32)
    for i in range(n):
        r, c = rng.integers(0, height - 16), rng.integers(0, width - 16)
        x[i, r : r + 16, c : c + 16] = 0.95
    return x


def independent_cam(
    model: keras.Model, x: np.ndarray, class_index: int, reference: np.ndarray | None = None
) -> np.ndarray:
    """Grad-CAM computed without gradients, for a backbone whose target layer feeds global
    average pooling straight into the linear head: then the gradient of the class log-odds is
    the same for every location, W[:, c] - W[:, other] divided by h * w, so Grad-CAM is the
    class activation map relu(A . (W[:, c] - W[:, other])) of Zhou et al. 2016; from a
    reference, relu((A - mean of the reference's A) . (W[:, c] - W[:, other])). The layers are
    called one by one here, not through CamModel's re-wiring."""
    backbone = model.get_layer("backbone")
    (target,) = [op for op in backbone.operations if op.name == default_target_layer(model)]
    target_model = keras.Model(backbone.input, target.output)

    def target_features(images: np.ndarray) -> np.ndarray:
        t = tf.constant(images)
        for name in ("resize", "to_rgb", "backbone_preprocessing"):
            t = model.get_layer(name)(t)
        return target_model(t, training=False).numpy()

    features = target_features(x)
    if reference is not None:
        features = features - target_features(reference).mean(axis=0)
    kernel = model.get_layer("probabilities").kernel.numpy()
    direction = kernel[:, class_index] - kernel[:, 1 - class_index]
    cam = np.maximum(features @ direction, 0.0)
    cam = tf.image.resize(cam[..., None], x.shape[1:3], method="bilinear")[..., 0].numpy()
    low = cam.min(axis=(1, 2), keepdims=True)
    span = cam.max(axis=(1, 2), keepdims=True) - low
    return np.divide(cam - low, span, out=np.zeros_like(cam), where=span > 0)


# --- every backbone family ------------------------------------------------------------------------

FAMILIES = ["resnet50", "densenet121", "efficientnetb0", "mobilenetv3small", "convnexttiny"]
# Regression check on the generic choice: these names come from Keras applications.
EXPECTED_LAYER = {"resnet50": "conv5_block3_out", "efficientnetb0": "top_activation"}


@pytest.mark.parametrize(
    "backbone",
    # DenseNet and ConvNeXt (~25 s together) in the slow set: the default suite's time budget
    [
        pytest.param(b, marks=pytest.mark.slow) if b in ("densenet121", "convnexttiny") else b
        for b in FAMILIES
    ],
)
def test_default_layer_is_the_last_feature_map_and_heatmaps_are_well_formed(backbone):
    keras.utils.set_random_seed(0)
    model = build_model(make_spec(backbone))
    name = default_target_layer(model)
    inner = model.get_layer("backbone")
    spatial = [
        op
        for op in inner.operations
        if not isinstance(op, keras.layers.InputLayer) and len(op.output.shape) == 4
    ]
    assert name == spatial[-1].name
    assert tuple(spatial[-1].output.shape) == (None, 2, 2, spatial[-1].output.shape[-1])
    # The last pooling (EfficientNet and MobileNetV3 pool inside squeeze-excite blocks too)
    # takes the target's output directly: nothing spatial happens in between.
    pooling = [op for op in inner.layers if isinstance(op, keras.layers.GlobalAveragePooling2D)]
    assert pooling[-1].input is spatial[-1].output
    if backbone in EXPECTED_LAYER:
        assert name == EXPECTED_LAYER[backbone]
    if backbone == "convnexttiny":  # the residual sum, an operation that is not a layer
        assert name.startswith("add") and name not in {layer.name for layer in inner.layers}

    x = images()
    both = np.concatenate([x, x])  # every image for class 0, then for class 1: one call
    heatmaps = grad_cam(model, both, [0, 0, 1, 1])
    assert heatmaps.shape == (4, 72, 56) and heatmaps.dtype == np.float32
    assert np.isfinite(heatmaps).all() and heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    for i in range(2):  # the classes' log-odds are S and -S, so the maps relu(m) and relu(-m)
        spans = [np.ptp(heatmaps[i]), np.ptp(heatmaps[i + 2])]  # and one of them is not flat
        assert max(spans) == pytest.approx(1.0, abs=1e-6)
    if backbone == "convnexttiny":
        # No closed form (ConvNeXt normalises after pooling), and every eager ConvNeXt pass
        # costs seconds (its grouped convolutions are compiled by XLA on each call).
        return
    expected = np.concatenate([independent_cam(model, x, 0), independent_cam(model, x, 1)])
    np.testing.assert_allclose(heatmaps, expected, atol=2e-4)
    reference = images(3, seed=1)
    from_reference = grad_cam(model, x, 1, reference=reference, batch_size=2)
    np.testing.assert_allclose(from_reference, independent_cam(model, x, 1, reference), atol=2e-4)
    assert np.abs(from_reference - heatmaps[2:]).max() > 0.05  # the reference changed them
    # The re-wired forward pass is the model's: its class scores are the model's log-odds.
    _, scores = CamModel(model).features_and_scores(x)
    p = np.asarray(model(tf.constant(x), training=False), np.float64)
    np.testing.assert_allclose(scores.numpy()[:, 1], np.log(p[:, 1] / p[:, 0]), atol=1e-4)
    np.testing.assert_allclose(scores.numpy()[:, 0], -scores.numpy()[:, 1], atol=1e-6)


# --- a hand-built model whose answer is known ---------------------------------------------------

RED = (slice(12, 24), slice(40, 56))  # rows 12..23, cols 40..55 of a 48 x 64 image
GREEN = (slice(30, 42), slice(8, 24))
RED_BOX, GREEN_BOX = (12, 40, 23, 55), (30, 8, 41, 23)  # (row_min, col_min, row_max, col_max)


def hand_built_model() -> keras.Model:
    """A model with medtransfer's layer names and structure (resize to 32 x 32, channel
    adapter, preprocessing, nested backbone, dropout, softmax head) whose 'backbone' is one
    strided convolution with fixed weights: 8 x 8 cells of 4 x 4 pixels, channel 0 the red
    light in a cell, channel 1 the green, channel 2 both. The head adds red (+1) and half of
    channel 2 (+0.5) and subtracts green (-1) for 'finding', the opposite for 'normal'; the
    dropout rate of 0.9 would scramble the answer unless inference mode is used."""
    cell = keras.Input((32, 32, 3))
    detector = keras.layers.Conv2D(3, 4, strides=4, use_bias=False, name="detector")
    features = keras.layers.ReLU(name="features")(detector(cell))
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    backbone = keras.Model(cell, pooled, name="backbone")
    kernel = np.zeros((4, 4, 3, 3), np.float32)
    kernel[:, :, 0, 0] = kernel[:, :, 0, 2] = 1 / (16 * 255)  # raw255 preprocessing
    kernel[:, :, 1, 1] = kernel[:, :, 1, 2] = 1 / (16 * 255)
    detector.set_weights([kernel])

    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Resizing(32, 32, antialias=True, name="resize")(image)
    x = ChannelAdapter(3, name="to_rgb")(x)
    x = BackbonePreprocessing("raw255", name="backbone_preprocessing")(x)
    x = keras.layers.Dropout(0.9, name="head_dropout")(backbone(x))
    dense = keras.layers.Dense(2, activation="softmax", name="probabilities")
    model = keras.Model(image, dense(x))
    evidence = np.array([1.0, -1.0, 0.5], np.float32)
    dense.set_weights([np.stack([-evidence, evidence], axis=1), np.zeros(2, np.float32)])
    return model


def near(box: tuple[int, int, int, int]) -> np.ndarray:
    """A 48 x 64 mask of the box grown by one feature cell (6 rows, 8 columns) on each side."""
    mask = np.zeros((48, 64), bool)
    mask[max(box[0] - 6, 0) : box[2] + 7, max(box[1] - 8, 0) : box[3] + 9] = True
    return mask


def two_squares(n: int = 3) -> np.ndarray:
    x = np.zeros((n, 48, 64, 3), np.float32)
    x[(slice(None), *RED, 0)] = 1.0
    x[(slice(None), *GREEN, 1)] = 1.0
    x += np.random.default_rng(1).uniform(0, 0.02, x.shape).astype(np.float32)  # faint noise
    return x


@pytest.fixture(scope="module")
def known():
    return hand_built_model(), two_squares()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heatmap_points_at_the_evidence_for_the_class_asked_for(known, method):
    model, x = known
    assert default_target_layer(model) == "features"
    finding = grad_cam(model, x, 1, method=method)
    normal = grad_cam(model, x, 0, method=method)
    assert finding.shape == (3, 48, 64)
    # The faint noise breaks the tie between the square's four feature cells: the peak is
    # the centre of one of them, inside the square (tolerance 0), not the square's centre.
    assert point_hits(heatmap_peaks(finding), [RED_BOX] * 3, tolerance=0).all()
    assert point_hits(heatmap_peaks(normal), [GREEN_BOX] * 3, tolerance=0).all()
    # Nothing lights up beyond the square's neighbouring feature cells (6 x 8 pixels each) but
    # the faint noise (about 1% of the square's evidence). Grad-CAM++ also shows the green
    # square for 'finding', by design (next test).
    lit = near(RED_BOX) | (near(GREEN_BOX) if method == "gradcam++" else False)
    assert finding[:, ~lit].max() < 0.03 and normal[:, ~near(GREEN_BOX)].max() < 0.03
    # The pre-activation convolution is an explicit, equally valid target here.
    before_relu = grad_cam(model, x, 1, method=method, layer="detector")
    np.testing.assert_allclose(before_relu, finding, atol=1e-5)


SHARED = (slice(36, 48), slice(48, 64))  # bottom-right corner, in every image
SHARED_BOX = (36, 48, 47, 63)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_a_reference_removes_what_every_image_shows(known, method):
    """Every image shows a bright red square in its corner, like the border activations that
    a network trained from scratch has for every image; only the explained images also show a
    fainter red square (the finding). Plain Grad-CAM points at the bright shared square;
    measured from the mean of images that show only the shared one, the map points at the
    finding and the shared square drops to (nearly) zero."""
    model, _ = known
    noise = np.random.default_rng(2).uniform(0, 0.02, (6, 48, 64, 3)).astype(np.float32)
    everyone = noise.copy()
    everyone[(slice(None), *SHARED, 0)] = 1.0
    finding = everyone[:3].copy()
    finding[(slice(None), *RED, 0)] = 0.6
    reference = everyone[3:]
    plain = grad_cam(model, finding, 1, method=method)
    assert point_hits(heatmap_peaks(plain), [SHARED_BOX] * 3, tolerance=0).all()
    relative = grad_cam(model, finding, 1, method=method, reference=reference)
    assert point_hits(heatmap_peaks(relative), [RED_BOX] * 3, tolerance=0).all()
    assert relative[(slice(None), *SHARED)].max() < 0.1
    # An image measured from itself has nothing to show.
    assert not grad_cam(model, reference[:1], 1, method=method, reference=reference[:1]).any()


def test_gradcam_plus_plus_differs_but_agrees_on_the_maximum(known):
    """For 'finding', channel 2 (both squares) has a positive weight but red minus green
    cancels it on the green square: Grad-CAM gives the green square 0. Grad-CAM++ weights
    only positive gradients, channel by channel: w_k = h w relu(g_k) / (2 + g_k sum A^k) with
    g = (1, -1, 0.5) * 2 / (h w) and sum A = (4, 4, 8) cells, so green keeps channel 2's share:
    (0.5 / 2.125) / (1 / 2.125 + 0.5 / 2.125) = 1/3 of red's value (at the cells' centres;
    bilinear upsampling ramps down towards the squares' edges)."""
    model, x = known
    plain = grad_cam(model, x, 1)
    plus = grad_cam(model, x, 1, method="gradcam++")
    assert np.abs(plus - plain).max() > 0.3
    assert plain[(slice(None), *GREEN)].max() < 0.01  # 0 but for the noise
    np.testing.assert_allclose(plus[(slice(None), *GREEN)].max(axis=(1, 2)), 1 / 3, atol=0.03)
    # Both maxima on the red square (on which of its four cells is up to the noise).
    for heatmaps in (plain, plus):
        assert point_hits(heatmap_peaks(heatmaps), [RED_BOX] * 3, tolerance=0).all()


def test_class_index_forms_and_refusals(known):
    model, x = known
    per_image = grad_cam(model, x, [1, 0, 1])
    np.testing.assert_allclose(per_image[1], grad_cam(model, x[1:2], 0)[0], atol=1e-6)
    # None: the predicted class, 'finding' here (red + 0.5 * both outweighs green)
    np.testing.assert_allclose(grad_cam(model, x, None), grad_cam(model, x, 1), atol=1e-6)
    np.testing.assert_allclose(grad_cam(model, x, 1, batch_size=2), grad_cam(model, x, 1))
    with pytest.raises(ValueError, match=r"not in 0\.\.1"):
        grad_cam(model, x, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        grad_cam(model, x, 1, method="cam")
    with pytest.raises(ValueError, match=r"'pool'.*not 4-D"):
        grad_cam(model, x, 1, layer="pool")
    with pytest.raises(ValueError, match=r"'conv5'.*no such layer"):
        grad_cam(model, x, 1, layer="conv5")


def test_a_savedmodel_or_foreign_model_is_refused_with_a_pointer_to_the_keras_model():
    with pytest.raises(TypeError, match=r"load_run_model\(run_dir\).*SavedModel keeps no layers"):
        CamModel(tf.Module())
    plain = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten()])
    with pytest.raises(ValueError, match="no layer 'backbone'"):
        CamModel(plain)


# --- tabular inputs, a reloaded run, tracing for export -------------------------------------------


def test_tabular_model_takes_the_dict_and_reloads_from_a_run_with_the_same_heatmaps(tmp_path):
    from medtransfer.models.saved import load_keras_model
    from medtransfer.rundir import MODEL_FILE

    manifest = tmp_path / "manifest.csv"
    table = {"path": ["a.png", "b.png"], "label": ["normal", "finding"], "age": [40, 60]}
    pd.DataFrame(table).to_csv(manifest, index=False)
    spec = make_spec(
        "mobilenetv3small",
        tabular=[{"name": "age", "type": "numeric"}],
        data={"format": "manifest", "path": str(manifest)},
    )
    keras.utils.set_random_seed(0)
    model = build_model(spec, {"age": (50.0, 10.0)})
    x = np.repeat(images(1), 3, axis=0)
    ages = np.array([30.0, 80.0, np.nan], np.float32)  # 1-D is accepted, NaN = missing
    # training=False matters: Keras' Resizing declares training=True as its default, which a
    # bare model(x) passes on to the backbone (BatchNormalization in training mode).
    inputs = {"image": tf.constant(x), "age": tf.constant(ages[:, None])}
    p = np.asarray(model(inputs, training=False))
    assert np.abs(p[0] - p[1]).max() > 1e-4 and np.abs(p[0] - p[2]).max() > 1e-4
    _, scores = CamModel(model).features_and_scores({"image": x, "age": ages})
    np.testing.assert_allclose(scores.numpy()[:, 1], np.log(p[:, 1] / p[:, 0]), atol=1e-4)

    model.save(tmp_path / MODEL_FILE)  # after CamModel: re-wiring must leave the model intact
    loaded = load_keras_model(tmp_path / MODEL_FILE)  # what load_run_model(run_dir) does
    assert default_target_layer(loaded) == default_target_layer(model)
    for method in ("gradcam", "gradcam++"):
        # The head is linear in [image features, tabular]: the score's gradient at the feature
        # map, hence the heatmap, cannot depend on the age, although the probability does.
        heatmaps = grad_cam(model, {"image": x, "age": ages}, 1, method=method)
        assert np.ptp(heatmaps[0]) > 0.5
        np.testing.assert_allclose(heatmaps[1:], heatmaps[[0, 0]], atol=1e-5)
        reloaded = grad_cam(loaded, {"image": x, "age": ages}, 1, method=method)
        np.testing.assert_allclose(reloaded, heatmaps, atol=1e-5)
    with pytest.raises(ValueError, match=r"tabular inputs \['age'\]"):
        grad_cam(model, x, 1)
    with pytest.raises(ValueError, match=r"lack \['age'\]"):
        grad_cam(model, {"image": x}, 1)


def test_grad_cam_fn_traces_for_any_batch_and_image_size(known):
    model, _ = known
    fn = tf.function(
        grad_cam_fn(model, "gradcam++", class_index=1),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="image")],
    )
    concrete = fn.get_concrete_function()
    assert concrete.structured_outputs.shape.as_list() == [None, None, None]
    x = two_squares(2)
    np.testing.assert_allclose(fn(x).numpy(), grad_cam(model, x, 1, method="gradcam++"), atol=1e-5)
    small = x[:1, ::2, ::2]  # another batch size and image size, same graph
    assert fn(small).shape == (1, 24, 32)
    assert fn.experimental_get_tracing_count() == 1


# --- pointing game and figure ---------------------------------------------------------------------


def test_pointing_game_counts_hits_exactly():
    maps = np.zeros((6, 40, 40), np.float32)
    maps[0, 10, 10] = 1.0  # inside circle (10, 12, r 3)
    maps[1, 10, 29] = 1.0  # 17 px from the centre of circle (10, 12, r 3): 14 px off its rim
    maps[2, 10, 35] = 1.0  # 20 px off the rim: a miss at 15 px tolerance
    maps[3, 30:34, 0:4] = 1.0  # a plateau: points at its centroid (31.5, 1.5), inside the box
    maps[4] = 0.5  # constant: points nowhere
    maps[5, 0, 0] = maps[5, 39, 39] = 1.0  # tie: centroid (19.5, 19.5), on the circle's rim
    findings = [(10, 12, 3), (10, 12, 3), (10, 12, 3), (28, 0, 33, 3), (20, 20, 5), (25, 19.5, 5.5)]
    np.testing.assert_allclose(
        heatmap_peaks(maps)[[0, 3, 5]], [[10, 10], [31.5, 1.5], [19.5, 19.5]]
    )
    assert np.isnan(heatmap_peaks(maps)[4]).all()
    assert pointing_game(maps, findings) == (4, 6)  # 0, 1, 3, 5
    assert pointing_game(maps, findings, tolerance=0) == (3, 6)  # 0, 3, 5
    assert pointing_game(maps, findings, tolerance=20) == (5, 6)  # and 2, 20 px off the rim
    hits = point_hits([[5.0, 5.0], [0.0, 10.0]], [(0, 0, 4, 4), (0, 0, 4, 4)], tolerance=6)
    assert hits.tolist() == [True, True]  # 1.41 px and 6 px from the box
    with pytest.raises(ValueError, match="2 points but 1 findings"):
        point_hits([[0, 0], [1, 1]], [(0, 0, 1)])


def test_overlay_figure_has_one_panel_of_two_images_per_input():
    rng = np.random.default_rng(0)
    x, heatmaps = rng.random((5, 30, 20, 1)), rng.random((5, 30, 20))
    fig = cam_overlay_figure(x, heatmaps, titles=[f"p={i / 10}" for i in range(5)], alpha=0.3)
    assert len(fig.axes) == 5  # a 2 x 4 grid less its 3 empty cells
    for i, ax in enumerate(fig.axes):
        grey, overlay = ax.get_images()
        assert grey.get_cmap().name == "gray" and overlay.get_cmap().name == "jet"
        assert overlay.get_alpha() == 0.3 and ax.get_title() == f"p={i / 10}"
        np.testing.assert_allclose(overlay.get_array(), heatmaps[i])
    fig.savefig(io.BytesIO(), format="png")  # renders headless
    with pytest.raises(ValueError, match="2 titles for 5 images"):
        cam_overlay_figure(x, heatmaps, titles=["a", "b"])


@pytest.mark.parametrize(
    ("backbone", "size", "expected"),
    [
        ("resnet50", 96, "conv3_block4_out"),  # 12 x 12 (the last map is 3 x 3)
        ("resnet50", 128, "conv3_block4_out"),  # 16 x 16: the quickstart's size
        ("resnet50", 224, "conv4_block6_out"),  # 14 x 14
        ("resnet50", 384, "conv5_block3_out"),  # 12 x 12: the last feature map itself
        ("efficientnetb0", 96, "block4a_expand_activation"),  # not the stride's zero padding
    ],
)
def test_localising_layer_is_the_last_map_with_a_fine_enough_grid(backbone, size, expected):
    from medtransfer.evaluation.gradcam import localising_layer

    model = build_model(make_spec(backbone, size=size))
    assert localising_layer(model) == expected
