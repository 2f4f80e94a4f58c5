"""The ``medtransfer`` command line: a thin layer over the Python API.

Exit codes (the contract in DESIGN.md): 0 done, 1 done with per-file errors, 2 bad usage, a bad
spec, or inputs the command cannot work with; 3 the command failed (a full disk, a read-only
output, a crash); 130 interrupted (Ctrl-C). Each is reported in one line, without a traceback
(``MEDTRANSFER_DEBUG=1`` adds it for a failure).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile
import textwrap
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

from medtransfer.errors import DegenerateModelWarning, MedtransferError
from medtransfer.spec import Preset

EXIT_OK, EXIT_FILE_ERRORS, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_RESUMABLE = {
    "train": "--resume",
    "pretrain": "--resume",
    "score": "--resume",
    "inspect": "--resume",
}


# Verbs whose work imports TensorFlow; the others (inspect, compare, backbones, ...) never load it.
_TF_VERBS = frozenset(
    [
        "train",
        "augment-preview",
        "lr-find",
        "pretrain",
        "probe",
        "evaluate",
        "robustness",
        "ensemble",
        "export",
        "score",
        "sites",
        "quickstart",
        "weights",  # download loads the file into the architecture to check it
    ]
)
# TensorFlow's start-up lines: absl writes everything logged before its InitializeLog to stderr,
# whatever TF_CPP_MIN_LOG_LEVEL says (the oneDNN notice, the CUDA-driver probe, twice: two
# libraries log them), then the CPU-feature notice and, on a machine without a GPU, cuInit's
# E-level failure when the devices are first listed.
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)"
    r"|[IW]\d{4} [\d:. ]+\d+ \S+\.cc:\d+\]"
    r"|To enable the following instructions:)"
)
_NO_GPU_NOISE = re.compile(r"^E\d{4} [\d:. ]+\d+ cuda_\w+\.cc:\d+\] failed call to cuInit")


def _quiet_tensorflow() -> bool:
    """Whether to hide TensorFlow's start-up chatter: not with ``MEDTRANSFER_DEBUG=1`` and not
    when the user set ``TF_CPP_MIN_LOG_LEVEL=0`` (their own settings win)."""
    if os.environ.get("MEDTRANSFER_DEBUG") or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    return True


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow and list its devices with stderr (file descriptor 2, where its C++
    code writes) caught, then pass on every caught line but the start-up noise, so a real
    error still shows. cuInit's failure counts as noise only with no ``/dev/nvidia*``."""
    noise = [_STARTUP_NOISE] + ([] if glob.glob("/dev/nvidia*") else [_NO_GPU_NOISE])
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines()
            kept = [line for line in lines if not any(n.match(line) for n in noise)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def _spec_with_overrides(args: argparse.Namespace):
    from medtransfer.spec import load_spec

    spec = load_spec(args.spec)
    size = (args.image_size, args.image_size) if args.image_size else None
    return spec.with_overrides(
        model={"backbone": args.backbone, "weights": args.weights},
        training={
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "seed": args.seed,
        },
        image={"size": size},
        augmentation={"preset": args.augment},
    )


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def cmd_train(args: argparse.Namespace) -> int:
    from medtransfer.training.devices import plan_execution
    from medtransfer.training.run import train
    from medtransfer.training.seeds import train_seeds

    if not args.resume and not args.spec:
        raise MedtransferError("--spec is required (or --resume to carry on an unfinished run)")
    if args.seeds and args.seed is not None:
        raise MedtransferError("give either --seed or --seeds, not both")
    spec = _spec_with_overrides(args) if args.spec else None
    options = {"overwrite": args.overwrite, "resume": args.resume, "workers": args.workers}
    if args.seeds:
        print(train_seeds(spec, args.out, args.seeds, **options).summary())
        return EXIT_OK
    run = train(spec, args.out, **options)
    info = run.info
    auroc = info.best_val_auroc  # null in run.json when validation AUROC was undefined
    if not plan_execution().is_chief:
        print(f"worker done; the chief (worker 0) writes the run ({info.train_seconds} s)")
        return EXIT_OK
    print(
        f"run written to {run.path}: best validation AUROC "
        f"{'undefined' if auroc is None else f'{auroc:.4f}'} "
        f"at epoch {info.best_epoch}/{info.epochs_run} ({info.train_seconds} s)"
    )
    return EXIT_OK


def cmd_pretrain(args: argparse.Namespace) -> int:
    from medtransfer.training.pretrain import pretrain

    if not args.resume and not args.spec:
        raise MedtransferError("--spec is required (or --resume to carry on an unfinished run)")
    spec = _spec_with_overrides(args) if args.spec else None
    if spec is not None:
        objective = {"objective": args.objective, "temperature": args.temperature}
        spec = spec.with_overrides(pretraining=objective)
    run = pretrain(
        spec,
        args.out,
        unlabeled=args.unlabeled,
        overwrite=args.overwrite,
        resume=args.resume,
        workers=args.workers,
    )
    info, loss = run.info, run.info.pretraining["loss"]
    print(
        f"pretraining run written to {run.path}: {info.epochs_run} epochs on "
        f"{sum(info.images.values())} images, loss {loss[0]:.4f} -> {loss[-1]:.4f} "
        f"({info.train_seconds} s); use it with --weights run:{run.path}"
    )
    return EXIT_OK


def cmd_probe(args: argparse.Namespace) -> int:
    from medtransfer.evaluation.clinical import ClinicalSettings
    from medtransfer.evaluation.probe import probe
    from medtransfer.spec import load_spec

    spec = load_spec(args.spec)
    settings = ClinicalSettings(bootstrap_resamples=args.bootstrap, seed=args.ci_seed)
    result = probe(spec, args.weights, args.out, workers=args.workers, settings=settings)
    print(result.summary())
    print(f"report written to {result.out_dir} (report.html, metrics.json, predictions.csv, ...)")
    return EXIT_OK


def cmd_lr_find(args: argparse.Namespace) -> int:
    from medtransfer.training.lr_find import lr_find

    result = lr_find(
        _spec_with_overrides(args),
        args.out,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        steps=args.steps,
        phase=args.phase,
        workers=args.workers,
    )
    print(result.summary())
    print(f"curve written to {Path(args.out) / 'lr_find.png'} (and lr_find.csv, lr_find.json)")
    return EXIT_OK


def cmd_augment_preview(args: argparse.Namespace) -> int:
    from medtransfer.data.preview import write_augment_preview
    from medtransfer.spec import load_spec

    spec = load_spec(args.spec)
    if args.augment:
        spec = spec.with_overrides(augmentation={"preset": args.augment})
    path = write_augment_preview(
        spec, args.out, seed=args.seed, count=args.count, versions=args.versions
    )
    print(f"preview written to {path}")
    return EXIT_OK


def cmd_weights_download(args: argparse.Namespace) -> int:
    from medtransfer.models.weights import download_weights

    path = download_weights(args.name, args.out, mirror=args.mirror)
    print(f"{path} (verified; use it with --weights {path} or model.weights: {path})")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medtransfer.evaluation.clinical import ClinicalSettings
    from medtransfer.evaluation.report import evaluate
    from medtransfer.evaluation.robustness import RobustnessSettings
    from medtransfer.rundir import SPEC_FILE, is_seeds_dir
    from medtransfer.spec import load_spec

    options = {"split": args.split, "out_dir": args.out, "workers": args.workers}
    if is_seeds_dir(args.model):
        if args.robustness:
            raise MedtransferError(
                f"{args.model} is a seeds folder: --robustness assesses one model; pass one "
                "seed's run (or use `medtransfer robustness` per seed)"
            )
        from medtransfer.evaluation.seeds import SUMMARY_FILE, evaluate_seeds

        spec = load_spec(args.spec) if args.spec else None
        print(evaluate_seeds(args.model, spec, **options).summary())
        print(f"reports written to {args.out}/seed_*/, the spread to {args.out}/{SUMMARY_FILE}")
        return EXIT_OK
    spec_path = args.spec or Path(args.model) / SPEC_FILE
    if not Path(spec_path).is_file():
        raise MedtransferError(f"no spec given and {spec_path} does not exist; pass --spec SPEC")
    settings = ClinicalSettings(
        bootstrap_resamples=args.bootstrap,
        seed=args.ci_seed,
        target_sensitivity=args.target_sensitivity,
        target_specificity=args.target_specificity,
    )
    spec = load_spec(spec_path)
    robustness = RobustnessSettings(clinical=settings) if args.robustness else None
    result = evaluate(
        args.model, spec, settings=settings, tta=args.tta, robustness=robustness, **options
    )
    print(result.summary())
    if robustness is not None:
        _print_robustness(result.metrics["robustness"])
    print(f"report written to {result.out_dir} (report.html, metrics.json, predictions.csv, ...)")
    return EXIT_OK


def _epsilon_list(text: str) -> tuple[float, ...]:
    """Epsilons as numbers or fractions of 255 ("1/255,2/255,4/255"), each in [0, 1]."""
    values = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            top, _, bottom = part.partition("/")
            value = float(top) / float(bottom or 1)
        except (ValueError, ZeroDivisionError):
            value = -1.0
        if not 0 <= value <= 1:
            message = f"expected epsilons such as 2/255 or 0.01, got {part!r}"
            raise argparse.ArgumentTypeError(message)
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("expected at least one epsilon")
    return tuple(values)


def _auroc_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def cmd_robustness(args: argparse.Namespace) -> int:
    from medtransfer.evaluation.clinical import ClinicalSettings
    from medtransfer.evaluation.corruptions import CORRUPTIONS
    from medtransfer.evaluation.robustness import RobustnessSettings, assess_robustness
    from medtransfer.evaluation.robustness_report import write_robustness
    from medtransfer.rundir import SPEC_FILE
    from medtransfer.spec import load_spec

    spec_path = args.spec or Path(args.model) / SPEC_FILE
    if not Path(spec_path).is_file():
        raise MedtransferError(f"no spec given and {spec_path} does not exist; pass --spec SPEC")
    chosen = CORRUPTIONS if args.corruptions == "all" else args.corruptions.split(",")
    names = [n.strip() for n in chosen if n.strip()]
    unknown = sorted(set(names) - set(CORRUPTIONS))
    if unknown:
        raise MedtransferError(f"unknown corruption(s) {unknown}; choose from {list(CORRUPTIONS)}")
    settings = RobustnessSettings(
        epsilons=args.epsilons,
        pgd_steps=args.pgd_steps,
        pgd_step_size=args.pgd_step_size,
        random_start=not args.no_random_start,
        corruptions=tuple(names),
        seed=args.seed,
        batch_size=args.batch_size,
        clinical=ClinicalSettings(bootstrap_resamples=args.bootstrap, seed=args.ci_seed),
    )
    spec = load_spec(spec_path)
    result = assess_robustness(
        args.model, spec, split=args.split, workers=args.workers, settings=settings
    )
    out = write_robustness(result, args.out)
    _print_robustness(result.metrics)
    print(f"written to {out} (robustness.json, robustness.csv, robustness.html, PNG figures)")
    return EXIT_OK


def _print_robustness(metrics: dict) -> None:
    """The headline of a robustness assessment (robustness.json, or a report's section)."""
    summary = metrics["summary"]
    print(f"clean AUROC {_auroc_text(summary['clean_auroc'])}")
    for method, values in summary["adversarial_auroc"].items():
        shown = ", ".join(f"{eps} {_auroc_text(auc)}" for eps, auc in values.items())
        print(f"{method.upper()} AUROC at epsilon {shown}")
    if "attacks_skipped" in metrics:
        print(f"no attacks: {metrics['attacks_skipped']}")
    print(f"mean corruption AUROC {_auroc_text(summary['mean_corruption_auroc'])}")


def cmd_compare(args: argparse.Namespace) -> int:
    from medtransfer import atomic
    from medtransfer.evaluation.compare import compare_reports, comparison_summary

    result = compare_reports(args.report_a, args.report_b)
    print(comparison_summary(result, args.report_a, args.report_b))
    if args.out:
        atomic.write_json(args.out, result)
    return EXIT_OK


def cmd_ensemble(args: argparse.Namespace) -> int:
    from medtransfer.training.ensemble import create_ensemble

    path = create_ensemble(args.runs, args.out, method=args.method, overwrite=args.overwrite)
    print(f"ensemble of {len(args.runs)} runs ({args.method}) written to {path}; evaluate and "
          "export it like any run")  # fmt: skip
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from medtransfer.lean_export import check_choice

    check_choice(args.format, args.quantize)
    if args.format != "saved_model":
        return _export_lean(args)
    from medtransfer.export import export_model

    path = export_model(
        args.run, args.out, overwrite=args.overwrite, tta=args.tta, calibrate=args.calibrated
    )
    print(f"SavedModel written to {path} (signatures: serving_default, predict_png)")
    return EXIT_OK


def _export_lean(args: argparse.Namespace) -> int:
    from medtransfer.errors import ExportError
    from medtransfer.lean_export import export_lean

    if args.tta or args.calibrated:
        flag = "--tta" if args.tta else "--calibrated"
        raise ExportError(f"{flag} is built into SavedModel exports only (--format saved_model)")
    path = export_lean(
        args.run, args.out, fmt=args.format, quantize=args.quantize, overwrite=args.overwrite
    )
    kind = args.format + ("" if args.quantize == "none" else f" {args.quantize}")
    print(f"{kind} model written to {path} (input: images at the model's size; no OOD score)")
    return EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    from medtransfer.predictor import load_predictor
    from medtransfer.scoring import ScoringError, score_folder

    if bool(args.dicomweb) == bool(args.input_dir):
        raise ScoringError("give INPUT_DIR or --dicomweb URL (one of them)")
    if args.dicomweb:
        return _score_dicomweb(args)
    pacs_only = [f"--{n.replace('_', '-')}" for n in _PACS_ONLY if getattr(args, n)]
    if pacs_only:
        raise ScoringError(f"{', '.join(pacs_only)}: only with --dicomweb URL")
    if args.engine == "ray":
        return _score_on_ray(args)
    predictor = load_predictor(args.model, batch_size=args.batch_size)
    summary = score_folder(
        args.input_dir,
        predictor,
        args.out,
        workers=args.workers,
        batch_size=args.batch_size,
        resume=args.resume,
        progress=not args.no_progress,
        decode_here=not args.pool_only,
        limits=_decode_limits(args),
        strict=args.strict,
        ood_percentile=args.ood_percentile,
    )
    print(summary)
    return summary.exit_code


_PACS_ONLY = ("study", "query", "series_rules", "sr", "stow")


def _score_dicomweb(args: argparse.Namespace) -> int:
    from medtransfer.pacs.client import Server
    from medtransfer.pacs.rules import DEFAULT_RULES
    from medtransfer.pacs.score import Reports, score_dicomweb
    from medtransfer.pacs.sr import algorithm_of
    from medtransfer.predictor import load_predictor
    from medtransfer.scoring import ScoreOptions, ScoringError

    if args.engine != "local":
        raise ScoringError("--dicomweb scores with the local engine only")
    reports = None
    if args.sr or args.stow:
        algorithm, decisions = algorithm_of(args.model, args.operating_point)
        stow = Server(args.stow, args.dicomweb_timeout) if args.stow else None
        folder = Path(args.sr) if args.sr else None
        reports = Reports(algorithm, tuple(decisions), folder, stow)
    server = Server(args.dicomweb, args.dicomweb_timeout)
    predictor = load_predictor(args.model, batch_size=args.batch_size)
    options = ScoreOptions(args.workers, args.batch_size, args.resume, not args.no_progress,
                           _decode_limits(args), args.strict, args.ood_percentile)  # fmt: skip
    summary = score_dicomweb(
        server,
        predictor,
        args.out,
        study=args.study,
        query=args.query,
        rules=args.series_rules or DEFAULT_RULES,
        reports=reports,
        options=options,
    )
    print(summary)
    return summary.exit_code


def _score_on_ray(args: argparse.Namespace) -> int:
    from medtransfer.ray_scoring import RayOptions, score_folder_ray

    options = RayOptions(args.address, args.ray_decoders, args.ray_models)
    summary = score_folder_ray(
        args.input_dir,
        args.model,
        args.out,
        ray_options=options,
        batch_size=args.batch_size,
        resume=args.resume,
        limits=_decode_limits(args),
        strict=args.strict,
        ood_percentile=args.ood_percentile,
    )
    print(summary)
    return summary.exit_code


def cmd_inspect(args: argparse.Namespace) -> int:
    from medtransfer.inspect import inspect_folder

    options = {"workers": args.workers, "resume": args.resume, "progress": not args.no_progress}
    summary = inspect_folder(args.input_dir, args.out, limits=_decode_limits(args), **options)
    print(summary)
    return summary.exit_code


def cmd_monitor(args: argparse.Namespace) -> int:
    from medtransfer.monitoring import MonitorThresholds, monitor

    names = [name for name, *_ in _MONITOR_THRESHOLDS.values()]
    thresholds = MonitorThresholds(**{name: getattr(args, name) for name in names})
    result = monitor(args.scores, args.model, args.out, thresholds)
    print(result)
    for alarm in result.alarms:
        print(f"  alarm: {alarm}")
    return result.exit_code


def _decode_limits(args: argparse.Namespace):
    from medtransfer.folder_pool import DecodeLimits

    return DecodeLimits(
        timeout=args.decode_timeout or None,
        memory=int(args.worker_memory * 2**30) if args.worker_memory else None,
        max_pixels=args.max_pixels or None,
    )


def _add_decode_limits(parser: argparse.ArgumentParser) -> None:
    from medtransfer.folder_pool import DEFAULT_TIMEOUT, DEFAULT_WORKER_MEMORY
    from medtransfer.io import DEFAULT_MAX_PIXELS

    limits = parser.add_argument_group("limits per file (0 lifts a limit)")
    limits.add_argument(
        "--decode-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="a file still decoding after this long becomes an error row and its worker is "
        "replaced (default: %(default)g)",
    )
    limits.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse, before decoding, an image whose header claims more samples "
        "(rows x columns x samples x frames decoded) (default: %(default)d)",
    )
    limits.add_argument(
        "--worker-memory",
        type=float,
        default=DEFAULT_WORKER_MEMORY / 2**30,
        metavar="GIB",
        help="address-space cap of each decode worker (default: %(default)g)",
    )


