"""Several seeds of one recipe: on small medical datasets the spread between seeds is about as
large as the differences between published methods, so one run is an anecdote. A seeds folder
holds one ordinary run directory per seed (``seed_<N>``) and ``seeds.json`` with the spread.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer import atomic
from medtransfer.errors import RunError
from medtransfer.spec import Spec, load_spec
from medtransfer.training.run import RUN_FILE, SPEC_FILE, Run, open_run, train

SEEDS_FILE = "seeds.json"


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; 0 for a single value) with the values."""
    values = [atomic.float_or(v) for v in values]  # null (NaN written as JSON) reads as NaN
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"values": values, "mean": float(np.mean(values)), "sd": sd}


def format_spread(stats: dict[str, Any], digits: int = 4) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f} (n={len(stats['values'])})"


@dataclass(frozen=True)
class SeedRuns:
    path: Path
    runs: list[Run]

    @property
    def info(self) -> dict[str, Any]:
        info = {
            "seeds": [run.info["seed"] for run in self.runs],
            "runs": [run.path.name for run in self.runs],
            "best_val_auroc": spread([run.info["best_val_auroc"] for run in self.runs]),
            "train_seconds": spread([run.info["train_seconds"] for run in self.runs]),
        }
        if all("cpu_seconds" in run.info for run in self.runs):  # older runs did not record it
            info["cpu_seconds"] = spread([run.info["cpu_seconds"] for run in self.runs])
        return info

    def summary(self) -> str:
        info = self.info
        return (
            f"{len(self.runs)} seeds {info['seeds']} in {self.path}: best validation AUROC "
            f"{format_spread(info['best_val_auroc'])}, "
            f"{info['train_seconds']['mean']:.0f} s per seed"
        )


def seed_run_dir(out_dir: str | Path, seed: int) -> Path:
    return Path(out_dir) / f"seed_{seed}"


def train_seeds(
    spec: Spec | None,
    out_dir: str | Path,
    seeds: Sequence[int],
    *,
    overwrite: bool = False,
    resume: bool = False,
    workers: int | None = None,
) -> SeedRuns:
    """Train ``spec`` once per seed, one after another, into ``out_dir/seed_<N>``.

    With ``resume``, finished seeds are kept, a killed one carries on from its last epoch and
    the rest start; ``spec`` may then be None (each run's own is used; unstarted seeds take the
    first run's spec with their seed).
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise RunError(f"seeds must be distinct and at least one, got {list(seeds)}")
    out = Path(out_dir)
    runs = []
    for seed in seeds:
        run_dir = seed_run_dir(out, seed)
        if resume and (run_dir / RUN_FILE).is_file():
            runs.append(open_run(run_dir))
        elif resume and (run_dir / SPEC_FILE).is_file():
            runs.append(train(None, run_dir, resume=True, workers=workers))
        else:
            base = spec if spec is not None else _started_spec(out, seeds)
            seeded = base.with_overrides(training={"seed": seed})
            runs.append(train(seeded, run_dir, overwrite=overwrite, workers=workers))
    result = SeedRuns(out, runs)
    atomic.write_json(out / SEEDS_FILE, result.info)
    return result


def _started_spec(out: Path, seeds: Sequence[int]) -> Spec:
    for seed in seeds:
        path = seed_run_dir(out, seed) / SPEC_FILE
        if path.is_file():
            return load_spec(path)
    raise RunError(f"{out} has no started seed run to resume; pass the spec")


def is_seeds_dir(path: str | Path) -> bool:
    return (Path(path) / SEEDS_FILE).is_file()


def open_seed_runs(path: str | Path) -> SeedRuns:
    info = json.loads((Path(path) / SEEDS_FILE).read_text())
    return SeedRuns(Path(path), [open_run(Path(path) / name) for name in info["runs"]])
