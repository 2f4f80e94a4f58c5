"""Training overhead: ``medtransfer train`` vs a bare Keras ``model.fit`` of the same model.

Both arms train the spec's own model (``build_model`` + ``compile_model``: same backbone,
loss, optimiser, schedule) on the same decoded arrays, with the same validation data, batch
size and epochs. The bare arm is ``model.fit(x, y, validation_data=...)`` and nothing else;
the medtransfer arm is ``train()`` with everything a run does: the epoch-keyed ``tf.data``
order, best-model checkpointing, CSV and TensorBoard logs and the resumable checkpoint after
every epoch. Augmentation is off in both (preset none): it is training work, not overhead,
and augment_throughput.py measures its cost. Throughput is training images per second over
the epochs after the first (the first pays for graph tracing in both). The arms alternate,
``--rounds`` times; each keeps its best round, and the ratio medtransfer / bare is printed
(target >= 0.95). Run with `make bench`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", default=str(REPO / "data_specs" / "breastmnist.yaml"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import keras

    from medtransfer.data.manifest import build_manifest
    from medtransfer.data.pipeline import load_split
    from medtransfer.models.build import build_model, compile_model
    from medtransfer.spec import load_spec
    from medtransfer.training.run import train

    spec = load_spec(args.spec).with_overrides(
        training={"epochs": args.epochs}, augmentation={"preset": "none"}
    )
    manifest = build_manifest(spec)

    train_x, train_y = load_split(spec, manifest, "train", workers=0)
    val = load_split(spec, manifest, "val", workers=0)
    steps = -(-len(train_x) // spec.training.batch_size)

    class EpochTimes(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    def throughput(times: EpochTimes) -> float:
        later = times.seconds[1:]
        return len(train_x) * len(later) / sum(later)

    def bare() -> float:
        keras.utils.set_random_seed(spec.training.seed)
        model = compile_model(build_model(spec), spec, steps)
        times = EpochTimes()
        model.fit(
            train_x,
            train_y,
            batch_size=spec.training.batch_size,
            epochs=args.epochs,
            validation_data=val,
            callbacks=[times],
            verbose=0,
        )
        return throughput(times)

    def medtransfer() -> float:
        times = EpochTimes()
        with tempfile.TemporaryDirectory() as folder:
            train(spec, Path(folder) / "run", workers=0, callbacks=[times])
        return throughput(times)

    if spec.model.weights != "none":
        raise SystemExit("use a weights: none spec (one phase), so both arms run the same fit")
    best = {"bare": 0.0, "medtransfer": 0.0}
    for round_ in range(args.rounds):
        for name, arm in (("bare", bare), ("medtransfer", medtransfer)):
            value = arm()
            best[name] = max(best[name], value)
            print(f"round {round_ + 1}: {name:<12} {value:8.1f} images/s", flush=True)
    print(
        f"{spec.name}, {spec.model.backbone} {spec.image.size[0]}px, {len(train_x)} training "
        f"images, batch {spec.training.batch_size}, epochs 2-{args.epochs} of each run: "
        f"bare model.fit {best['bare']:.1f} images/s, medtransfer train "
        f"{best['medtransfer']:.1f} images/s, ratio {best['medtransfer'] / best['bare']:.3f}"
    )


if __name__ == "__main__":
    main()
