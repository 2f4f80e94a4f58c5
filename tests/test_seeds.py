"""Several seeds of one recipe: one run directory per seed, the spread of validation and test
AUROC, and a killed seeds folder that resumes without retraining finished seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medtransfer.cli import main
from medtransfer.evaluation.seeds import SUMMARY_FILE, evaluate_seeds
from medtransfer.rundir import RUN_FILE, SEEDS_FILE, format_spread, spread
from medtransfer.spec import dump_spec, load_spec, spec_from_dict
from medtransfer.training.checkpoint import load_checkpoint
from medtransfer.training.seeds import train_seeds

from .conftest import make_png_folders


def test_spread_is_mean_and_sample_sd():
    stats = spread([0.8, 0.9, 1.0])
    assert stats["mean"] == pytest.approx(0.9)
    assert stats["sd"] == pytest.approx(0.1)  # n - 1 in the denominator
    assert spread([0.7])["sd"] == 0.0
    assert np.isnan(spread([0.7, float("nan")])["mean"])  # a missing figure shows, not crashes
    assert format_spread(stats) == "0.9000 ± 0.1000 (n=3)"


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    spec = spec_from_dict(
        {
            "name": "seeds",
            "task": "binary",
            "classes": ["plain", "spot"],
            "data": {"format": "folders", "path": str(make_png_folders(root / "data"))},
            "image": {"size": [32, 32], "channels": 1},
            "model": {"backbone": "mobilenetv3small", "weights": "none"},
            "training": {"epochs": 1, "batch_size": 8},
        },
        base_dir=root,
    )
    return spec, train_seeds(spec, root / "runs", [0, 1], workers=0)


def test_one_run_per_seed_and_their_spread(seeds_run):
    _, result = seeds_run
    assert [run.path.name for run in result.runs] == ["seed_0", "seed_1"]
    assert [run.info.seed for run in result.runs] == [0, 1]
    stored = json.loads((result.path / SEEDS_FILE).read_text())
    values = [run.info.best_val_auroc for run in result.runs]
    assert stored["best_val_auroc"] == spread(values)
    first, second = (load_checkpoint(run.path).model_values for run in result.runs)
    assert any((a != b).any() for a, b in zip(first, second, strict=True)), "seeds gave one model"


def test_evaluation_of_every_seed_and_the_spread(seeds_run, tmp_path):
    _, result = seeds_run
    report = evaluate_seeds(result.path, split="test", out_dir=tmp_path / "report")
    per_seed = [
        json.loads((tmp_path / "report" / name / "metrics.json").read_text())
        for name in ("seed_0", "seed_1")
    ]
    summary = json.loads((tmp_path / "report" / SUMMARY_FILE).read_text())
    assert summary["auroc_name"] == "spot"
    assert summary["auroc"]["values"] == [m["auroc"]["per_class"]["spot"] for m in per_seed]
    assert summary["accuracy"]["values"] == [m["accuracy"] for m in per_seed]
    assert "AUROC spot" in report.summary() and "(n=2)" in report.summary()


def test_resume_keeps_finished_seeds_and_trains_the_missing_one(seeds_run):
    spec, result = seeds_run
    finished = {run.path.name: (run.path / RUN_FILE).stat().st_mtime_ns for run in result.runs}
    more = train_seeds(None, result.path, [0, 1, 2], resume=True, workers=0)
    assert [run.info.seed for run in more.runs] == [0, 1, 2]
    for name, mtime in finished.items():
        assert (result.path / name / RUN_FILE).stat().st_mtime_ns == mtime  # not retrained
    third = load_spec(more.runs[2].spec_file)
    assert third.training.seed == 2
    assert dump_spec(third.with_overrides(training={"seed": 0})) == dump_spec(spec)


def test_seed_and_seeds_together_are_a_usage_error(tmp_path, capsys):
    args = ["train", "--spec", "x.yaml", "--out", str(tmp_path / "r"), "--seed", "1"]
    assert main([*args, "--seeds", "0,1"]) == 2
    assert "either --seed or --seeds" in capsys.readouterr().err
