"""Lean exports (issue 23): file size, CPU latency, test AUROC and decision agreement of LiteRT
float16, LiteRT int8 and ONNX against the SavedModel, all measured in the same process.

Takes finished runs (``--run NAME=RUN_DIR``, repeatable; the issue's two: the BreastMNIST
default run, e.g. ``benchmarks/out/ood_breast``, and the quickstart model, ``medtransfer
quickstart --out DIR`` then ``DIR/run``), never writes into them, and exports each into
``--out`` (a temporary folder by default) as:

- SavedModel, as ``medtransfer export`` writes it (with the OOD score where the run has one);
- SavedModel, probabilities only (the same graph without the OOD head): the like-for-like
  baseline, since the lean graphs compute probabilities only; ratios are against it;
- LiteRT float16, ONNX (float32), and LiteRT int8 as ``--quantize int8`` ships it (the first
  scheme that passes the export's validation check: full integer, selective, weights only);
- each other int8 scheme alone (``export_lean(int8_schemes=(scheme,))``), so the three stand
  side by side; one the check refuses is listed with its validation agreement.

Per model: graph size on disk (SavedModel: ``saved_model.pb`` + ``variables/``; lean: the one
file), CPU latency per image through ``load_predictor`` (what ``score`` and ``evaluate`` use) at
batch 1 and batch 32 (median of ``--repeats`` timed passes after one warm-up pass; the images
are already decoded and at the model's size, so this is the model alone), the AUROC of the
positive class on the run's test split, the share of test images whose top-class decision is
the SavedModel's, and the largest probability difference from it. Printed: one table per run,
each int8 graph's scheme (layers kept float32, share of int8 operations, validation agreement
of each graph tried) and the issue's targets for the shipped int8 (>= 3.5x smaller, AUROC
within 0.005, faster than the SavedModel, decisions agreeing on >= 98% of test images).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIZE_TARGET, AUROC_TARGET, AGREEMENT_TARGET = 3.5, 0.005, 0.98
SCHEME_NAMES = {
    "int8": "full integer",
    "int8_selective": "selective",
    "int8_weights": "weights only",
}
BATCH1_IMAGES = 64  # images timed one at a time per pass


def _folder_bytes(folder: Path) -> int:
    """A SavedModel's graph and weights: saved_model.pb and variables/ (not the card or
    assets.extra, which every format carries alike)."""
    files = [folder / "saved_model.pb", *(folder / "variables").rglob("*")]
    return sum(f.stat().st_size for f in files if f.is_file())


def _saved_model_without_ood(run_dir: Path, out: Path) -> Path:
    """The run's SavedModel with probabilities only (``build_archive`` without a reference),
    the assets of a normal export beside it, so ``load_predictor`` reads it."""
    import shutil

    from medtransfer.export import build_archive, export_model
    from medtransfer.export_layout import EXPORT_OOD
    from medtransfer.models.saved import load_run_model
    from medtransfer.predictor import ModelInfo
    from medtransfer.rundir import open_run

    folder = export_model(run_dir, out)
    run = open_run(run_dir)
    shutil.rmtree(folder / "variables")
    (folder / "saved_model.pb").unlink()
    (folder / EXPORT_OOD).unlink(missing_ok=True)
    archive = build_archive(load_run_model(run), ModelInfo.from_run_info(run.info), None)
    staging = out.parent / f".{out.name}.graph"
    archive.write_out(str(staging), verbose=False)
    for item in ("saved_model.pb", "variables", "fingerprint.pb"):
        if (staging / item).exists():
            shutil.rmtree(folder / item, ignore_errors=True)
            (staging / item).rename(folder / item)
    shutil.rmtree(staging)
    return folder


def _exports(run_dir: Path, out: Path) -> tuple[dict[str, tuple[Path, int]], list[str]]:
    """Every format of one run: name -> (folder, graph bytes), and a line per int8 scheme the
    export's check refused."""
    from medtransfer.errors import ExportError
    from medtransfer.export import export_model
    from medtransfer.export_layout import EXPORT_LEAN, lean_graph
    from medtransfer.lean_export import INT8_SCHEMES, export_lean

    made, refused = {}, []
    saved = export_model(run_dir, out / "saved_model" / "1")
    made["SavedModel (as exported)"] = (saved, _folder_bytes(saved))
    plain = _saved_model_without_ood(run_dir, out / "saved_model_probs" / "1")
    made["SavedModel (probabilities only)"] = (plain, _folder_bytes(plain))
    for name, fmt, quantize in (("LiteRT float16", "litert", "float16"), ("ONNX", "onnx", "none")):
        folder = export_lean(
            run_dir, out / name.replace(" ", "_") / "1", fmt=fmt, quantize=quantize
        )
        made[name] = (folder, lean_graph(folder)[1].stat().st_size)
    folder = export_lean(run_dir, out / "int8_shipped" / "1", fmt="litert", quantize="int8")
    shipped = json.loads((folder / EXPORT_LEAN).read_text())["scheme"]
    made[f"LiteRT int8 {SCHEME_NAMES[shipped]} *"] = (folder, lean_graph(folder)[1].stat().st_size)
    for scheme in (s for s in INT8_SCHEMES if s != shipped):
        name = f"LiteRT int8 {SCHEME_NAMES[scheme]}"
        try:
            folder = export_lean(
                run_dir, out / scheme / "1", fmt="litert", quantize="int8", int8_schemes=(scheme,)
            )
        except ExportError as exc:  # the message names the validation agreement
            refused.append(f"{name}: refused by the export's check: {exc}")
            continue
        made[name] = (folder, lean_graph(folder)[1].stat().st_size)
    return made, refused


