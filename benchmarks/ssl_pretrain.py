"""Pretraining without ImageNet (issue 21): SimSiam on the training images vs training from
scratch at the same CPU budget, linear probes, and LoRA / norm-only fine-tuning.

    python benchmarks/ssl_pretrain.py --out OUT --arm ssl        # pretrain, probes, fine-tunes
    python benchmarks/ssl_pretrain.py --out OUT --arm scratch    # from scratch (both budgets)
    python benchmarks/ssl_pretrain.py --out OUT --table          # the table of what finished

    python benchmarks/ssl_pretrain.py --out OUT --arm scarce --label-fraction 0.1 \
        --ssl-from RUN                                          # few labels, SSL on all images

``--objective simclr`` pretrains with SimCLR instead of SimSiam (``--temperature``);
``--probe-only`` stops the SSL arm after the probe on its features (a run without it goes on
from there).

``--main-only`` runs the two rows the issue's target compares (SimSiam then full fine-tuning,
and scratch at the same budget) and skips the probes, LoRA / norm and the shipped-budget
scratch row; ``--ft-lr-factor`` sets the fine-tuning phase's learning-rate factor.

``--arm scarce`` is the archive's case: a pretraining run ``--ssl-from`` made on every training
image, but labels for only a stratified ``--label-fraction`` of them (the seed draws which). It
writes that labelled subset as ``OUT/data/labelled.npz`` (validation and test unchanged) and
compares probes on random and SSL features, fine-tuning from the SSL weights, and scratch with
twice the fine-tuning's epochs; the pretraining's CPU is paid once for the archive, not per model.

Arms run one row after another and skip rows already in ``OUT/results/``, so a killed arm is
restarted by running it again; the two arms can run at the same time. Every model is judged
once on the test split with the clinical report of ``evaluate`` (a probe with the same code).
CPU minutes are the training processes' CPU time (``run.json`` ``cpu_seconds``; probes: this
process's CPU time for the probe), excluding evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medtransfer.evaluation.clinical import ClinicalSettings
from medtransfer.evaluation.probe import probe
from medtransfer.evaluation.report import evaluate
from medtransfer.rundir import is_run, open_run
from medtransfer.spec import Spec, load_spec
from medtransfer.training.pretrain import pretrain
from medtransfer.training.run import train

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ClinicalSettings(bootstrap_resamples=500, gradcam_examples=0)
# Fine-tuning a self-supervised backbone: a short head phase, then every block at the full rate
# with BatchNormalization training (fine_tune.batchnorm auto does that for run: sources); the
# schedule that worked best for a medical source (benchmarks/RESULTS.md, issue 4).
SSL_FINE_TUNE = {"head_epochs": 2, "unfreeze": 1000, "learning_rate_factor": 1.0}


def _save(out: Path, row: str, record: dict) -> None:
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{row}.json").write_text(json.dumps(record, indent=1))
    print(f"[{time.strftime('%H:%M:%S')}] {row}: {record}", flush=True)


def _done(out: Path, row: str) -> bool:
    return (out / "results" / f"{row}.json").is_file()


def _train_and_test(out: Path, row: str, spec: Spec, note: str) -> None:
    """Train ``spec`` (resuming a killed run), evaluate it once on test, record the row."""
    if _done(out, row):
        return
    run_dir = out / "runs" / row
    started = run_dir.is_dir() and not is_run(run_dir)
    run = (
        open_run(run_dir)
        if is_run(run_dir)
        else train(None if started else spec, run_dir, resume=started)
    )
    report = evaluate(run.path, spec, out_dir=out / "reports" / row, settings=SETTINGS)
    phases = (run.info.fine_tune or {}).get("phases", {})
    last = phases.get("fine_tune") or phases.get("full") or {}
    _save(
        out,
        row,
        {
            "test_auroc": report.auroc,
            "test_accuracy": report.metrics["accuracy"],
            "best_val_auroc": run.info.best_val_auroc,
            "cpu_min": round(run.info.cpu_seconds / 60, 1),
            "wall_min": round(run.info.train_seconds / 60, 1),
            "trainable_params": last.get("trainable_params"),
            "total_params": last.get("total_params"),
            "note": note,
        },
    )


def _probe(out: Path, row: str, spec: Spec, weights: str) -> None:
    if _done(out, row):
        return
    cpu, wall = time.process_time(), time.time()
    result = probe(spec, weights, out / "reports" / row, settings=SETTINGS)
    _save(
        out,
        row,
        {
            "test_auroc": result.auroc,
            "test_accuracy": result.metrics["accuracy"],
            "best_val_auroc": result.val_auroc[result.c],
            "cpu_min": round((time.process_time() - cpu) / 60, 2),
            "wall_min": round((time.time() - wall) / 60, 2),
            "note": f"C={result.c:g}, {result.feature_dim} features",
        },
    )


def ssl_arm(
    out: Path,
    spec: Spec,
    ssl_epochs: int,
    epochs: int,
    fine_tune: dict,
    main_only: bool,
    probe_only: bool = False,
) -> None:
    """Probe on random features, SSL, a probe on its features, then fine-tuning from it."""
    if not main_only:
        _probe(out, "probe_random", spec, "none")
    ssl_dir = out / "runs" / "ssl_pretrain"
    if not is_run(ssl_dir):
        resume = ssl_dir.is_dir()
        ssl_spec = spec.with_overrides(training={"epochs": ssl_epochs, "batch_size": 64})
        pretrain(None if resume else ssl_spec, ssl_dir, resume=resume)
    info = open_run(ssl_dir).info
    if not _done(out, "ssl_pretrain"):
        record = {
            "cpu_min": round(info.cpu_seconds / 60, 1),
            "wall_min": round(info.train_seconds / 60, 1),
        }
        _save(out, "ssl_pretrain", {**record, "loss": info.pretraining["loss"]})
    source = f"run:{ssl_dir}"
    if not main_only:
        _probe(out, "probe_ssl", spec, source)
    if probe_only:
        return
    tuned = {"epochs": epochs, "fine_tune": fine_tune}
    _train_and_test(
        out, "ft_full_ssl", spec.with_overrides(model={"weights": source}, training=tuned), "full"
    )
    for method, extra in () if main_only else (("lora", {"lora_rank": 8}), ("norm", {})):
        # each method from the full row's settings: LoRA's rank must not leak into norm's
        method_tune = {**fine_tune, "method": method, **extra}
        tuned_spec = spec.with_overrides(
            model={"weights": source}, training={**tuned, "fine_tune": method_tune}
        )
        _train_and_test(out, f"ft_{method}_ssl", tuned_spec, method)


def scratch_arm(out: Path, spec: Spec, budget_epochs: int, epochs: int, main_only: bool) -> None:
    """The shipped recipe from random weights: at the SSL arm's total budget, and as shipped."""
    _train_and_test(
        out, "scratch_budget", spec.with_overrides(training={"epochs": budget_epochs}), "scratch"
    )
    if main_only:
        return
    _train_and_test(
        out, "scratch_default", spec.with_overrides(training={"epochs": epochs}), "scratch"
    )
    _probe(out, "probe_scratch", spec, f"run:{out / 'runs' / 'scratch_default'}")


