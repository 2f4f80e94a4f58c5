"""Evaluate every seed of a seeds folder on one split and report the spread of each metric."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medtransfer import atomic
from medtransfer.evaluation.report import Evaluation, evaluate
from medtransfer.rundir import format_spread, open_seed_runs, spread
from medtransfer.spec import Spec, load_spec

SUMMARY_FILE = "seeds_summary.json"


@dataclass(frozen=True)
class SeedsEvaluation:
    evaluations: dict[str, Evaluation]  # run name -> its evaluation
    metrics: dict
    out_dir: Path

    def summary(self) -> str:
        m = self.metrics
        return "\n".join(
            [
                f"{m['split']} split, {len(self.evaluations)} seeds {m['seeds']}:",
                f"  AUROC {m['auroc_name']:<20} {format_spread(m['auroc'])}",
                f"  accuracy {' ' * 17} {format_spread(m['accuracy'])}",
            ]
        )


def evaluate_seeds(
    seeds_dir: str | Path,
    spec: Spec | None = None,
    *,
    split: str = "test",
    out_dir: str | Path,
    workers: int | None = None,
) -> SeedsEvaluation:
    """One report per seed in ``out_dir/seed_<N>`` and the spread in ``seeds_summary.json``.

    The AUROC summarised is the positive class's for binary tasks, the macro AUROC otherwise.
    ``spec`` defaults to each run's own.
    """
    runs = open_seed_runs(seeds_dir).runs
    out = Path(out_dir)
    evaluations = {
        run.path.name: evaluate(
            run.path,
            spec or load_spec(run.spec_file),
            split=split,
            out_dir=out / run.path.name,
            workers=workers,
        )
        for run in runs
    }
    first = next(iter(evaluations.values())).metrics
    binary = first["task"] == "binary"
    auroc_name = first["positive_class"] if binary else "(macro)"

    def auroc(e: Evaluation) -> float:
        return e.metrics["auroc"]["per_class"][auroc_name] if binary else e.auroc

    metrics = {
        "split": split,
        "seeds": [run.info.seed for run in runs],
        "auroc_name": auroc_name,
        "auroc": spread([auroc(e) for e in evaluations.values()]),
        "accuracy": spread([e.metrics["accuracy"] for e in evaluations.values()]),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / SUMMARY_FILE, metrics)
    return SeedsEvaluation(evaluations, metrics, out)