def cmd_sites(args: argparse.Namespace) -> int:
    from medtransfer.evaluation.sites import site_report
    from medtransfer.spec import load_spec

    report = site_report(
        load_spec(args.spec),
        args.out,
        model=args.model,
        workers=args.workers,
        max_per_site=args.max_per_site,
        seed=args.seed,
    )
    print(report.summary())
    return EXIT_OK


def cmd_quickstart(args: argparse.Namespace) -> int:
    from medtransfer.quickstart import run_quickstart

    result = run_quickstart(
        args.out,
        epochs=args.epochs,
        n_patients=args.patients,
        backbone=args.backbone,
        seed=args.seed,
    )
    print(result.summary())
    return EXIT_OK


def cmd_backbones(args: argparse.Namespace) -> int:
    from medtransfer.models.backbones import backbone_table

    print(backbone_table())
    return EXIT_OK


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; each option's default appended to its help,
    unless the help already says it or there is none worth saying (None, off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False:
            return text
        if default == argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


# Per verb: the one-paragraph description and example commands shown by ``VERB --help``.
_DOCS: dict[str, tuple[str, list[str]]] = {
    "train": (
        "Train a model from a data spec (YAML) into a new run directory: run.json, model.keras, "
        "history.csv, the manifest and the spec as used. With pretrained weights training runs "
        "a head phase with the backbone frozen, then fine-tunes its top blocks; with weights "
        "none the whole network trains from the start. Flags override the spec's values; "
        "--resume carries on a killed run from its last finished epoch.",
        [
            "medtransfer train --spec data_specs/breastmnist.yaml --out runs/breast",
            "medtransfer train --spec data_specs/breastmnist.yaml --out runs/breast-s "
            "--seeds 0,1,2",
            "medtransfer train --spec target.yaml --out runs/target --weights run:runs/source",
            "medtransfer train --out runs/breast --resume",
        ],
    ),
    "pretrain": (
        "Self-supervised pretraining (SimSiam, or SimCLR with --objective simclr) of the spec's "
        "backbone on its training images and any unlabelled folders or specs, never the "
        "validation or test images; the run directory is a weight source for train (--weights "
        "run:DIR). Batch size, learning rate, epochs and seed are the spec's training values "
        "(flags override them); --resume carries on a killed run from its last finished epoch.",
        [
            "medtransfer pretrain --spec data_specs/breastmnist.yaml --out runs/ssl --epochs 20",
            "medtransfer pretrain --spec cxr.yaml --out runs/ssl --unlabeled /archive/cxr/",
            "medtransfer pretrain --spec cxr.yaml --out runs/simclr --objective simclr",
            "medtransfer train --spec data_specs/breastmnist.yaml --out runs/b "
            "--weights run:runs/ssl",
        ],
    ),
    "probe": (
        "Linear probe: a logistic regression on the frozen backbone's pooled features (and the "
        "spec's tabular features), fitted on the training split with its regularisation chosen "
        "on validation, reported on the test split with the clinical report of evaluate. "
        "Measures what a weight source is worth in seconds.",
        [
            "medtransfer probe --spec data_specs/breastmnist.yaml --weights run:runs/ssl "
            "--out reports/probe-ssl",
            "medtransfer probe --spec data_specs/breastmnist.yaml --weights none "
            "--out reports/probe-random",
        ],
    ),
    "augment-preview": (
        "Draw training images beside augmented versions of them, as one PNG grid, to check "
        "that the spec's augmentation (preset plus options) looks plausible before training.",
        ["medtransfer augment-preview --spec data_specs/breastmnist.yaml --out preview.png"],
    ),
    "lr-find": (
        "Learning-rate range test: train a throwaway model for --steps batches while the rate "
        "rises from --min-lr to --max-lr, and write the loss-vs-rate curve and a suggested rate. "
        "--phase picks the training phase to test: head (backbone frozen), fine_tune (top blocks "
        "unfrozen; the suggestion is for the spec's learning_rate times fine_tune."
        "learning_rate_factor) or full (the whole network, the only phase with weights none). "
        "Nothing is written into a run directory.",
        [
            "medtransfer lr-find --spec data_specs/breastmnist.yaml --out lr/",
            "medtransfer lr-find --spec data_specs/breastmnist.yaml --out lr/ --weights none "
            "--phase full",
        ],
    ),
    "evaluate": (
        "Evaluate a run directory, a seeds folder (train --seeds) or an exported model on one "
        "split of the data: AUROC with bootstrap intervals, operating points at the target "
        "sensitivity and specificity, calibration, per-site results and Grad-CAM examples, "
        "written as report.html, metrics.json and predictions.csv.",
        [
            "medtransfer evaluate runs/breast --out reports/breast",
            "medtransfer evaluate models/breast/1 --spec data_specs/breastmnist.yaml "
            "--split val --out reports/breast-val",
            "medtransfer evaluate runs/breast --out reports/breast --robustness",
        ],
    ),
    "robustness": (
        "How a model holds up on one split: AUROC and accuracy (with intervals) under FGSM and "
        "PGD attacks at each epsilon (L-infinity, in pixel units of the [0, 1] input, through "
        "the whole model and its preprocessing) and under Gaussian noise, blur, contrast, "
        "gamma, JPEG, down-and-up sampling and rotation at 5 severities each, written as "
        "robustness.json, robustness.csv, robustness.html and PNG figures. Attacks need a run "
        "directory; an export gets the corruptions only.",
        [
            "medtransfer robustness runs/breast --out robustness/breast",
            "medtransfer robustness runs/breast --spec data_specs/breastmnist.yaml --split test "
            "--out robustness/breast --epsilons 1/255,2/255,4/255 --pgd-steps 20",
            "medtransfer robustness models/breast/1 --spec data_specs/breastmnist.yaml "
            "--out robustness/export",
        ],
    ),
    "compare": (
        "Compare two evaluation reports made on the same images with a paired DeLong test of "
        "their AUROCs; prints the difference, its interval and the p-value.",
        ["medtransfer compare reports/resnet50 reports/efficientnetb0 --out comparison.json"],
    ),
    "ensemble": (
        "Combine several runs trained on the same classes into one model, written as a run "
        "directory that evaluate and export take like any run: mean or validation-AUROC "
        "weighted probabilities, or a majority vote.",
        ["medtransfer ensemble runs/a runs/b runs/c --method weighted --out runs/abc"],
    ),
    "export": (
        "Export a run as a TensorFlow Serving SavedModel with its model card and thresholds "
        "(signatures serving_default and predict_png); DIR/NAME exports the next version. "
        "--format litert or onnx writes one lean graph file instead (LiteRT optionally float16 "
        "or int8, calibrated on the run's validation images), with the thresholds re-checked "
        "on it; score and evaluate take the folder like any export.",
        [
            "medtransfer export runs/breast --out models/breast/1",
            "medtransfer export runs/breast --out models/breast --calibrated",
            "medtransfer export runs/breast --out models/breast-int8 --format litert "
            "--quantize int8",
        ],
    ),
    "score": (
        "Score every image or DICOM file under a folder with an exported model or a run "
        "directory, one row per file in a CSV (or Parquet). A file that cannot be read becomes "
        "an error row and the exit code 1; --resume keeps rows already written. --dicomweb URL "
        "scores a PACS's instances instead, and --sr / --stow write DICOM SRs of the results.",
        [
            "medtransfer score incoming/ --model models/breast/1 --out scores.csv",
            "medtransfer score incoming/ --model runs/breast --out scores.csv --resume",
            "medtransfer score /mnt/archive --model models/breast/1 --out /mnt/out/scores.csv "
            "--engine ray --address auto",
            "medtransfer score --dicomweb http://pacs:8042/dicom-web --study 1.2.840.1.2 "
            "--model models/breast/1 --out scores.csv --sr reports/",
        ],
    ),
    "monitor": (
        "Compare scored batches (score tables, one per batch, in time order) with what the "
        "model was trained and validated on: the share of files out of its scope, the OOD "
        "scores, the image intensities and DICOM header values (PSI with a KS or chi-square "
        "test), and the predicted prevalence. Writes monitor.html, monitor.csv and "
        "monitor.json; exit code 1 when a batch drifted past a threshold, so cron can alert. "
        "Never loads the model or TensorFlow.",
        [
            "medtransfer monitor scores/2026-1*.csv --model models/cxr/1 --out monitor/",
            "medtransfer monitor today.csv --model runs/cxr --out monitor/ --psi-alarm 0.1",
        ],
    ),
    "inspect": (
        "Decode every file under a folder without a model and list, one row per file, its "
        "DICOM tags, size and any decoding error in a CSV: a data check before training or "
        "scoring. Exit code 1 when some files could not be read.",
        ["medtransfer inspect incoming/ --out qa.csv"],
    ),
    "sites": (
        "Compare the sites (hospitals, scanners) in the data: image counts, intensities, DICOM "
        "tags, label prevalence and how well a classifier on backbone features tells the sites "
        "apart, written as sites.json and PNG figures.",
        ["medtransfer sites --spec hospitals.yaml --out sites/ --model runs/breast"],
    ),
    "quickstart": (
        "Generate a synthetic DICOM dataset, then train, evaluate, export and score on it: the "
        "whole pipeline in minutes, with no network and no data of your own.",
        [
            "medtransfer quickstart --out demo/",
            "medtransfer quickstart --out demo/ --epochs 3 --patients 60",
        ],
    ),
    "backbones": (
        "List the registered backbones: Keras constructor, preprocessing, default input size "
        "and parameter count. Any of them goes in model.backbone or --backbone.",
        ["medtransfer backbones"],
    ),
    "weights": (
        "ImageNet weights files for sites without internet access: download them where there "
        "is a connection, copy them over and pass the file as --weights or model.weights.",
        ["medtransfer weights download resnet50 --out weights/"],
    ),
    "weights download": (
        "Fetch a backbone's ImageNet no-top weights file and verify its hash and that it loads "
        "into the architecture before it is put in place (a file already there is kept).",
        [
            "medtransfer weights download resnet50 --out weights/",
            "medtransfer weights download efficientnetb0 --mirror https://mirror.example/keras/",
        ],
    ),
}

_WORKFLOW = """\
Typical workflow:
  medtransfer quickstart --out demo/                     # the whole pipeline on demo data
  medtransfer inspect incoming/ --out qa.csv             # can every file be read?
  medtransfer train --spec data_specs/breastmnist.yaml --out runs/breast
  medtransfer evaluate runs/breast --out reports/breast
  medtransfer export runs/breast --out models/breast/1
  medtransfer score incoming/ --model models/breast/1 --out scores.csv
  medtransfer monitor scores*.csv --model models/breast/1 --out monitor/  # drift?

Run 'medtransfer COMMAND --help' for a command's options and examples.
Exit codes: 0 done, 1 done with per-file errors (monitor: drift), 2 bad usage or spec, 3 failed,
130 interrupted.
MEDTRANSFER_DEBUG=1 shows tracebacks and TensorFlow's start-up log."""


def _verb(verbs: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A verb's parser with its description and examples from ``_DOCS``."""
    description, examples = _DOCS[name]
    epilog = ("Examples:\n" if len(examples) > 1 else "Example:\n") + "\n".join(
        f"  {example}" for example in examples
    )
    return verbs.add_parser(
        name.split()[-1],
        help=help,
        description=textwrap.fill(description, width=78),
        epilog=epilog,
        formatter_class=_HelpFormatter,
    )


def _add_training_overrides(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("overrides (default: the spec's values)")
    group.add_argument(
        "--backbone", help="backbone name, e.g. resnet50, efficientnetb0 (medtransfer backbones)"
    )
    group.add_argument(
        "--weights",
        help="imagenet, none (random), a local weights file (weights download), or run:DIR to "
        "start from the backbone of another medtransfer run",
    )
    group.add_argument("--epochs", type=int, help="total training epochs, all phases")
    group.add_argument("--batch-size", type=int, help="images per batch")
    group.add_argument("--learning-rate", type=float, help="the head phase's learning rate")
    group.add_argument("--image-size", type=int, help="square model input size in pixels")
    group.add_argument("--seed", type=int, help="seed for splits, weights and augmentation")
    group.add_argument(
        "--augment",
        choices=get_args(Preset),
        help="augmentation preset (the spec's options still apply on top)",
    )


def _add_workers(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    """Without a default the data pipeline picks the count; the folder verbs run a pool of their
    own, where 0 decodes in this process instead."""
    if default is None:
        parser.add_argument(
            "--workers",
            type=int,
            help="decode processes (default: one per usable core, at most 16; 0: in this process)",
        )
    else:
        parser.add_argument(
            "--workers", type=int, default=default, help="decode processes (0: in this process)"
        )


def _add_folder_run(parser: argparse.ArgumentParser) -> None:
    """The folder verbs stop and resume alike, and share the limits that guard each decode."""
    parser.add_argument("--resume", action="store_true", help="keep rows already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_decode_limits(parser)


def _add_train(verbs: argparse._SubParsersAction) -> None:
    train = _verb(verbs, "train", "train a model from a data spec into a run directory")
    train.add_argument("--spec", help="data spec YAML (with --resume: the run's own)")
    train.add_argument("--out", required=True, help="run directory to create")
    what = train.add_mutually_exclusive_group()
    what.add_argument("--overwrite", action="store_true", help="replace an existing run")
    what.add_argument(
        "--resume", action="store_true", help="carry on a killed run from its last epoch"
    )
    train.add_argument(
        "--seeds",
        type=_seed_list,
        metavar="0,1,2",
        help="train once per seed into OUT/seed_N and report mean ± sd",
    )
    _add_workers(train)
    _add_training_overrides(train)
    train.set_defaults(func=cmd_train)


def _add_pretrain(verbs: argparse._SubParsersAction) -> None:
    pretrain = _verb(verbs, "pretrain", "self-supervised pretraining into a run: a weight source")
    pretrain.add_argument("--spec", help="data spec YAML (with --resume: the run's own)")
    pretrain.add_argument("--out", required=True, help="run directory to create")
    pretrain.add_argument(
        "--unlabeled",
        nargs="+",
        default=[],
        metavar="DIR_OR_SPEC",
        help="folders of DICOM or image files, or specs whose training split is added unlabelled",
    )
    what = pretrain.add_mutually_exclusive_group()
    what.add_argument("--overwrite", action="store_true", help="replace an existing run")
    what.add_argument(
        "--resume", action="store_true", help="carry on a killed run from its last epoch"
    )
    _add_workers(pretrain)
    _add_training_overrides(pretrain)
    objective = pretrain.add_argument_group("objective (default: the spec's pretraining values)")
    objective.add_argument(
        "--objective",
        choices=["simsiam", "simclr"],
        help="simsiam (no negatives) or simclr (the batch's other images as negatives)",
    )
    objective.add_argument(
        "--temperature", type=float, help="simclr's NT-Xent temperature (default 0.2)"
    )
    pretrain.set_defaults(func=cmd_pretrain)


def _add_probe(verbs: argparse._SubParsersAction) -> None:
    probe = _verb(verbs, "probe", "linear probe of frozen backbone features, clinical report")
    probe.add_argument("--spec", required=True, help="data spec YAML")
    probe.add_argument(
        "--weights",
        required=True,
        help="imagenet, none (random features), a weights file, or run:DIR (train or pretrain)",
    )
    probe.add_argument("--out", required=True, help="report directory")
    _add_workers(probe)
    probe.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals"
    )
    probe.add_argument("--ci-seed", type=int, default=0, help="bootstrap seed")
    probe.set_defaults(func=cmd_probe)


def _add_augment_preview(verbs: argparse._SubParsersAction) -> None:
    preview = _verb(
        verbs, "augment-preview", "training images beside their augmented versions, as a PNG grid"
    )
    preview.add_argument("--spec", required=True, help="data spec YAML")
    preview.add_argument("--out", required=True, help="PNG file to write")
    preview.add_argument("--seed", type=int, help="augmentation seed (default: the spec's)")
    preview.add_argument("--count", type=int, default=6, help="training images")
    preview.add_argument("--versions", type=int, default=4, help="augmented copies of each")
    preview.add_argument("--augment", choices=get_args(Preset), help="preset instead of the spec's")
    preview.set_defaults(func=cmd_augment_preview)


def _add_lr_find(verbs: argparse._SubParsersAction) -> None:
    find = _verb(
        verbs, "lr-find", "learning-rate range test: loss vs rate curve and a suggested rate"
    )
    find.add_argument("--spec", required=True, help="data spec YAML")
    find.add_argument("--out", required=True, help="folder for lr_find.png/.csv/.json")
    find.add_argument("--min-lr", type=float, default=1e-7, help="rate of the first batch")
    find.add_argument("--max-lr", type=float, default=1.0, help="rate of the last batch")
    find.add_argument("--steps", type=int, default=100, help="batches to run")
    find.add_argument(
        "--phase",
        choices=["head", "fine_tune", "full"],
        help="training phase to test: head (backbone frozen), fine_tune (top blocks unfrozen) "
        "or full (whole network; what training runs with weights none) (default: the spec's "
        "first phase: head with pretrained weights, full with none)",
    )
    _add_workers(find)
    _add_training_overrides(find)
    find.set_defaults(func=cmd_lr_find)


def _add_evaluate(verbs: argparse._SubParsersAction) -> None:
    evaluate = _verb(verbs, "evaluate", "evaluate a run or exported model on a split")
    evaluate.add_argument(
        "model", metavar="RUN_DIR", help="run directory, seeds folder or exported model"
    )
    evaluate.add_argument("--spec", help="data spec (default: the run's own spec.yaml)")
    evaluate.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="split to evaluate on"
    )
    evaluate.add_argument("--out", required=True, help="report directory")
    _add_workers(evaluate)
    evaluate.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals"
    )
    evaluate.add_argument("--ci-seed", type=int, default=0, help="bootstrap seed")
    evaluate.add_argument(
        "--target-sensitivity", type=_fraction, default=0.95, help="operating point"
    )
    evaluate.add_argument(
        "--target-specificity", type=_fraction, default=0.95, help="operating point"
    )
    evaluate.add_argument(
        "--tta", action="store_true", help="average over test-time views (a run directory only)"
    )
    evaluate.add_argument(
        "--robustness",
        action="store_true",
        help="add a robustness section: FGSM and PGD at 1, 2 and 4 /255 (a run directory) and "
        "7 corruptions at 5 severities, full files in OUT/robustness/ (minutes on a CPU; "
        "`medtransfer robustness` takes every setting)",
    )
    evaluate.set_defaults(func=cmd_evaluate)


def _add_robustness(verbs: argparse._SubParsersAction) -> None:
    robust = _verb(verbs, "robustness", "AUROC under adversarial attacks and corruptions")
    robust.add_argument("model", metavar="RUN_DIR", help="run directory (or an exported model)")
    robust.add_argument("--spec", help="data spec (default: the run's own spec.yaml)")
    robust.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="split to assess"
    )
    robust.add_argument("--out", required=True, help="folder for the robustness files")
    _add_workers(robust)
    robust.add_argument(
        "--epsilons",
        type=_epsilon_list,
        default="1/255,2/255,4/255",
        help="attack budgets, L-infinity in pixel units of the [0, 1] input",
    )
    robust.add_argument("--pgd-steps", type=int, default=10, help="PGD steps")
    robust.add_argument(
        "--pgd-step-size", type=float, help="PGD step (default: 2.5 * epsilon / steps)"
    )
    robust.add_argument("--no-random-start", action="store_true", help="PGD starts at the image")
    robust.add_argument(
        "--corruptions",
        default="all",
        help="comma-separated, from gaussian_noise, blur, contrast, gamma, jpeg, downsample, "
        "rotation",
    )
    robust.add_argument("--seed", type=int, default=0, help="random starts and corruption draws")
    robust.add_argument("--batch-size", type=int, default=32, help="images attacked at a time")
    robust.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals"
    )
    robust.add_argument("--ci-seed", type=int, default=0, help="bootstrap seed")
    robust.set_defaults(func=cmd_robustness)


