"""Domain shift: train at hospital A, work at hospital B (issue 7).

PneumoniaMNIST (``../shared/data/medmnist/pneumoniamnist.npz``, never copied) becomes two sites
with ``medtransfer.data.site_shift.two_site_dataset``: every split is halved at random **by
image**; site A keeps its images, site B's get another acquisition (half resolution, a darker
and flatter detector response curve, more noise). The two sites are written as PNG files plus a
manifest CSV (site and split columns) into a temporary folder, and every arm goes through the
ordinary spec -> manifest -> ``train`` path with the same budget (backbone, input size, epochs,
batch size, learning rate, augmentation, balanced class weights):

- ``source_only``: labelled A, nothing from B (``method: none, source: [A]``);
- ``dann``, ``coral``, ``mmd``: labelled A plus unlabelled B training images;
- ``adabn``: labelled A, then BatchNormalization statistics re-estimated on B's training images;
- ``oracle``: labelled B (what B could reach with its own labels).

The best epoch is chosen on site A's validation images in every arm except the oracle (B's):
no target label reaches the adaptation arms. Test AUROC is reported per site over ``--seeds``
(mean ± sd). The issue's targets: the best method closes at least half of the gap between
source-only and oracle on B, and no method costs more than 0.02 AUROC on A.

AdaBN's two estimators (exact: one pass per BN layer; single pass in train mode) are timed and
compared on each source-only model. Writes ``domain_shift.json`` into ``--out``.

    .venv/bin/python benchmarks/domain_shift.py --out /tmp/domain_shift [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
NPZ = REPO.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
ARMS = ("source_only", "dann", "coral", "mmd", "adabn", "oracle")


def arm_section(arm: str, weight: float) -> dict:
    if arm == "source_only":
        return {"method": "none", "source": ["A"], "target": ["B"]}
    if arm == "oracle":
        return {"method": "none", "source": ["B"]}
    return {"method": arm, "source": ["A"], "target": ["B"], "weight": weight}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder for domain_shift.json")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--backbone", default="mobilenetv3small")
    parser.add_argument("--weight", type=float, default=1.0, help="alignment loss weight")
    parser.add_argument("--max-per-split", type=int, default=None, help="quick runs")
    parser.add_argument("--keep", action="store_true", help="keep the data and run folders")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="medtransfer-domain-shift-"))
    os.environ.setdefault("MEDTRANSFER_CACHE", str(work / "cache"))

    import keras
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from medtransfer.data.manifest import build_manifest
    from medtransfer.data.pipeline import load_images
    from medtransfer.data.site_shift import AcquisitionShift, describe, two_site_dataset
    from medtransfer.models.adaptation import adapt_batchnorm
    from medtransfer.models.saved import load_run_model
    from medtransfer.rundir import SOURCE_MODEL_FILE
    from medtransfer.spec import spec_from_dict
    from medtransfer.training.run import train

    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shift = AcquisitionShift()
    started = time.time()
    manifest_path = two_site_dataset(
        NPZ, work / "data", shift=shift, seed=0, max_per_split=args.max_per_split
    )
    size = [args.image_size, args.image_size]

    def spec_for(arm: str, seed: int):
        return spec_from_dict(
            {
                "name": "pneumonia_two_sites",
                "task": "binary",
                "classes": ["normal", "pneumonia"],
                "positive_class": "pneumonia",
                "modality": "xray",
                "data": {
                    "format": "manifest",
                    "path": str(manifest_path),
                    "patient_column": "patient_id",
                    "site_column": "site",
                    "split_column": "split",
                },
                "image": {"size": size, "channels": 1},
                "model": {"backbone": args.backbone, "weights": "none"},
                "training": {
                    "epochs": args.epochs,
                    "batch_size": args.batch_size,
                    "learning_rate": 1e-3,
                    "class_weight": "balanced",
                    "seed": seed,
                },
                "domain_adaptation": arm_section(arm, args.weight),
            }
        )

    base = spec_for("source_only", 0)
    manifest = build_manifest(base)
    test = manifest[manifest["split"] == "test"]
    test_x = {site: load_images(rows, size, 1, workers=0) for site, rows in test.groupby("site")}
    test_y = {
        site: (rows["label"] == "pneumonia").to_numpy() for site, rows in test.groupby("site")
    }

    def aurocs(model) -> dict[str, float]:
        return {
            site: float(
                roc_auc_score(test_y[site], model.predict(x, batch_size=256, verbose=0)[:, 1])
            )
            for site, x in test_x.items()
        }

    target_train = load_images(
        manifest[(manifest["split"] == "train") & (manifest["site"] == "B")], size, 1, workers=0
    )
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    adabn_variants: list[dict] = []
    for seed in seeds:
        for arm in arms:
            run_dir = work / "runs" / f"{arm}_seed{seed}"
            t0 = time.time()
            run = train(spec_for(arm, seed), run_dir, workers=0)
            seconds = time.time() - t0
            row = {
                "seed": seed,
                "test_auroc": aurocs(load_run_model(run)),
                "best_epoch": run.info.best_epoch,
                "best_val_auroc": run.info.best_val_auroc,
                "train_seconds": round(seconds, 1),
            }
            if arm == "adabn":
                row["adabn"] = run.info.domain_adaptation["adabn"]
                # the two AdaBN estimators, on the same source-only model
                for exact in (True, False):
                    model = keras.saving.load_model(run_dir / SOURCE_MODEL_FILE)
                    t1 = time.time()
                    adapt_batchnorm(model, target_train, batch_size=128, exact=exact)
                    adabn_variants.append(
                        {
                            "seed": seed,
                            "exact": exact,
                            "seconds": round(time.time() - t1, 1),
                            "test_auroc": aurocs(model),
                        }
                    )
                row["source_model_test_auroc"] = aurocs(
                    keras.saving.load_model(run_dir / SOURCE_MODEL_FILE)
                )
            results[arm].append(row)
            print(f"{arm} seed {seed}: {row['test_auroc']} ({seconds:.0f} s)", flush=True)
            keras.backend.clear_session()
            if not args.keep:
                shutil.rmtree(run_dir, ignore_errors=True)

    def spread(values):
        values = np.asarray(values, float)
        return {
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "values": values.tolist(),
        }

    summary = {
        arm: {site: spread([r["test_auroc"][site] for r in rows]) for site in ("A", "B")}
        for arm, rows in results.items()
    }
    report = {
        "config": {
            "data": str(NPZ.name),
            "shift": describe(shift),
            "images": manifest.groupby(["site", "split"]).size().unstack().to_dict(),
            "backbone": args.backbone,
            "weights": "none",
            "image_size": size,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "alignment_weight": args.weight,
            "seeds": seeds,
            "augmentation": "xray preset (modality xray), both streams",
            "class_weight": "balanced",
            "validation": "site A val (oracle: site B val)",
        },
        "summary": summary,
        "runs": results,
        "adabn_estimators": adabn_variants,
        "total_seconds": round(time.time() - started, 1),
    }
    if {"source_only", "oracle"} <= set(summary):
        low, high = summary["source_only"]["B"]["mean"], summary["oracle"]["B"]["mean"]
        gap = high - low
        methods = [a for a in ("dann", "coral", "mmd", "adabn") if a in summary]
        report["gap_closed"] = {
            a: (summary[a]["B"]["mean"] - low) / gap if gap > 0 else None for a in methods
        }
        report["source_cost"] = {
            a: summary["source_only"]["A"]["mean"] - summary[a]["A"]["mean"] for a in methods
        }
    (out / "domain_shift.json").write_text(json.dumps(report, indent=2))
    print(
        json.dumps(
            {k: report[k] for k in ("summary", "gap_closed", "source_cost") if k in report},
            indent=2,
        )
    )
    print(f"total {report['total_seconds']:.0f} s; wrote {out / 'domain_shift.json'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


if __name__ == "__main__":
    main()