def labelled_subset(spec: Spec, fraction: float, seed: int, out: Path) -> Spec:
    """``spec`` on a stratified ``fraction`` of its npz training split; val and test as they are."""
    data = np.load(spec.data.path)
    labels = data["train_labels"].reshape(len(data["train_labels"]), -1)[:, 0]
    rng = np.random.default_rng(seed)
    keep = np.sort(
        np.concatenate(
            [
                rng.choice(idx, max(1, round(fraction * len(idx))), replace=False)
                for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))
            ]
        )
    )
    arrays = {k: data[k] for k in data.files}
    arrays["train_images"] = data["train_images"][keep]
    arrays["train_labels"] = data["train_labels"][keep]
    (out / "data").mkdir(parents=True, exist_ok=True)
    path = (out / "data" / "labelled.npz").resolve()
    np.savez(path, **arrays)
    print(f"labelled subset: {len(keep)} of {len(labels)} training images -> {path}")
    return spec.with_overrides(data={"path": str(path)})


def scarce_arm(out: Path, spec: Spec, ssl_run: Path, epochs: int, fine_tune: dict) -> None:
    """Few labels, SSL on every training image: probes, fine-tuning from SSL, scratch (2x)."""
    _probe(out, "scarce_probe_random", spec, "none")
    source = f"run:{ssl_run}"
    _probe(out, "scarce_probe_ssl", spec, source)
    tuned = {"epochs": epochs, "fine_tune": fine_tune}
    _train_and_test(
        out,
        "scarce_ft_full_ssl",
        spec.with_overrides(model={"weights": source}, training=tuned),
        f"full, {epochs} epochs",
    )
    _train_and_test(
        out,
        "scarce_scratch",
        spec.with_overrides(training={"epochs": 2 * epochs}),
        f"scratch, {2 * epochs} epochs",
    )