def _add_compare(verbs: argparse._SubParsersAction) -> None:
    compare = _verb(
        verbs, "compare", "paired DeLong test of two evaluation reports on the same images"
    )
    compare.add_argument("report_a", metavar="REPORT_A", help="an evaluate report directory")
    compare.add_argument("report_b", metavar="REPORT_B", help="another, on the same images")
    compare.add_argument("--out", help="also write the comparison as JSON")
    compare.set_defaults(func=cmd_compare)


def _add_ensemble(verbs: argparse._SubParsersAction) -> None:
    ensemble = _verb(verbs, "ensemble", "combine runs into one model (a run directory)")
    ensemble.add_argument("runs", metavar="RUN_DIR", nargs="+", help="the member runs")
    ensemble.add_argument(
        "--method",
        choices=["mean", "weighted", "vote"],
        default="mean",
        help="mean probability, weighted by validation AUROC above chance, or majority vote",
    )
    ensemble.add_argument("--out", required=True, help="the ensemble's run directory")
    ensemble.add_argument("--overwrite", action="store_true", help="replace an existing one")
    ensemble.set_defaults(func=cmd_ensemble)


def _add_export(verbs: argparse._SubParsersAction) -> None:
    export = _verb(verbs, "export", "export a run as a TF Serving SavedModel")
    export.add_argument("run", metavar="RUN_DIR", help="run directory (or ensemble) to export")
    export.add_argument(
        "--out",
        required=True,
        help="DIR/NAME/VERSION, e.g. models/cxr/1; DIR/NAME exports its next version",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing version")
    export.add_argument(
        "--tta", action="store_true", help="build test-time augmentation into the graph"
    )
    export.add_argument(
        "--calibrated",
        action="store_true",
        help="apply the temperature fitted at evaluation (validation split) inside the graph",
    )
    export.add_argument(
        "--format",
        choices=["saved_model", "litert", "onnx"],
        default="saved_model",
        help="saved_model (TF Serving, default), litert (.tflite) or onnx (.onnx)",
    )
    export.add_argument(
        "--quantize",
        choices=["none", "float16", "int8"],
        default="none",
        help="litert only: float16 weights, or int8 calibrated on the run's validation images",
    )
    export.set_defaults(func=cmd_export)


def _add_score(verbs: argparse._SubParsersAction) -> None:
    score = _verb(verbs, "score", "score every file under a folder into a CSV")
    score.add_argument(
        "input_dir", metavar="INPUT_DIR", nargs="?", help="folder scored recursively"
    )
    score.add_argument("--model", required=True, help="exported model or run directory")
    score.add_argument(
        "--out", required=True, help="scores.csv to write (a .parquet name writes Parquet)"
    )
    _add_workers(score, default=2)
    score.add_argument("--batch-size", type=int, default=16, help="images per model call")
    score.add_argument(
        "--pool-only",
        action="store_true",
        help="decode uncompressed DICOM in the workers too (default: in this process while it "
        "is cheap next to the model)",
    )
    score.add_argument(
        "--strict",
        action="store_true",
        help="do not predict files out of the model's scope (another modality or body part, a "
        "secondary capture or localizer, colour for a greyscale model): error rows saying why "
        "(default: predicted, and flagged in the in_scope column)",
    )
    score.add_argument(
        "--ood-percentile",
        type=float,
        default=99.0,
        metavar="P",
        help="flag a file out of scope when its OOD score is at or above this percentile of the "
        "validation images' scores (default: %(default)g)",
    )
    score.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this machine's decode pool (default); ray: Ray Data actors, on this "
        "machine or a cluster (pip install 'medtransfer[ray]')",
    )
    score.add_argument(
        "--address",
        default=None,
        help="with --engine ray: the cluster to join ('auto', or ray://HOST:PORT; default: "
        "start Ray on this machine)",
    )
    for kind in ("decoders", "models"):
        score.add_argument(
            f"--ray-{kind}",
            type=int,
            default=None,
            metavar="N",
            help=f"with --engine ray: {kind[:-1]} actors (default: half the cluster's CPUs)",
        )
    _add_folder_run(score)
    _add_pacs(score)
    score.set_defaults(func=cmd_score)


