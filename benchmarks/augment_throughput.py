"""Augmentation throughput: does the input pipeline keep up with the model?

Three rates, measured in one run on the same images (PneumoniaMNIST training images resized
to 224x224, one channel, batches of 32), in images per second:

- ``pipeline``: ``make_training_dataset`` with the spec's augmentation (the ``xray`` preset,
  and a heavy configuration adding elastic, perspective, blur, erasing and RandAugment),
  drained as fast as ``tf.data`` can produce it;
- ``train step``: EfficientNetB0 at 224 (``build_model`` + ``compile_model``, random
  initialisation) trained with ``model.fit`` on in-memory batches, after its first step;
- ``albumentations``: the xray preset's equivalent in albumentations (one affine resampling
  of the same share of images, contrast, gamma, Gauss noise, same probabilities) through the
  ``tf.numpy_function`` adapter, in the same ``make_training_dataset``.

Printed ratios: pipeline / train step (target >= 3: augmentation never starves the model) and
pipeline / albumentations. Each rate is measured alone with both cores; in training they
share the machine. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SIZE, BATCH = 224, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", default=str(REPO / "data_specs" / "pneumoniamnist.yaml"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps")
    args = parser.parse_args()

    import tensorflow as tf

    from medtransfer.data.albumentations_adapter import AlbumentationsAugmenter
    from medtransfer.data.augment import make_augmenter
    from medtransfer.data.manifest import build_manifest
    from medtransfer.data.pipeline import load_split, make_training_dataset
    from medtransfer.models.build import build_model, compile_model
    from medtransfer.spec import load_spec

    spec = load_spec(args.spec).with_overrides(
        model={"backbone": "efficientnetb0", "weights": "none"},
        image={"size": (SIZE, SIZE)},
        training={"batch_size": BATCH},
    )
    images, targets = load_split(spec, build_manifest(spec), "train", workers=0)
    images, targets = images[: args.images], targets[: args.images]
    batches_per_epoch = -(-len(images) // BATCH)

    def pipeline_rate(augment, epochs: int = 2) -> float:
        dataset = make_training_dataset(
            images, targets, batch_size=BATCH, seed=0, epochs=range(epochs + 1), augment=augment
        )
        iterator = iter(dataset)
        for _ in range(batches_per_epoch):  # epoch 0: tracing and warm-up
            next(iterator)
        start = time.perf_counter()
        count = sum(len(next(iterator)[0]) for _ in range(batches_per_epoch * epochs))
        return count / (time.perf_counter() - start)

    def train_step_rate() -> float:
        model = compile_model(build_model(spec), spec, steps_per_epoch=args.steps)
        x, y = tf.constant(images[:BATCH]), tf.constant(targets[:BATCH])
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # tracing
        start = time.perf_counter()
        model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(args.steps), epochs=1, verbose=0)
        return args.steps * BATCH / (time.perf_counter() - start)

    import albumentations as A

    albumentations = AlbumentationsAugmenter(
        A.Compose(
            [
                # the xray preset's rotation, zoom and translation each apply with p 0.5, so
                # 1 - 0.5**3 = 87.5% of images are resampled (once): the same work here
                A.Affine(
                    rotate=(-7, 7), scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), p=0.875
                ),
                A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.2, p=0.5),
                A.RandomGamma(gamma_limit=(78, 128), p=0.5),
                A.GaussNoise(std_range=(0.0, 0.02), p=0.3),
            ]
        )
    )
    heavy = spec.with_overrides(
        augmentation={
            "options": {
                name: {"probability": 0.5}
                for name in ("elastic", "perspective", "blur", "erasing", "randaugment")
            }
        }
    )
    rates = {
        "pipeline, no augmentation": pipeline_rate(None),
        "pipeline, xray preset": pipeline_rate(make_augmenter(spec)),
        "pipeline, heavy": pipeline_rate(make_augmenter(heavy)),
        "albumentations adapter": pipeline_rate(albumentations),
        "EfficientNetB0 train step": train_step_rate(),
    }
    for name, rate in rates.items():
        print(f"{name:<28} {rate:9.1f} images/s")
    step = rates["EfficientNetB0 train step"]
    print(
        f"{len(images)} images {SIZE}x{SIZE}x1, batch {BATCH}: xray preset / train step "
        f"{rates['pipeline, xray preset'] / step:.1f}x (target >= 3), heavy / train step "
        f"{rates['pipeline, heavy'] / step:.1f}x, xray preset / albumentations "
        f"{rates['pipeline, xray preset'] / rates['albumentations adapter']:.1f}x"
    )


if __name__ == "__main__":
    main()
