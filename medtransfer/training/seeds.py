"""Several seeds of one recipe: on small medical datasets the spread between seeds is about as
large as the differences between published methods, so one run is an anecdote. A seeds folder
holds one ordinary run directory per seed (``seed_<N>``) and ``seeds.json`` with the spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medtransfer import atomic
from medtransfer.errors import RunError
from medtransfer.rundir import SEEDS_FILE, SPEC_FILE, SeedRuns, is_run, open_run, seed_run_dir
from medtransfer.spec import Spec, load_spec
from medtransfer.training.devices import plan_execution
from medtransfer.training.run import train


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
        if resume and is_run(run_dir):
            runs.append(open_run(run_dir))
        elif resume and (run_dir / SPEC_FILE).is_file():
            runs.append(train(None, run_dir, resume=True, workers=workers))
        else:
            base = spec if spec is not None else _started_spec(out, seeds)
            seeded = base.with_overrides(training={"seed": seed})
            runs.append(train(seeded, run_dir, overwrite=overwrite, workers=workers))
    result = SeedRuns(out, runs)
    if plan_execution().is_chief:  # the other workers of a cluster write nothing (see train)
        atomic.write_json(out / SEEDS_FILE, result.info)
    return result


def _started_spec(out: Path, seeds: Sequence[int]) -> Spec:
    for seed in seeds:
        path = seed_run_dir(out, seed) / SPEC_FILE
        if path.is_file():
            return load_spec(path)
    raise RunError(f"{out} has no started seed run to resume; pass the spec")