def _add_pacs(score: argparse.ArgumentParser) -> None:
    """``score --dicomweb``: a PACS in place of INPUT_DIR, SRs out (README, "PACS")."""
    pacs = score.add_argument_group("PACS (instead of INPUT_DIR)")
    pacs.add_argument("--dicomweb", metavar="URL", help="DICOMweb root to read (QIDO/WADO-RS)")
    pacs.add_argument("--study", metavar="UID", help="with --dicomweb: the study to score")
    pacs.add_argument(
        "--query", metavar="Q", help='with --dicomweb: QIDO-RS series filters, "Modality=DX&..."'
    )
    pacs.add_argument(
        "--series-rules", metavar="YAML", help="which series to score (default: the built-in rules)"
    )
    pacs.add_argument(
        "--dicomweb-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a DICOMweb request may wait for an answer (default: %(default)g)",
    )
    pacs.add_argument("--sr", metavar="DIR", help="write one DICOM SR per scored instance here")
    pacs.add_argument("--stow", metavar="URL", help="store the SRs to this DICOMweb root (STOW-RS)")
    pacs.add_argument(
        "--operating-point",
        default="youden",
        metavar="NAME",
        help="the export's threshold the SR's decision uses (default: %(default)s)",
    )


# The defaults of monitoring.MonitorThresholds (a test holds them equal), spelled out here so
# that building the parser does not import pandas and SciPy for every command.
_MONITOR_THRESHOLDS = {
    "--psi-alarm": ("psi_alarm", float, 0.25, "a distribution shift alarms from this PSI"),
    "--alpha": ("alpha", float, 0.01, "and only if its test rejects at this level"),
    "--max-out-of-scope": ("max_out_of_scope", float, 0.05, "share of files out of scope"),
    "--max-prevalence-shift": ("max_prevalence_shift", float, 0.10, "absolute, per class"),
    "--min-files": ("min_files", int, 30, "no alarm on a batch with fewer usable files"),
}


