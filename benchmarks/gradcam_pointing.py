"""Grad-CAM pointing game on the synthetic chest DICOMs, where the finding's position is known.

The quickstart's data and recipe (``medtransfer.quickstart``: ``generate_dicom_dataset``,
``write_spec``, ``train``; ResNet50 from random initialisation, 128 px, 15 epochs, 160
patients; the defaults follow ``quickstart.DEFAULTS``, and ``--seed 0`` is ``make demo``)
train a model; the run's ``model.keras`` is loaded back (``load_run_model(...)``, the
path a user takes) and Grad-CAM and Grad-CAM++ for the class ``finding`` are computed on every
held-out test image that has a nodule, each plainly and from the mean feature map of the
validation images without a nodule (``grad_cam(reference=...)``, what the evaluation report
shows). The nodule's centre and radius come from the generator's private plan
(``_plan_dataset``; the manifest carries only the label).

Heatmaps are computed on the test images decoded at ``--eval-size`` (224 px, the size of
site A's files; the model stretches them to its input size in the graph) so that the pointing
game's tolerance is in pixels of a 224 px image, as in Zhang et al. 2018 (15 px). A hit: the
heatmap's maximum lies inside the nodule's circle, or within the tolerance of it.

Baselines, measured on the same images at the same tolerances: a uniformly random pixel (its
exact expected hit rate, every pixel counted), the image centre, and the single fixed pixel
that hits the most *training* nodules (a prior over where nodules are, which is what a
heatmap that ignores the image could at best learn). A reference that asks the model itself:
occlusion sensitivity (Zeiler and Fergus 2014), which greys out a square of 1/6 of the image
width at a stride of half that and points where the probability of ``finding`` drops most; it
shows whether the model's decision rests on the nodule at all, whatever Grad-CAM says.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def hit_masks(circles: np.ndarray, size: int, tolerance: float) -> np.ndarray:
    """[N, size, size] bool: which pixels would be a hit for each (row, col, radius) circle."""
    rows, cols = np.mgrid[0:size, 0:size]
    r, c, radius = (circles[:, i, None, None] for i in range(3))
    return np.hypot(rows - r, cols - c) - radius <= tolerance


def occlusion_peaks(model, images: np.ndarray, class_index: int) -> np.ndarray:
    """(row, col) [N, 2] of the occluding square's centre that lowers the class most."""
    size = images.shape[1]
    patch = round(size / 6)
    starts = range(0, size - patch + 1, max(patch // 2, 1))
    fill = np.median(images, axis=(1, 2, 3))[:, None, None, None]
    base = model.predict(images, verbose=0)[:, class_index]
    best = np.full(len(images), -np.inf)
    peaks = np.zeros((len(images), 2))
    for r in starts:
        for c in starts:
            occluded = images.copy()
            occluded[:, r : r + patch, c : c + patch] = fill
            drop = base - model.predict(occluded, verbose=0, batch_size=64)[:, class_index]
            better = drop > best
            best[better] = drop[better]
            peaks[better] = (r + (patch - 1) / 2, c + (patch - 1) / 2)
    return peaks


def main() -> None:
    from medtransfer.quickstart import DEFAULTS

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=DEFAULTS["n_patients"])
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--backbone", default=DEFAULTS["backbone"])
    parser.add_argument(
        "--image-size", type=int, default=DEFAULTS["image_size"], help="the model's input size"
    )
    parser.add_argument("--eval-size", type=int, default=224, help="heatmap resolution")
    parser.add_argument("--tolerances", default="0,15", help="pixels at --eval-size")
    parser.add_argument(
        "--layers",
        default="default",
        help="comma-separated target layers inside the backbone; 'default' = its last feature "
        "map, 'localising' = gradcam.localising_layer (what reports use)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="work folder (default: a new temporary one)")
    parser.add_argument(
        "--run", default=None, help="reuse a finished run (OUT/run; --out defaults to its parent)"
    )
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from medtransfer.data.manifest import build_manifest
    from medtransfer.data.pipeline import load_split
    from medtransfer.evaluation.gradcam import default_target_layer, grad_cam, localising_layer
    from medtransfer.evaluation.plots import cam_overlay_figure
    from medtransfer.evaluation.pointing import heatmap_peaks, point_hits
    from medtransfer.models.saved import load_run_model
    from medtransfer.quickstart import write_spec
    from medtransfer.rundir import open_run
    from medtransfer.spec import load_spec
    from medtransfer.synthetic import _plan_dataset, generate_dicom_dataset
    from medtransfer.training.run import train

    if args.run and not args.out:
        args.out = str(Path(args.run).parent)  # the run's data folder sits beside it
    out = Path(args.out or tempfile.mkdtemp(prefix="gradcam-pointing-"))
    tolerances = [float(t) for t in args.tolerances.split(",")]
    started = time.time()
    manifest_file = out / "data" / "manifest.csv"
    if not manifest_file.is_file():
        generate_dicom_dataset(out / "data", n_patients=args.patients, seed=args.seed)
    spec = load_spec(
        write_spec(
            manifest_file,
            backbone=args.backbone,
            epochs=args.epochs,
            image_size=args.image_size,
            seed=args.seed,
        )
    )
    train_seconds = 0.0
    if args.run:
        run = open_run(args.run)
    else:
        t = time.time()
        run = train(spec, out / "run", overwrite=True)
        train_seconds = time.time() - t
    model = load_run_model(run)

    # Test split at the evaluation size; nodule geometry from the generator's plan.
    plans = {
        str((out / "data" / plan.relative_path).resolve()): plan
        for plan in _plan_dataset(args.patients, 2, args.seed)
    }
    manifest = build_manifest(spec)
    eval_spec = spec.with_overrides(image={"size": (args.eval_size, args.eval_size)})
    x, y = load_split(eval_spec, manifest, "test", workers=0)
    finding = spec.classes.index("finding")
    p = np.asarray(model.predict(x, verbose=0))[:, finding]
    auroc = roc_auc_score(y[:, finding], p)
    test_rows = manifest[manifest["split"] == "test"]
    positive = y[:, finding] == 1
    circles = np.array(
        [plans[path].nodule.in_pixels(args.eval_size) for path in test_rows["path"][positive]]
    )
    train_rows = manifest[(manifest["split"] == "train") & (manifest["label"] == "finding")]
    train_circles = np.array(
        [plans[path].nodule.in_pixels(args.eval_size) for path in train_rows["path"]]
    )
    x_pos, n = x[positive], int(positive.sum())
    x_val, y_val = load_split(eval_spec, manifest, "val", workers=0)
    normal_val = x_val[y_val[:, finding] == 0]  # the reference the evaluation report uses

    # Pointers: (name, [N, 2] points) per method and layer, then the baselines.
    pointers: list[tuple[str, np.ndarray]] = []
    heatmaps_for_figure = None  # the examples figure shows what the evaluation report shows
    shown_layer = localising_layer(model)
    t = time.time()
    for layer in args.layers.split(","):
        name = {
            "default": default_target_layer(model),
            "localising": localising_layer(model),
        }.get(layer, layer)
        for method, label in (("gradcam", "Grad-CAM"), ("gradcam++", "Grad-CAM++")):
            for reference, suffix in ((None, ""), (normal_val, " from the val normals' mean")):
                heatmaps = grad_cam(
                    model, x_pos, finding, method=method, layer=name, reference=reference
                )
                pointers.append((f"{label}{suffix}, `{name}`", heatmap_peaks(heatmaps)))
                if name == shown_layer and method == "gradcam" and reference is normal_val:
                    heatmaps_for_figure = heatmaps
    cam_seconds = time.time() - t
    t = time.time()
    pointers.append(("occlusion sensitivity (reference)", occlusion_peaks(model, x_pos, finding)))
    occlusion_seconds = time.time() - t
    centre = (args.eval_size - 1) / 2
    pointers.append(("image centre", np.full((n, 2), centre)))

    rows = []
    for name, points in pointers:
        rows.append(
            [name] + [point_hits(points, circles, tolerance=tol).sum() for tol in tolerances]
        )
    random_row, prior_row, prior_points = ["random pixel (expected)"], ["best fixed pixel"], []
    for tol in tolerances:
        random_row.append(hit_masks(circles, args.eval_size, tol).mean(axis=(1, 2)).sum())
        counts = hit_masks(train_circles, args.eval_size, tol).sum(axis=0)
        best = np.unravel_index(np.argmax(counts), counts.shape)
        prior_points.append(best)
        prior_row.append(point_hits(np.tile(best, (n, 1)), circles, tolerance=tol).sum())
    rows += [random_row, prior_row]

    print(
        f"\n{args.backbone} at {args.image_size} px, {args.epochs} epochs, {args.patients} "
        f"patients (seed {args.seed}); test AUROC {auroc:.3f} on {len(y)} images; {n} test "
        f"images with a nodule (radius {circles[:, 2].min():.0f}-{circles[:, 2].max():.0f} px "
        f"at {args.eval_size} px), {int((p[positive] > 0.5).sum())} of them called positive"
    )
    print(
        f"best fixed pixel (chosen on {len(train_circles)} training nodules) per tolerance: "
        f"{[tuple(int(v) for v in b) for b in prior_points]}"
    )
    header = "| pointer | " + " | ".join(f"hits, tolerance {t:g} px" for t in tolerances) + " |"
    print("\n" + header + "\n|" + " --- |" * (len(tolerances) + 1))
    for name, *hits in rows:
        print(f"| {name} | " + " | ".join(_cell(h, n) for h in hits) + " |")
    print(
        f"\ntraining {train_seconds:.0f} s, heatmaps {cam_seconds:.1f} s for "
        f"{4 * n * len(args.layers.split(','))} maps, occlusion {occlusion_seconds:.0f} s, "
        f"total {time.time() - started:.0f} s; "
        f"work folder {out}"
    )
    shown = min(8, n)
    if heatmaps_for_figure is None:  # --layers left the report's layer out
        heatmaps_for_figure = grad_cam(
            model, x_pos[:shown], finding, layer=shown_layer, reference=normal_val
        )
    titles = [f"p={v:.2f}" for v in p[positive][:shown]]
    figure = cam_overlay_figure(x_pos[:shown], heatmaps_for_figure[:shown], titles)
    for ax, (r, c, radius) in zip(figure.axes, circles[:shown], strict=True):
        ax.add_patch(_circle(c, r, radius))
    figure.savefig(out / "gradcam_examples.png")
    print(f"examples: {out / 'gradcam_examples.png'} (the nodule circled)")


def _cell(hits: float, n: int) -> str:
    count = f"{hits:.1f}" if isinstance(hits, float) else f"{hits}"  # expected counts are not whole
    return f"{count} / {n} ({hits / n:.0%})"


def _circle(col: float, row: float, radius: float):
    from matplotlib.patches import Circle

    return Circle((col, row), radius, fill=False, color="white", lw=1)


if __name__ == "__main__":
    main()