def table(out: Path) -> str:
    lines = [
        "| row | test AUROC | test accuracy | val AUROC | CPU min | wall min "
        "| trainable / total params | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted((out / "results").glob("*.json")):
        r = json.loads(path.read_text())
        params = (
            f"{r['trainable_params']:,} / {r['total_params']:,}"
            if r.get("trainable_params")
            else ""
        )

        def fmt(key: str, r: dict = r) -> str:
            return "" if r.get(key) is None else f"{r[key]:.3f}"

        lines.append(
            f"| {path.stem} | {fmt('test_auroc')} | {fmt('test_accuracy')} "
            f"| {fmt('best_val_auroc')} "
            f"| {r.get('cpu_min', '')} | {r.get('wall_min', '')} | {params} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--spec", type=Path, default=REPO / "data_specs" / "breastmnist.yaml")
    parser.add_argument("--arm", choices=["ssl", "scratch", "scarce"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ssl-epochs", type=int, default=10)
    parser.add_argument(
        "--epochs", type=int, default=20, help="fine-tuning / shipped scratch epochs"
    )
    parser.add_argument("--budget-epochs", type=int, default=40, help="scratch at the SSL budget")
    parser.add_argument("--ft-lr-factor", type=float, default=SSL_FINE_TUNE["learning_rate_factor"])
    parser.add_argument("--label-fraction", type=float, default=0.1, help="--arm scarce")
    parser.add_argument("--ssl-from", type=Path, help="--arm scarce: the pretraining run")
    parser.add_argument("--objective", choices=["simsiam", "simclr"], default="simsiam")
    parser.add_argument("--temperature", type=float, default=0.2, help="simclr's")
    parser.add_argument("--probe-only", action="store_true", help="SSL arm: stop after probes")
    parser.add_argument("--main-only", action="store_true", help="only the target's two rows")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    spec = load_spec(args.spec).with_overrides(
        training={"seed": args.seed},
        pretraining={"objective": args.objective, "temperature": args.temperature},
    )
    if args.arm == "ssl":
        fine_tune = SSL_FINE_TUNE | {"learning_rate_factor": args.ft_lr_factor}
        ssl_arm(
            args.out,
            spec,
            args.ssl_epochs,
            args.epochs,
            fine_tune,
            args.main_only,
            args.probe_only,
        )
    elif args.arm == "scarce":
        if args.ssl_from is None:
            parser.error("--arm scarce needs --ssl-from RUN")
        fine_tune = SSL_FINE_TUNE | {"learning_rate_factor": args.ft_lr_factor}
        subset = labelled_subset(spec, args.label_fraction, args.seed, args.out)
        scarce_arm(args.out, subset, args.ssl_from, args.epochs, fine_tune)
    elif args.arm == "scratch":
        scratch_arm(args.out, spec, args.budget_epochs, args.epochs, args.main_only)
    if args.table or not args.arm:
        print(table(args.out))


if __name__ == "__main__":
    main()