def _add_monitor(verbs: argparse._SubParsersAction) -> None:
    monitor = _verb(verbs, "monitor", "compare scored batches with the model's training reference")
    monitor.add_argument("scores", nargs="+", metavar="SCORES", help="score tables, oldest first")
    monitor.add_argument("--model", required=True, help="the export or run directory that scored")
    monitor.add_argument("--out", required=True, help="folder for monitor.html/.csv/.json")
    for flag, (name, kind, value, text) in _MONITOR_THRESHOLDS.items():
        monitor.add_argument(flag, dest=name, type=kind, default=value, metavar="X", help=text)
    monitor.set_defaults(func=cmd_monitor)


def _add_inspect(verbs: argparse._SubParsersAction) -> None:
    inspect = _verb(
        verbs, "inspect", "decode every file under a folder and list tags and errors in a CSV"
    )
    inspect.add_argument("input_dir", metavar="DIR", help="folder inspected recursively")
    inspect.add_argument("--out", required=True, help="qa.csv to write")
    _add_workers(inspect, default=2)
    _add_folder_run(inspect)
    inspect.set_defaults(func=cmd_inspect)


def _add_sites(verbs: argparse._SubParsersAction) -> None:
    sites = _verb(
        verbs,
        "sites",
        "compare the data's sites: counts, intensities, DICOM tags, label prevalence, "
        "how separable they are",
    )
    sites.add_argument("--spec", required=True, help="data spec YAML (with data.site_column)")
    sites.add_argument("--out", required=True, help="folder for sites.json and the PNG figures")
    sites.add_argument(
        "--model",
        metavar="RUN_DIR",
        help="take features from this run's backbone (default: the spec's backbone and "
        "weights; weights none gives random features)",
    )
    _add_workers(sites)
    sites.add_argument(
        "--max-per-site", type=int, default=1000, help="images per site for pixels/features"
    )
    sites.add_argument("--seed", type=int, default=0, help="sample and CV folds seed")
    sites.set_defaults(func=cmd_sites)


