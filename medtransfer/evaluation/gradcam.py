"""Grad-CAM and Grad-CAM++ heatmaps for medtransfer models.

Where did the model look? Grad-CAM (Selvaraju et al. 2017) weights the channels of a spatial
feature map by the gradient of a class score and keeps the positive part; Grad-CAM++
(Chattopadhay et al. 2018) weights each location's gradient so that several separate regions of
evidence all show, instead of the largest one dominating. Both are computed at the backbone's
last spatial feature map by default (``layer=`` takes another, ``reference=`` measures from
reference images), then resized bilinearly to the input image, so a heatmap lies on the image
the caller passed in, whatever size it was (the model stretches every image to its training
size in the graph, and the heatmap is stretched back the same way).

The class score S is the class's log-odds, computed from the head's pre-activation logits
rather than read off the probability. For a sigmoid head (multilabel) that is the logit; for
the softmax head it is ``z_c - logsumexp_{j != c} z_j`` = log(p_c / (1 - p_c)), which for the
two-class softmax of a binary task is ``z_1 - z_0``, exactly the logit of the sigmoid that
two-class softmax equals. Why not the probability: its gradient is p (1 - p) times the
log-odds' gradient, a per-image factor that normalisation would remove, but in float32 1 - p
rounds to 0 once p is within about 3e-8 of 1, and the gradient of the case most worth
explaining is then rounding error; the logit does not saturate. Why not ``z_c`` alone:
softmax ignores a shift common to all logits, so part of ``z_c``'s gradient is evidence for no
class at all. Grad-CAM++'s closed form explains exp(S): with the log-odds, the odds p / (1 - p).

Read the maps with the Grad-CAM pointing game of ``benchmarks/RESULTS.md`` in mind (scored by
``evaluation.pointing``, overlays drawn by ``plots.cam_overlay_figure``). On the synthetic
chest data, a ResNet50 trained from scratch at the quickstart's 128 px has a 4 x 4 last
feature map whose Grad-CAM maximum sits at the image border, on the nodule in 2-14 of 40 test
positives, although occlusion shows that the decision rests on the nodule. Two changes fix it:
a finer map (``localising_layer``: 16 x 16 there) and measuring each image's features from
the mean feature map of images without the finding (``grad_cam(reference=...)``), which
removes what the network shows for every image. Together they hit the nodule in 37-40 of 40
(four datasets), more than a fixed point where nodules usually are (35-48%). The evaluation
report uses both. A heatmap is a hypothesis about the model, not a segmentation.

This works on the Keras model of a run (``load_run_model(run_dir)``, i.e. the run's
``model.keras``): it re-wires the model's own layers and needs them by name (``resize`` ...
``backbone_preprocessing``, the nested ``backbone`` Model, the optional ``fusion`` of the tabular
branch, ``head_dropout``, ``probabilities``; see ``medtransfer.models.build``). An exported
SavedModel keeps no layers, so Grad-CAM cannot be computed from it after the fact; to serve
heatmaps, add ``grad_cam_fn(model, method)`` as an extra endpoint when exporting.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

Method = Literal["gradcam", "gradcam++"]
METHODS: tuple[str, ...] = ("gradcam", "gradcam++")

Inputs = np.ndarray | tf.Tensor | Mapping[str, Any]
ClassIndex = int | Sequence[int] | np.ndarray | None


class CamModel:
    """A medtransfer model re-wired to return (target feature map, class log-odds) in one pass.

    Views of the model's own graph, sharing its variables: the image path up to the backbone's
    input (resize, channel adapter, backbone preprocessing), the backbone from its input to both
    the target layer's output and its pooled output, and the tabular branch from its inputs to
    the ``fusion`` layer. Each starts at real ``Input`` tensors: a Functional model started at an
    intermediate tensor (the pooled features, say) would clone graph nodes onto the model's own
    layers, after which the model no longer saves. The head after the pooling is therefore
    applied by hand, as ``build_model`` makes it: ``fusion`` (when present), ``head_dropout``
    in inference mode, then the ``probabilities`` kernel and bias without the activation.
    BatchNormalization runs in inference mode throughout.

    ``layer`` names any operation inside the backbone with a 4-D output (``backbone.operations``
    rather than ``backbone.layers``: ConvNeXt's residual additions are operations, not layers);
    the default is ``default_target_layer``.
    """

    def __init__(self, model: keras.Model, layer: str | None = None):
        if not isinstance(model, keras.Model):
            raise TypeError(
                "Grad-CAM needs the Keras model of a run (load_run_model(run_dir), the "
                f"run's model.keras), not a {type(model).__name__}: an exported SavedModel keeps "
                "no layers to take gradients at. Export grad_cam_fn(model, method) as an extra "
                "endpoint to serve heatmaps."
            )
        backbone = _layer(model, "backbone")
        if not isinstance(backbone, keras.Model):
            raise ValueError("the model's 'backbone' layer is not a nested Keras model")
        target = _spatial_operation(backbone, layer)
        self.model = model
        self.layer_name: str = target.name
        names = list(model.input) if isinstance(model.input, Mapping) else []
        self.tabular_names: list[str] = [name for name in names if name != "image"]
        self.has_tabular = bool(names)
        image = model.input["image"] if self.has_tabular else model.input
        self.channels: int = int(image.shape[-1])
        self._image = keras.Model(image, _layer(model, "backbone_preprocessing").output)
        self._backbone = keras.Model(backbone.input, [target.output, backbone.output])
        self._fusion = _layer(model, "fusion", required=False)
        self._tabular = None
        if self._fusion is not None:
            tabular = [model.input[name] for name in self.tabular_names]
            self._tabular = keras.Model(tabular, self._fusion.input[1])
        self._dropout = _layer(model, "head_dropout")
        dense = _layer(model, "probabilities")
        _check_head(self._fusion, self._dropout, dense)
        self._kernel, self._bias = dense.kernel, dense.bias
        activation = getattr(dense.activation, "__name__", str(dense.activation))
        self.n_classes: int = int(dense.units)
        self._softmax = activation == "softmax" and self.n_classes > 1

    def features_and_scores(
        self, inputs: Inputs, *, watch: tf.GradientTape | None = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """(feature map [N, h, w, k], log-odds of every class [N, K]), float32.

        ``watch``: a tape to record on. It watches the backbone's input, so every operation
        after it is recorded even when the backbone's variables are frozen (a tape only records
        operations on watched tensors or trainable variables).
        """
        image, tabular = self._split(inputs)
        x = self._image(image, training=False)
        if watch is not None:
            watch.watch(x)
        features, hidden = self._backbone(x, training=False)
        if self._fusion is not None:
            hidden = self._fusion([hidden, self._tabular(tabular, training=False)])
        hidden = self._dropout(hidden, training=False)
        logits = tf.matmul(tf.cast(hidden, tf.float32), self._kernel) + self._bias
        return tf.cast(features, tf.float32), self._log_odds(logits)

    def heatmaps(
        self,
        inputs: Inputs,
        class_index: ClassIndex = None,
        method: Method = "gradcam",
        reference: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """Heatmaps [N, H, W] in [0, 1] at the input images' size; TensorFlow ops only, so it
        traces under ``tf.function``. ``class_index`` None: each image's predicted class.
        ``reference``: a mean feature map [h, w, k] (``mean_features``) that the image's
        features are measured from (see ``grad_cam``)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        image, _ = self._split(inputs)
        with tf.GradientTape() as tape:
            features, scores = self.features_and_scores(inputs, watch=tape)
            index = self._class_index(class_index, scores)
            score = tf.gather(scores, index, batch_dims=1)
        # One gradient of the batch's summed score is every image's own gradient: in inference
        # mode no image's score depends on another image.
        gradients = tape.gradient(score, features)
        if method == "gradcam":
            weights = tf.reduce_mean(gradients, axis=(1, 2))
        else:
            weights = _gradcam_plus_plus_weights(features, gradients)
        if reference is not None:
            features = features - reference
        cam = tf.nn.relu(tf.einsum("nhwk,nk->nhw", features, weights))
        cam = tf.image.resize(cam[..., None], tf.shape(image)[1:3], method="bilinear")[..., 0]
        low = tf.reduce_min(cam, axis=(1, 2), keepdims=True)
        span = tf.reduce_max(cam, axis=(1, 2), keepdims=True) - low
        # A map with no positive evidence anywhere is returned as zeros, not divided by zero.
        return tf.math.divide_no_nan(cam - low, span)

    def mean_features(self, inputs: Inputs, batch_size: int = 32) -> tf.Tensor:
        """The mean feature map [h, w, k] of ``inputs`` at the target layer: the reference
        that ``heatmaps`` can measure an image's features from."""
        n = _count(inputs)
        if not n:
            raise ValueError("no reference images")
        total = 0.0
        for start in range(0, n, batch_size):
            features, _ = self.features_and_scores(_slice(inputs, start, start + batch_size))
            total += tf.reduce_sum(features, axis=0)
        return total / n

    def _log_odds(self, logits: tf.Tensor) -> tf.Tensor:
        if not self._softmax:  # sigmoid: the logit is the log-odds (and a linear head: its output)
            return logits
        others = tf.where(tf.eye(self.n_classes, dtype=tf.bool), -np.inf, logits[:, None, :])
        return logits - tf.reduce_logsumexp(others, axis=-1)

    def _class_index(self, class_index: ClassIndex, scores: tf.Tensor) -> tf.Tensor:
        n = tf.shape(scores)[0]
        if class_index is None:
            return tf.argmax(scores, axis=-1, output_type=tf.int32)
        if isinstance(class_index, (int, np.integer)):
            if not 0 <= class_index < self.n_classes:
                raise ValueError(f"class_index {class_index} is not in 0..{self.n_classes - 1}")
            return tf.fill([n], tf.constant(int(class_index), tf.int32))
        index = tf.convert_to_tensor(class_index, tf.int32)
        tf.debugging.assert_equal(tf.shape(index), [n], "one class_index per image")
        return index

    def _split(self, inputs: Inputs) -> tuple[tf.Tensor, list[tf.Tensor]]:
        if isinstance(inputs, Mapping):
            missing = [n for n in ("image", *self.tabular_names) if n not in inputs]
            if missing:
                raise ValueError(f"inputs lack {missing}")
            image, tabular = inputs["image"], [inputs[n] for n in self.tabular_names]
        elif self.has_tabular:
            raise ValueError(
                f"this model has tabular inputs {self.tabular_names}: pass a dict with 'image' "
                "and one value per feature"
            )
        else:
            image, tabular = inputs, []
        image = tf.convert_to_tensor(image, tf.float32)
        if image.shape.rank == 3 and self.channels == 1:
            image = image[..., None]
        if image.shape.rank != 4:
            raise ValueError(f"images must be [N, H, W, C], got shape {image.shape}")
        columns = []
        for name, value in zip(self.tabular_names, tabular, strict=True):
            dtype = tf.string if self.model.input[name].dtype == "string" else tf.float32
            value = tf.convert_to_tensor(value, dtype)
            columns.append(value[:, None] if value.shape.rank == 1 else value)
        return image, columns


