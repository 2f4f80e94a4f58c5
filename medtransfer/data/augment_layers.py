"""The image layers Keras lacks (gamma, noise, flips, rot90) and the fused affine resampling.

Each carries its configuration (``get_config``) and is registered under a ``medtransfer>`` name,
so it round-trips through its config as Keras' own layers do. Which option uses which layer, and
how it is applied to a batch, is ``medtransfer.data.augment_options``'s job.
"""

from __future__ import annotations

import keras
import tensorflow as tf

# Keras' own base for its image layers: gives the small layers below the same call/seed
# behaviour (and serialisation) as RandomRotation and friends.
from keras.src.layers.preprocessing.image_preprocessing.base_image_preprocessing_layer import (
    BaseImagePreprocessingLayer,
)


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