def _add_quickstart(verbs: argparse._SubParsersAction) -> None:
    quick = _verb(
        verbs, "quickstart", "generate a DICOM demo dataset and run the whole pipeline on it"
    )
    quick.add_argument("--out", required=True, help="directory for data, run, report, export")
    # The None defaults leave the choice to quickstart.DEFAULTS (the values the help shows).
    quick.add_argument("--epochs", type=int, default=None, help="training epochs (default: 15)")
    quick.add_argument(
        "--patients", type=int, default=None, help="synthetic patients (default: 160)"
    )
    quick.add_argument("--backbone", default=None, help="backbone (default: resnet50)")
    quick.add_argument("--seed", type=int, default=0, help="seed for the data and the training")
    quick.set_defaults(func=cmd_quickstart)


def _add_backbones(verbs: argparse._SubParsersAction) -> None:
    backbones = _verb(
        verbs, "backbones", "list the registered backbones: preprocessing, input size, parameters"
    )
    backbones.set_defaults(func=cmd_backbones)


def _add_weights(verbs: argparse._SubParsersAction) -> None:
    weights = _verb(verbs, "weights", "ImageNet weights files for air-gapped sites")
    weights_verbs = weights.add_subparsers(dest="weights_command", required=True, metavar="VERB")
    download = _verb(
        weights_verbs, "weights download", "fetch and verify a backbone's ImageNet no-top weights"
    )
    download.add_argument("name", metavar="BACKBONE", help="a registered backbone, e.g. resnet50")
    download.add_argument("--out", default=".", help="folder to write the .h5 file into")
    download.add_argument(
        "--mirror", help="base URL of an internal mirror (default: $MEDTRANSFER_WEIGHTS_MIRROR)"
    )
    download.set_defaults(func=cmd_weights_download)


