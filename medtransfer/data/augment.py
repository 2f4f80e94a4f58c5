"""Training-time augmentation inside the ``tf.data`` graph, built from Keras core layers.

Three decisions shape this module:

- **Stateless randomness.** Keras' random layers keep their state in a ``SeedGenerator``
  variable; in a parallel ``tf.data`` map its updates race, and a run resumed at epoch k could
  not repeat what an uninterrupted run drew. Here each batch gets a seed from (run seed, epoch,
  batch) and every draw inside the layers folds a counter into it (:class:`StatelessDraws`).
  The same seed gives the same batches in any process, epochs differ, and ``--resume`` stays
  bit-exact.
- **One option, one layer, one probability.** Each option is a Keras layer (or a small one
  here where Keras has none: gamma, noise, flips, rot90) with a magnitude, applied to each image
  with its own probability. Rotation, zoom, translation and shear are the exception: they are
  composed into one :class:`RandomAffine` so that an image is resampled once. Options run in
  a fixed order: geometry, intensity, erasing, policies, then the label-mixing MixUp and
  CutMix.
- **Presets are data.** A preset is a mapping of option settings; a spec names one (or gets
  its modality's default) and overrides any option. Radiograph presets never flip: laterality
  is part of the image's meaning.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

import keras
import tensorflow as tf

# Keras' own base for its image layers: gives the small layers below the same call/seed
# behaviour (and serialisation) as RandomRotation and friends.
from keras.src.layers.preprocessing.image_preprocessing.base_image_preprocessing_layer import (
    BaseImagePreprocessingLayer,
)

from medtransfer.data.augment_presets import OPTIONS, Setting, check_settings, resolve_settings

if TYPE_CHECKING:
    from collections.abc import Iterator

    from medtransfer.spec import Spec

UNIT_RANGE = (0.0, 1.0)
_AUGMENT_STREAM = 0x61756731  # keeps augmentation draws apart from the data order's


class Augmenter(Protocol):
    """What the training pipeline calls on each batch (graph or albumentations)."""

    def __call__(
        self, images: tf.Tensor, targets: tf.Tensor, seed: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]: ...


class StatelessDraws(keras.random.SeedGenerator):
    """A ``SeedGenerator`` whose every draw is a pure function of one seed tensor.

    Keras layers take a ``SeedGenerator`` as ``seed`` and call ``next()`` once per random op;
    numbering those calls while the graph is traced gives each op its own stream without any
    variable, so parallel map calls cannot interfere.
    """

    def __init__(self, seed: tf.Tensor) -> None:  # no super().__init__: it creates a variable
        self._seed = tf.cast(seed, tf.int64)
        self._draws = 0

    def next(self, ordered: bool = True) -> tf.Tensor:
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)


def batch_seed(seed: int, epoch: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
    """The stateless seed of one training batch: a function of (run seed, epoch, batch)."""
    base = tf.constant([seed, _AUGMENT_STREAM], tf.int64)
    fold = tf.random.experimental.stateless_fold_in
    return fold(fold(base, tf.cast(epoch, tf.int64)), tf.cast(batch, tf.int64))


# -- small layers Keras lacks ------------------------------------------------------------------


def _batch_size(images: tf.Tensor) -> tf.Tensor:
    return tf.shape(images)[0]


class _SeededLayer(BaseImagePreprocessingLayer):
    """The seed handling Keras' random image layers share: ``seed`` builds the generator a
    standalone ``call`` draws from (the augmenter passes its own stateless draws instead)."""

    def __init__(self, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def get_config(self) -> dict:
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable("medtransfer")
class RandomGamma(_SeededLayer):
    """``x ** gamma`` with ``log(gamma)`` uniform in ``[-factor, factor]``.

    A detector's response curve differs between sites; gamma bends mid-tones while keeping
    black and white fixed, which a brightness shift cannot.
    """

    def __init__(self, factor: float, seed: int | None = None, **kwargs) -> None:
        super().__init__(seed, **kwargs)
        self.gamma_factor = float(factor)

    def get_random_transformation(self, data, training=True, seed=None):
        seed = seed or self._get_seed_generator(self.backend._backend)
        log_gamma = keras.random.uniform(
            [_batch_size(data), 1, 1, 1], -self.gamma_factor, self.gamma_factor, seed=seed
        )
        return {"gamma": tf.exp(log_gamma)}

    def transform_images(self, images, transformation, training=True):
        if not training:
            return images
        # exp(gamma * log x) rather than pow: about twice as fast on CPU; 0 stays exactly 0
        positive = images > 0
        safe = tf.where(positive, images, 1.0)
        return tf.where(positive, tf.exp(transformation["gamma"] * tf.math.log(safe)), 0.0)

    def get_config(self) -> dict:
        return {**super().get_config(), "factor": self.gamma_factor}


@keras.saving.register_keras_serializable("medtransfer")
class RandomGaussianNoise(_SeededLayer):
    """Additive Gaussian noise whose standard deviation is uniform in ``[0, stddev]`` per image
    (quantum noise differs with dose, so one fixed level would be too narrow)."""

    def __init__(self, stddev: float, seed: int | None = None, **kwargs) -> None:
        super().__init__(seed, **kwargs)
        self.stddev = float(stddev)

    def get_random_transformation(self, data, training=True, seed=None):
        seed = seed or self._get_seed_generator(self.backend._backend)
        level = keras.random.uniform([_batch_size(data), 1, 1, 1], 0.0, self.stddev, seed=seed)
        return {"noise": keras.random.normal(tf.shape(data), seed=seed) * level}

    def transform_images(self, images, transformation, training=True):
        return images + transformation["noise"] if training else images

    def get_config(self) -> dict:
        return {**super().get_config(), "stddev": self.stddev}


@keras.saving.register_keras_serializable("medtransfer")
class Flip(BaseImagePreprocessingLayer):
    """A mirror image along one axis. Not random by itself: the option's probability is the
    chance an image is flipped (Keras' ``RandomFlip`` flips half, fixed)."""

    def __init__(self, mode: str = "horizontal", **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in ("horizontal", "vertical"):
            raise ValueError(f"mode must be horizontal or vertical, got {mode!r}")
        self.mode = mode

    def transform_images(self, images, transformation=None, training=True):
        return tf.reverse(images, axis=[2 if self.mode == "horizontal" else 1])

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable("medtransfer")
class RandomRot90(_SeededLayer):
    """A rotation by 90, 180 or 270 degrees, equally likely (square images: histology tiles
    have no up)."""

    def get_random_transformation(self, data, training=True, seed=None):
        seed = seed or self._get_seed_generator(self.backend._backend)
        turns = keras.random.randint([_batch_size(data), 1, 1, 1], 1, 4, seed=seed)
        return {"turns": turns}

    def transform_images(self, images, transformation, training=True):
        if not training:
            return images
        turns, out = transformation["turns"], images
        for k in (1, 2, 3):
            out = tf.where(tf.equal(turns, k), tf.image.rot90(images, k), out)
        return out


AFFINE_OPTIONS = ("rotation", "zoom", "translation", "shear")


@keras.saving.register_keras_serializable("medtransfer")
class RandomAffine(_SeededLayer):
    """Rotation, zoom, translation and shear, each with its own probability and magnitude,
    drawn per image and applied as one resampling.

    Keras' RandomRotation, RandomZoom, RandomTranslation and RandomShear each resample the
    image: three of them cost three bilinear passes and blur fine structure (rib edges, thin
    vessels) three times. Composing them into one matrix (Keras' own affine parametrisation)
    costs one pass, and only for images that moved at all. Each argument is a
    ``(probability, magnitude)`` pair: degrees for rotation and shear, fractions of the size
    for zoom and translation. Out-of-image pixels are black.
    """

    def __init__(
        self,
        rotation: tuple[float, float] = (0.0, 0.0),
        zoom: tuple[float, float] = (0.0, 0.0),
        translation: tuple[float, float] = (0.0, 0.0),
        shear: tuple[float, float] = (0.0, 0.0),
        seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(seed, **kwargs)
        self.components = {
            "rotation": tuple(rotation),
            "zoom": tuple(zoom),
            "translation": tuple(translation),
            "shear": tuple(shear),
        }

    def get_random_transformation(self, data, training=True, seed=None):
        seed = seed or self._get_seed_generator(self.backend._backend)
        count = _batch_size(data)
        height, width = tf.shape(data)[1], tf.shape(data)[2]
        moved = tf.zeros([count], tf.bool)

        def draw(name: str, draws: int = 1) -> list[tf.Tensor]:
            nonlocal moved
            probability, magnitude = self.components[name]
            chosen = keras.random.uniform([count], seed=seed) < probability
            moved = tf.logical_or(moved, chosen)
            return [
                tf.where(
                    chosen, keras.random.uniform([count], -magnitude, magnitude, seed=seed), 0.0
                )
                for _ in range(draws)
            ]

        (angle,) = draw("rotation")
        (zoom,) = draw("zoom")
        shift_x, shift_y = draw("translation", 2)
        shear_x, shear_y = draw("shear", 2)
        matrix = self._compute_affine_matrix(
            center_x=0.5,
            center_y=0.5,
            angle=angle,
            translate_x=shift_x * tf.cast(width, tf.float32),
            translate_y=shift_y * tf.cast(height, tf.float32),
            scale=1.0 + zoom,
            shear_x=shear_x,
            shear_y=shear_y,
            height=height,
            width=width,
        )
        return {"matrix": matrix, "moved": moved}

    def transform_images(self, images, transformation, training=True):
        if not training:
            return images
        return keras.ops.image.affine_transform(
            images, transformation["matrix"], fill_mode="constant", fill_value=0.0
        )

    def get_config(self) -> dict:
        return {**super().get_config(), **self.components}


# -- options -----------------------------------------------------------------------------------

Applier = Callable[
    [keras.layers.Layer, tf.Tensor, tf.Tensor, StatelessDraws, float],
    tuple[tf.Tensor, tf.Tensor],
]


def _chosen(images: tf.Tensor, draws: StatelessDraws, probability: float) -> tf.Tensor:
    """Which images of the batch an option applies to: a [B] bool, each with ``probability``."""
    return keras.random.uniform([_batch_size(images)], seed=draws) < probability


def _apply_to_images(layer, images, targets, draws, probability):
    """An image-only option: targets pass through unchanged. Only the chosen images are
    transformed (a probability of 0.3 costs 0.3 of the work), then put back in place."""
    if probability >= 1:
        return _transform(layer, images, draws), targets
    chosen = tf.where(_chosen(images, draws, probability))[:, 0]
    return _replace_rows(images, chosen, lambda subset: _transform(layer, subset, draws)), targets


def _transform(layer, images, draws):
    transformation = layer.get_random_transformation(images, training=True, seed=draws)
    return tf.cast(layer.transform_images(images, transformation, training=True), images.dtype)


def _replace_rows(images, rows, transform):
    """``images`` with ``images[rows]`` replaced by ``transform`` of them (skipped when there
    are none: some Keras layers fail on an empty batch)."""
    subset = tf.gather(images, rows)
    out = tf.cond(tf.size(rows) > 0, lambda: transform(subset), lambda: subset)
    return tf.tensor_scatter_nd_update(images, rows[:, None], out)


_POLICY_DRAWS: ContextVar[StatelessDraws] = ContextVar("policy_draws")


class _StatelessPolicy:
    """For Keras' RandAugment and AugMix, which draw from their own generator whatever seed
    they are given: while a batch is traced, their draws come from the batch's seed."""

    def _get_seed_generator(self, backend=None):
        return _POLICY_DRAWS.get()


class StatelessRandAugment(_StatelessPolicy, keras.layers.RandAugment):
    pass


class StatelessAugMix(_StatelessPolicy, keras.layers.AugMix):
    pass


def _apply_policy(layer, images, targets, draws, probability):
    """A policy built for colour images; grey ones go through as repeated RGB, averaged back."""
    grey = images.shape[-1] == 1
    rgb = tf.repeat(images, 3, axis=-1) if grey else images
    token = _POLICY_DRAWS.set(draws)
    try:
        out, targets = _apply_to_images(layer, rgb, targets, draws, probability)
    finally:
        _POLICY_DRAWS.reset(token)
    if grey:  # the channel mean, written so that three equal channels give exactly their value
        first = out[..., :1]
        out = first + ((out[..., 1:2] - first) + (out[..., 2:3] - first)) / 3.0
    return out, targets


def _apply_affine(layer, images, targets, draws, probability):
    """The fused geometry: each component chose its own images; resample only those moved."""
    transformation = layer.get_random_transformation(images, training=True, seed=draws)
    moved = tf.where(transformation["moved"])[:, 0]
    matrix = tf.gather(transformation["matrix"], moved)
    return _replace_rows(
        images, moved, lambda subset: layer.transform_images(subset, {"matrix": matrix})
    ), targets


def _mix_targets(targets, partner, own_share, chosen):
    """``own_share * y + (1 - own_share) * y_partner`` for chosen images; others unchanged (so
    an unknown, NaN, partner label cannot leak into an image that was not mixed). A mixed image
    whose partner's label is unknown gets an unknown label."""
    share = own_share[:, None]
    mixed = share * targets + (1.0 - share) * tf.gather(targets, partner)
    return tf.where(chosen[:, None], mixed, targets)


def _apply_mixup(layer, images, targets, draws, probability):
    transformation = layer.get_random_transformation(images, training=True, seed=draws)
    chosen = _chosen(images, draws, probability)
    own = tf.where(chosen, tf.cast(transformation["mix_weight"], tf.float32), 1.0)
    partner = tf.cast(transformation["permutation_order"], tf.int32)
    mixed = own[:, None, None, None] * images + (1.0 - own[:, None, None, None]) * tf.gather(
        images, partner
    )
    return mixed, _mix_targets(targets, partner, own, chosen)


def _apply_cutmix(layer, images, targets, draws, probability):
    """CutMix with the label share taken from the pixels actually pasted (Keras' own share is
    computed from the fractional box and can be off by a row or column of pixels)."""
    transformation = layer.get_random_transformation(images, training=True, seed=draws)
    chosen = _chosen(images, draws, probability)
    masks = tf.logical_and(transformation["batch_masks"], chosen[:, None, None, None])
    transformation = {**transformation, "batch_masks": masks}
    out = layer.transform_images(images, transformation, training=True)
    pasted = tf.reduce_mean(tf.cast(masks, tf.float32), axis=[1, 2, 3])
    partner = tf.cast(transformation["permutation_order"], tf.int32)
    return tf.cast(out, images.dtype), _mix_targets(targets, partner, 1.0 - pasted, pasted > 0)


# option -> its layer for a magnitude (what the magnitude means: augment_presets.OPTIONS);
# rotation, zoom, translation and shear share one RandomAffine (see GraphAugmenter)
LAYERS: dict[str, Callable[[float], keras.layers.Layer]] = {
    "perspective": lambda m: keras.layers.RandomPerspective(factor=1.0, scale=m),
    "elastic": lambda m: keras.layers.RandomElasticTransform(
        factor=1.0, scale=m, value_range=UNIT_RANGE, fill_mode="constant"
    ),
    "flip_horizontal": lambda m: Flip("horizontal"),
    "flip_vertical": lambda m: Flip("vertical"),
    "rot90": lambda m: RandomRot90(),
    "contrast": lambda m: keras.layers.RandomContrast(m, value_range=UNIT_RANGE),
    "brightness": lambda m: keras.layers.RandomBrightness(m, value_range=UNIT_RANGE),
    "gamma": RandomGamma,
    "saturation": lambda m: keras.layers.RandomSaturation(m, value_range=UNIT_RANGE),
    "hue": lambda m: keras.layers.RandomHue(m, value_range=UNIT_RANGE),
    "noise": RandomGaussianNoise,
    "blur": lambda m: keras.layers.RandomGaussianBlur(
        factor=1.0, kernel_size=3, sigma=m, value_range=UNIT_RANGE
    ),
    "sharpness": lambda m: keras.layers.RandomSharpness(m, value_range=UNIT_RANGE),
    "clahe": lambda m: keras.layers.ContrastLimitedAdaptiveHistogramEqualization(
        value_range=UNIT_RANGE, clip_limit=m
    ),
    "erasing": lambda m: keras.layers.RandomErasing(
        factor=1.0, scale=(0.02, m), fill_value=0.0, value_range=UNIT_RANGE
    ),
    "randaugment": lambda m: StatelessRandAugment(value_range=UNIT_RANGE, num_ops=2, factor=m),
    "augmix": lambda m: StatelessAugMix(value_range=UNIT_RANGE, factor=m),
    "mixup": lambda m: keras.layers.MixUp(alpha=m),
    "cutmix": lambda m: keras.layers.CutMix(factor=m),
}
# how an option's layer is applied when not image-only (_apply_to_images)
APPLIERS: dict[str, Applier] = {
    "randaugment": _apply_policy,
    "augmix": _apply_policy,
    "mixup": _apply_mixup,
    "cutmix": _apply_cutmix,
}


@contextmanager
def _python_random(seed: int) -> Iterator[None]:
    """Keras' AugMix picks each chain's operations with Python's ``random`` while the graph is
    traced (once per pipeline); seeding that choice makes runs repeat it. Global state is
    restored afterwards."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


class GraphAugmenter:
    """The spec's options as one batch function for ``Dataset.map`` (see :class:`Augmenter`)."""

    def __init__(self, settings: Mapping[str, Setting], seed: int = 0) -> None:
        unknown = sorted(set(settings) - set(LAYERS) - set(AFFINE_OPTIONS))
        if unknown:
            raise ValueError(f"unknown augmentation options {unknown}; known: {list(OPTIONS)}")
        self.settings = dict(settings)
        self._seed = seed
        geometry = {
            n: (s.probability, s.magnitude) for n, s in settings.items() if n in AFFINE_OPTIONS
        }
        self._steps = []
        for name in OPTIONS:  # application order, whatever order the spec listed them in
            if name not in settings:
                continue
            if name in AFFINE_OPTIONS:
                if geometry:  # all four become one step, where the first of them stands
                    self._steps.append((_apply_affine, 1.0, RandomAffine(**geometry)))
                    geometry = {}
                continue
            apply = APPLIERS.get(name, _apply_to_images)
            self._steps.append(
                (apply, settings[name].probability, LAYERS[name](settings[name].magnitude))
            )

    def __call__(
        self, images: tf.Tensor, targets: tf.Tensor, seed: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        draws = StatelessDraws(seed)
        with _python_random(self._seed):
            for apply, probability, layer in self._steps:
                if not layer.built:
                    layer.build(images.shape)
                images, targets = apply(layer, images, targets, draws, probability)
        return tf.clip_by_value(images, 0.0, 1.0), targets


class ChainedAugmenter:
    """The graph options, then a user's albumentations pipeline."""

    def __init__(self, *augmenters: Augmenter) -> None:
        self._augmenters = augmenters

    def __call__(
        self, images: tf.Tensor, targets: tf.Tensor, seed: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        for index, augmenter in enumerate(self._augmenters):
            images, targets = augmenter(
                images, targets, tf.random.experimental.stateless_fold_in(seed, index)
            )
        return images, targets


def make_augmenter(spec: Spec) -> Augmenter | None:
    """The spec's training augmentation, or ``None`` when it asks for none."""
    settings = resolve_settings(spec)
    check_settings(settings, spec)
    augmenters: list[Augmenter] = []
    if settings:
        augmenters.append(GraphAugmenter(settings, seed=spec.training.seed))
    if spec.augmentation.albumentations is not None:
        from medtransfer.data.albumentations_adapter import AlbumentationsAugmenter

        augmenters.append(AlbumentationsAugmenter.from_file(spec.augmentation.albumentations))
    if not augmenters:
        return None
    return augmenters[0] if len(augmenters) == 1 else ChainedAugmenter(*augmenters)