def _latency(predictor, images, batch: int, repeats: int) -> float:
    """Milliseconds per image at ``batch`` images a call: median over ``repeats`` passes."""
    predictor.batch_size = batch
    sample = images[:BATCH1_IMAGES] if batch == 1 else images
    if batch > 1 and len(sample) < 4 * batch:  # enough full batches to time
        sample = sample[(list(range(len(sample))) * (4 * batch // len(sample) + 1))[: 4 * batch]]
    sample = sample[: len(sample) // batch * batch]
    predictor.predict_batch(sample[: batch * 2])  # warm-up: trace, allocate
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict_batch(sample)
        times.append((time.perf_counter() - start) / len(sample) * 1000)
    return statistics.median(times)


def measure_run(name: str, run_dir: Path, out: Path, repeats: int) -> tuple[list[dict], list[str]]:
    """One row per format: size, latency at batch 1 and 32, test AUROC and agreement with the
    SavedModel; and the int8 schemes refused."""
    from sklearn.metrics import roc_auc_score

    from medtransfer.export_layout import EXPORT_LEAN
    from medtransfer.lean_export import split_data
    from medtransfer.predictor import ModelInfo, load_predictor
    from medtransfer.rundir import open_run

    run = open_run(run_dir)
    info = ModelInfo.from_run_info(run.info)
    test = split_data(run, info, "test")
    if test is None:
        raise SystemExit(f"{run_dir}: its test images are not readable here")
    images, y = test
    k = info.class_names.index(info.positive_class or info.class_names[-1])
    rows, reference = [], None
    made, refused = _exports(run_dir, out / name)
    for model, (folder, size) in made.items():
        predictor = load_predictor(folder)
        probabilities = predictor.predict_batch(images)
        if model == "SavedModel (probabilities only)":
            reference = probabilities
        record_file = folder / EXPORT_LEAN
        rows.append(
            {
                "model": model,
                "bytes": size,
                "batch1_ms": _latency(predictor, images, 1, repeats),
                "batch32_ms": _latency(predictor, images, 32, repeats),
                "auroc": float(roc_auc_score(y[:, k], probabilities[:, k])),
                "probabilities": probabilities,
                "record": json.loads(record_file.read_text()) if record_file.is_file() else None,
            }
        )
    for row in rows:
        probabilities = row.pop("probabilities")
        row["agree"] = float(np.mean(probabilities.argmax(1) == reference.argmax(1)))
        row["max_dp"] = float(np.abs(probabilities - reference).max())
    return rows, refused


def _int8_line(row: dict) -> str:
    """What an int8 graph is: its scheme, the layers it keeps float32, its int8 operations and
    the validation agreement of each graph the export tried."""
    record = row["record"]
    floats = record.get("denylisted", [])
    kept = ", ".join(f"{d['op']} (rmse/scale {d['rmse_per_scale']:.3g})" for d in floats[:4])
    more = f" and {len(floats) - 4} more" if len(floats) > 4 else ""
    tried = ", ".join(f"{k} {v:.1%}" for k, v in record["tried"].items())
    return (
        f"  {row['model']}: scheme {record['scheme']}; {len(floats)} "
        f"layer{'' if len(floats) == 1 else 's'} float32"
        f"{': ' + kept + more if floats else ''}; {record['int8_ops']:.1%} of operations int8; "
        f"validation agreement of the graphs tried: {tried}"
    )


def table(name: str, run_dir: Path, rows: list[dict], refused: list[str], n_test: int) -> str:
    base = next(r for r in rows if r["model"] == "SavedModel (probabilities only)")
    lines = [
        f"{name}: {run_dir} (test images: {n_test}); ratios against the SavedModel "
        "(probabilities only): size = SavedModel / x, speed-up = SavedModel ms / x ms; agree = "
        "same top-class decision as it on the test images, max|dp| = largest probability change",
        f"{'model':34} {'MB':>7} {'smaller':>8} {'b1 ms':>8} {'speed-up':>8} {'b32 ms':>8} "
        f"{'speed-up':>8} {'AUROC':>7} {'dAUROC':>8} {'agree':>7} {'max|dp|':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r['model']:34} {r['bytes'] / 1e6:7.2f} {base['bytes'] / r['bytes']:7.2f}x "
            f"{r['batch1_ms']:8.2f} {base['batch1_ms'] / r['batch1_ms']:7.2f}x "
            f"{r['batch32_ms']:8.2f} {base['batch32_ms'] / r['batch32_ms']:7.2f}x "
            f"{r['auroc']:7.4f} {r['auroc'] - base['auroc']:+8.4f} {r['agree']:7.1%} "
            f"{r['max_dp']:8.2g}"
        )
    int8_rows = [r for r in rows if r["model"].startswith("LiteRT int8")]
    lines += ["int8 graphs (* = what --quantize int8 ships):"]
    lines += [_int8_line(r) for r in int8_rows] + [f"  {line}" for line in refused]
    int8 = next(r for r in int8_rows if r["model"].endswith("*"))
    smaller = base["bytes"] / int8["bytes"]
    d_auroc = abs(int8["auroc"] - base["auroc"])
    faster = min(base["batch1_ms"] / int8["batch1_ms"], base["batch32_ms"] / int8["batch32_ms"])
    lines += [
        f"targets for the shipped LiteRT int8 ({int8['record']['scheme']}):",
        f"  >= {SIZE_TARGET}x smaller: {smaller:.2f}x -> "
        f"{'met' if smaller >= SIZE_TARGET else 'NOT met'}",
        f"  AUROC within {AUROC_TARGET}: {d_auroc:.4f} -> "
        f"{'met' if d_auroc <= AUROC_TARGET else 'NOT met'}",
        f"  faster on CPU (batch 1 and 32): {faster:.2f}x at worst -> "
        f"{'met' if faster > 1 else 'NOT met'}",
        f"  decisions agree on >= {AGREEMENT_TARGET:.0%} of test images: {int8['agree']:.1%} -> "
        f"{'met' if int8['agree'] >= AGREEMENT_TARGET else 'NOT met'}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR, repeatable")
    parser.add_argument("--out", help="where the exports go (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # degenerate-model etc. are noted
    with tempfile.TemporaryDirectory(prefix="lean-bench-") as scratch:
        out = Path(args.out or scratch)
        print(f"CPU threads: {len(os.sched_getaffinity(0))}")
        for item in args.run:
            name, _, run_dir = item.partition("=")
            rows, refused = measure_run(name, Path(run_dir), out, args.repeats)
            from medtransfer.rundir import open_run

            n_test = open_run(run_dir).info.images.get("test", 0)
            print()
            print(table(name, Path(run_dir), rows, refused, n_test), flush=True)


if __name__ == "__main__":
    main()