def build_parser() -> argparse.ArgumentParser:
    """One ``_add_*`` per verb; the order here is the order ``--help`` lists the verbs in."""
    from medtransfer import __version__

    parser = argparse.ArgumentParser(
        prog="medtransfer",
        description=textwrap.fill(
            "Transfer learning for medical imaging: fine-tune a pretrained backbone on your "
            "images (a data spec in YAML), evaluate it with clinical metrics, export it for "
            "TF Serving and score folders of DICOM or image files.",
            width=78,
        ),
        epilog=_WORKFLOW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medtransfer {__version__}")
    verbs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_verb in (
        _add_train,
        _add_augment_preview,
        _add_lr_find,
        _add_pretrain,
        _add_probe,
        _add_evaluate,
        _add_robustness,
        _add_compare,
        _add_ensemble,
        _add_export,
        _add_score,
        _add_monitor,
        _add_inspect,
        _add_sites,
        _add_quickstart,
        _add_backbones,
        _add_weights,
    ):
        add_verb(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet = _quiet_tensorflow()
    args = build_parser().parse_args(argv)
    try:
        if quiet and args.command in _TF_VERBS:
            _import_tensorflow_quietly()
        with warnings.catch_warnings(), _lost_interrupts_unprinted():
            warnings.showwarning = _one_line_warning(args, warnings.showwarning)
            return args.func(args)
    except MedtransferError as error:
        return _report(args, f"error: {error}", EXIT_USAGE)
    except KeyboardInterrupt:
        resume = _RESUMABLE.get(args.command)
        kept = f"; what was written is kept: rerun with {resume} to carry on" if resume else ""
        return _report(args, f"interrupted{kept}", EXIT_INTERRUPTED)
    except OSError as error:  # a full disk, a read-only or vanished output folder
        where = f" ({error.filename})" if error.filename else ""
        return _report(args, f"failed: {error.strerror or error}{where}", EXIT_FAILED)
    except Exception as error:
        from medtransfer.folder_pool import describe

        if os.environ.get("MEDTRANSFER_DEBUG"):
            traceback.print_exc()
        hint = "" if os.environ.get("MEDTRANSFER_DEBUG") else " (MEDTRANSFER_DEBUG=1 shows where)"
        return _report(args, f"failed: internal error {describe(error)}{hint}", EXIT_FAILED)


@contextmanager
def _lost_interrupts_unprinted() -> Iterator[None]:
    """Python loses a Ctrl-C that lands inside a finalizer (a ``__del__``, a weakref callback;
    TensorFlow's objects have many) and prints "Exception ignored in ..." with a traceback. The
    run goes on and a second Ctrl-C stops it; the traceback would only alarm the operator."""
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if unraisable.exc_type is not KeyboardInterrupt:
            default(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = default


def _one_line_warning(args: argparse.Namespace, default: Callable) -> Callable:
    """A DegenerateModelWarning shown as ``medtransfer VERB: warning: ...`` on stderr, not as
    Python's file:line with a source excerpt; other warnings as Python shows them."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, DegenerateModelWarning):
            print(f"medtransfer {args.command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def _report(args: argparse.Namespace, message: str, code: int) -> int:
    """One line on stderr: a user (or a script reading the exit code) needs the what, not a
    traceback; the message of an unexpected error is left out, as it may quote DICOM values."""
    print(f"medtransfer {args.command}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
