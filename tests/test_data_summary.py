"""What a user sees before and while training: the data summary, decode progress, epoch lines."""

from __future__ import annotations

import io
import os
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml

from medtransfer.cli import main
from medtransfer.data.manifest import build_manifest
from medtransfer.data.pipeline import load_images
from medtransfer.data.summary import data_summary, format_data_summary
from medtransfer.spec import spec_from_dict
from medtransfer.training.run import fit_verbosity
from tests.conftest import make_png_folders, tiny_config

BREASTMNIST = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "breastmnist.npz"
)


def test_counts_images_patients_and_prevalence_per_split(tmp_path):
    data = make_png_folders(tmp_path / "data", per_class=12)
    spec = spec_from_dict(tiny_config(data), base_dir=tmp_path)
    table = data_summary(build_manifest(spec), spec.classes)
    assert table["split"].tolist() == ["train", "val", "test"]
    assert "site" not in table  # one site: no per-site rows
    assert table["images"].tolist() == [24, 12, 12]
    assert table["patients"].tolist() == [24, 12, 12]  # folders: one patient per file
    assert table["spot"].tolist() == [12, 6, 6]
    assert table["spot %"].tolist() == [50.0, 50.0, 50.0]


@pytest.mark.skipif(not BREASTMNIST.is_file(), reason="shared MedMNIST data not present")
def test_counts_match_breastmnist(tmp_path):
    config = tiny_config(BREASTMNIST)
    config.update(classes=["malignant", "normal"], data={"format": "npz", "path": str(BREASTMNIST)})
    spec = spec_from_dict(config, base_dir=tmp_path)
    table = data_summary(build_manifest(spec), spec.classes)
    assert table["images"].tolist() == [546, 78, 156]
    assert table["malignant"].tolist() == [147, 21, 42]
    assert table["normal"].tolist() == [399, 57, 114]
    text = format_data_summary(table, spec.classes, spec.task)
    assert "546" in text and "147 (26.9%)" in text and "unknown" not in text


def test_several_sites_get_their_own_rows_and_unknown_labels_are_not_counted():
    manifest = pd.DataFrame(
        {
            "split": ["train"] * 5 + ["val"] * 2,
            "site": ["a", "a", "b", "b", "b", "a", "b"],
            "patient": ["p1", "p1", "p2", "p3", "p4", "p5", "p6"],
            "y:effusion": [1, 0, np.nan, 1, np.nan, 0, 1],
            "y:mass": [1, 1, 0, 0, 0, 0, 0],
        }
    )
    table = data_summary(manifest, ["effusion", "mass"])
    rows = {(r.split, r.site): r for r in table.itertuples(index=False)}
    assert list(rows) == [
        ("train", "(all)"),
        ("train", "a"),
        ("train", "b"),
        ("val", "(all)"),
        ("val", "a"),
        ("val", "b"),
    ]
    train = table.iloc[0]
    assert (train["images"], train["patients"]) == (5, 4)
    assert (train["effusion"], train["effusion known"], train["effusion %"]) == (2, 3, 66.7)
    site_b = table.iloc[2]
    assert (site_b["effusion"], site_b["effusion known"], site_b["effusion %"]) == (1, 1, 100.0)
    assert (train["mass"], train["mass %"]) == (2, 40.0)
    text = format_data_summary(table, ["effusion", "mass"], "multilabel")
    assert "2 (66.7%)" in text
    assert "known labels only (unknown: effusion 2)" in text
    assert "multilabel" in text


def test_train_prints_the_summary_before_training(tmp_path, monkeypatch, capsys):
    data = make_png_folders(tmp_path / "data", per_class=4)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_config(data)))
    verbosity = []
    fit = keras.Model.fit

    def spy(self, *args, **kwargs):
        verbosity.append(kwargs.get("verbose"))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    assert (
        main(["train", "--spec", str(spec), "--out", str(tmp_path / "run"), "--workers", "0"]) == 0
    )
    out = capsys.readouterr()
    lines = out.out.splitlines()
    start = lines.index("data:")
    assert lines[start + 1].split() == ["split", "images", "patients", "plain", "spot"]
    assert lines[start + 2].split() == ["train", "8", "8", "4", "(50.0%)", "4", "(50.0%)"]
    assert lines[start + 3].split()[:3] == ["val", "4", "4"]
    assert start < next(i for i, line in enumerate(lines) if "val_loss:" in line)  # the epoch
    assert verbosity == [2]  # captured stdout is not a terminal: one line per epoch
    assert "decoding" not in out.err  # nor is captured stderr: no progress bar in logs


def test_fit_verbosity_is_a_progress_bar_on_a_terminal_only():
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as terminal:
            assert fit_verbosity(terminal) == 1
    finally:
        os.close(leader)
        os.close(follower)
    assert fit_verbosity(io.StringIO()) == 2
    assert fit_verbosity(object()) == 2  # a stream without isatty (some notebook frontends)


def test_decoding_shows_a_progress_bar_when_asked_and_only_for_images_decoded(tmp_path, capsys):
    data = make_png_folders(tmp_path / "data", per_class=3)
    spec = spec_from_dict(tiny_config(data), base_dir=tmp_path)
    frame = build_manifest(spec)
    options = {"workers": 0, "cache_dir": tmp_path / "cache"}
    load_images(frame, (32, 32), 1, **options)  # not a terminal: silent
    assert capsys.readouterr().err == ""
    load_images(frame, (32, 32), 1, progress=True, **options)  # all cached: nothing to show
    assert capsys.readouterr().err == ""
    load_images(frame, (32, 32), 1, progress=True, label="decoding test", use_cache=False)
    err = capsys.readouterr().err
    assert "decoding test" in err and f"{len(frame)}/{len(frame)}" in err and "images/s" in err