def _gradcam_plus_plus_weights(features: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
    """Channel weights of Grad-CAM++ (Chattopadhay et al. 2018, eqs. 10 and 19).

    With Y = exp(S) for the class score S and first gradients g = dS/dA (A the feature map),
    the higher derivatives of Y are powers of g (S is taken as piecewise linear in A, as for a
    ReLU network; the paper's assumption), and the per-location coefficients are

        alpha_ij^k = g_ij^2 / (2 g_ij^2 + sum_ab A_ab^k g_ij^3)      (0 where the denominator is)
        w^k        = sum_ij alpha_ij^k relu(dY/dA_ij^k),   dY/dA = exp(S) g

    exp(S) is one positive factor per image: it scales the whole map and vanishes in the
    normalisation to [0, 1], so it is left out (it would overflow for confident scores).
    """
    g2 = tf.square(gradients)
    g3 = g2 * gradients
    sums = tf.reduce_sum(features, axis=(1, 2), keepdims=True)
    alpha = tf.math.divide_no_nan(g2, 2.0 * g2 + sums * g3)
    return tf.reduce_sum(alpha * tf.nn.relu(gradients), axis=(1, 2))


def _check_head(fusion: Any, dropout: Any, dense: Any) -> None:
    """The head applied by hand must be the model's: pooled [-> fusion] -> dropout -> dense."""
    chain = [fusion] if fusion is not None else []
    chain += [dropout, dense]
    for before, after in itertools.pairwise(chain):
        if after.input is not before.output:
            raise ValueError(
                f"unexpected head: {after.name!r} does not take {before.name!r}'s output; "
                "Grad-CAM re-wires the head that medtransfer.models.build.build_model makes"
            )


def _layer(model: keras.Model, name: str, *, required: bool = True) -> keras.layers.Layer | None:
    try:
        return model.get_layer(name)
    except ValueError:
        if not required:
            return None
        raise ValueError(
            f"the model has no layer {name!r}: Grad-CAM re-wires a model built by "
            "medtransfer.models.build.build_model (or loaded from a run's model.keras)"
        ) from None


def _rank4(operation: Any) -> bool:
    if isinstance(operation, keras.layers.InputLayer):
        return False
    try:
        output = operation.output
    except (AttributeError, ValueError):  # an operation that was never called
        return False
    return isinstance(output, keras.KerasTensor) and len(output.shape) == 4


def _spatial_operations(backbone: keras.Model) -> list[Any]:
    spatial = [op for op in backbone.operations if _rank4(op)]
    if not spatial:
        raise ValueError(f"backbone {backbone.name!r} has no layer with a 4-D output")
    return spatial


def _spatial_operation(backbone: keras.Model, name: str | None) -> Any:
    spatial = _spatial_operations(backbone)
    if name is None:
        return spatial[-1]
    for operation in spatial:
        if operation.name == name:
            return operation
    known = {op.name for op in backbone.operations}
    reason = "its output is not 4-D" if name in known else "no such layer in the backbone"
    raise ValueError(f"cannot take Grad-CAM at {name!r}: {reason}")


def default_target_layer(model: keras.Model) -> str:
    """The name of the backbone's last operation with a 4-D output: its last feature map
    before global pooling, the most semantic features that still have a place in the image
    (Selvaraju et al.'s choice). It is also the coarsest map: 1/32 of the input size for every
    registered family, e.g. 3 x 3 cells at 96 px. ``layer=`` takes an earlier one.

    Generic over the registry: ``backbone.operations`` in topological order, the last one that
    is not an input and outputs [N, h, w, k] (ResNet ``conv5_block3_out``, EfficientNet
    ``top_activation``, DenseNet ``relu``, ConvNeXt its last residual ``add``).
    """
    return _spatial_operation(_layer(model, "backbone"), None).name


MIN_CELLS = 12


def localising_layer(model: keras.Model, min_cells: int = MIN_CELLS) -> str:
    """The backbone's last 4-D operation whose map has at least ``min_cells`` x ``min_cells``
    cells at the model's input size (the last feature map when it is that fine).

    A heatmap cannot point more finely than its grid, and a deep cell of a small input sees the
    whole image. On the quickstart data (ResNet50 from scratch, benchmarks/RESULTS.md) the
    last map (3 x 3 at 96 px, 4 x 4 at 128) points at the nodule in 0-7 of 30-40 positives,
    the stride-16 map (6 x 6, 8 x 8) in 7-33, and the stride-8 map (12 x 12, 16 x 16) measured
    from the normal images' mean (``grad_cam(reference=...)``) in 26-40. Reports and
    notebooks explain at this layer: for ResNet50 ``conv3_block4_out`` up to 176 px,
    ``conv4_block6_out`` up to 352 px, the last feature map beyond.
    """
    spatial = _spatial_operations(_layer(model, "backbone"))
    fine = [
        op
        for op in spatial
        if min(op.output.shape[1] or 0, op.output.shape[2] or 0) >= min_cells
        and not isinstance(op, keras.layers.ZeroPadding2D)  # a stride's padding, not features
    ]
    return (fine or spatial)[-1].name


def grad_cam(
    model: keras.Model,
    inputs: Inputs,
    class_index: ClassIndex,
    *,
    method: Method = "gradcam",
    layer: str | None = None,
    batch_size: int = 32,
    reference: Inputs | None = None,
) -> np.ndarray:
    """Heatmaps [N, H, W] (float32, in [0, 1]) of where ``model`` found class ``class_index``.

    ``inputs``: images [N, H, W, C] in [0, 1] of any size (C the model's channels), or for a
    model with tabular features the dict ``{"image": ..., <feature>: [N] or [N, 1]}`` that the
    model itself takes. ``class_index``: one class for all images, one per image, or None for
    each image's predicted class. The score is the class's log-odds from the pre-activation
    logits (see the module docstring for why). ``method``: ``gradcam`` or ``gradcam++``.
    ``layer``: an operation inside the backbone with a 4-D output; default
    ``default_target_layer``. Each map is min-max normalised per image; a map without any
    positive evidence is all zeros. Images are processed ``batch_size`` at a time.

    ``reference``: images of the same form as ``inputs`` (e.g. validation images without the
    class) whose mean feature map ``A_ref`` is subtracted before weighting, so the map is
    ``relu(sum_k w_k (A_k - A_ref_k))``: where this image's features raise the score above
    those of a typical reference image, a first-order (Taylor) estimate around the reference,
    as DeepLIFT (Shrikumar et al. 2017) explains relative to a reference input. Plain Grad-CAM
    also credits whatever every image shares. A network trained from scratch on few images puts
    large activations at the image border for every image, nodule or not, and plain Grad-CAM
    points there; measured from the normal images' mean, the same network's maps point at the
    nodule (``benchmarks/RESULTS.md``, "Grad-CAM pointing game").
    """
    cam = CamModel(model, layer)
    mean = None if reference is None else cam.mean_features(reference, batch_size)
    n = _count(inputs)
    chunks = []
    for start in range(0, n, batch_size):
        part = _slice(inputs, start, start + batch_size)
        index = class_index
        if class_index is not None and not isinstance(class_index, (int, np.integer)):
            index = np.asarray(class_index)[start : start + batch_size]
        chunks.append(cam.heatmaps(part, index, method, mean).numpy())
    if not chunks:
        raise ValueError("no images")
    return np.concatenate(chunks).astype(np.float32)


def grad_cam_fn(
    model: keras.Model,
    method: Method = "gradcam",
    *,
    class_index: int | None = None,
    layer: str | None = None,
) -> Callable[[Inputs], tf.Tensor]:
    """A function (inputs) -> heatmaps [N, H, W] made of TensorFlow ops only.

    It traces under ``tf.function`` with an input signature of unknown batch and image size,
    e.g. ``[tf.TensorSpec([None, None, None, C], tf.float32)]``, so it can be added to an
    export as one more endpoint (``ExportArchive.add_endpoint("grad_cam", fn, ...)`` next to
    ``archive.track(model)``: the function uses the model's own variables, which the tracked
    model carries). ``class_index`` None: each image's predicted class.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    cam = CamModel(model, layer)

    def heatmaps(inputs: Inputs) -> tf.Tensor:
        return cam.heatmaps(inputs, class_index, method)

    heatmaps.cam_model = cam  # type: ignore[attr-defined]
    return heatmaps


def _count(inputs: Inputs) -> int:
    image = inputs["image"] if isinstance(inputs, Mapping) else inputs
    return int(image.shape[0])


def _slice(inputs: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(inputs, Mapping):
        return {name: _rows(value, start, stop) for name, value in inputs.items()}
    return _rows(inputs, start, stop)


def _rows(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, tf.Tensor):
        return value[start:stop]
    array = np.asarray(value)
    return array[start:stop].astype(object) if array.dtype.kind in "OUS" else array[start:stop]
