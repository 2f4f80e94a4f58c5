"""Decoding uncompressed DICOM in the main process (``LocalFirst``) and the compiled model call.

Both exist for scoring speed (benchmarks/RESULTS.md, "Scoring"): these tests pin which files
run where, when the pool takes over, and that neither change alters a single probability.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom.data
import pytest

from medtransfer.folder_pool import FolderPool, LocalFirst, crawl
from medtransfer.io import is_uncompressed_dicom
from medtransfer.scoring import score_folder
from tests.test_scoring import MeanPredictor, read_rows, write_png

SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS = SHARED / "data" / "dicom" / "corpus"
BROKEN = SHARED / "data" / "dicom" / "broken"
# The corpus files stored uncompressed (Explicit/Implicit VR Little Endian, Big Endian); the
# other 29 are JPEG, JPEG-LS, JPEG 2000, HTJ2K or RLE.
UNCOMPRESSED = {
    "693_UNCI.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "NIH_CXR14_DX_NoFinding_1.3.6.1.4.1.11129.5.5.1105.dcm",
    "eCT_Supplemental.dcm",
    "emri_small.dcm",
    "emri_small_big_endian.dcm",
    "gdcm-US-ALOKA-16.dcm",
    "mlut_18.dcm",
    "parametric_map_float.dcm",
    "vlut_04.dcm",
}


def process_id(path: str) -> int:
    """The FolderPool function for these tests: which process ran it."""
    return os.getpid()


def test_only_uncompressed_dicom_counts_as_uncompressed(tmp_path: Path) -> None:
    found = {name for name in os.listdir(CORPUS) if is_uncompressed_dicom(CORPUS / name)}
    assert found == UNCOMPRESSED
    assert len(os.listdir(CORPUS)) == 39
    write_png(tmp_path / "a.png", 10)
    (tmp_path / "empty.dcm").touch()
    others = [tmp_path / "a.png", tmp_path / "empty.dcm", tmp_path / "missing.dcm"]
    others += [BROKEN / name for name in os.listdir(BROKEN)]
    # no_meta.dcm parses but has no Transfer Syntax: decoding it is refused anyway.
    others.append(Path(pydicom.data.get_testdata_file("no_meta.dcm")))
    assert not any(map(is_uncompressed_dicom, others))


def test_the_pool_takes_over_once_local_runs_exceed_their_share() -> None:
    local = LocalFirst(lambda path: True, share=0.25)
    for _ in range(10):  # no budget known yet (the model's first batch): stay local
        local.record(1.0)
    assert local.active
    local.per_file_budget = 4.0  # 1 s is exactly a quarter: still local
    local.record(1.0)
    assert local.active
    local = LocalFirst(lambda path: True, share=0.25)
    local.per_file_budget = 1.0
    local.record(5.0)  # one slow first read (cold cache) decides nothing
    local.record(0.1)
    assert local.active and local.takes("x")
    local.record(0.3)  # median of 5.0, 0.1, 0.3 exceeds 0.25
    assert not local.active and not local.takes("x")
    assert local.local_runs == 3


def test_uncompressed_dicom_runs_here_and_everything_else_in_workers(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(CORPUS, folder)
    local = LocalFirst(is_uncompressed_dicom)
    with FolderPool(str(folder), process_id, workers=2, local=local) as pool:
        ran = {o.path: o.value for o in pool.imap(crawl(folder), max_in_flight=6)}
    here = {path for path, pid in ran.items() if pid == os.getpid()}
    assert len(ran) == 39 and None not in ran.values()
    assert here == UNCOMPRESSED
    assert local.local_runs == 10


def test_a_folder_decoded_wholly_here_never_starts_the_pool(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in UNCOMPRESSED:
        shutil.copy(CORPUS / name, folder / name)
    pool = FolderPool(str(folder), process_id, workers=2, local=LocalFirst(is_uncompressed_dicom))
    with pool:
        pids = {o.value for o in pool.imap(crawl(folder), max_in_flight=4)}
        assert pool._pool is None  # no worker was ever spawned
    assert pids == {os.getpid()}


def test_after_the_switch_uncompressed_files_go_to_the_workers(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        shutil.copy(CORPUS / "emri_small.dcm", folder / f"{i}.dcm")
    local = LocalFirst(is_uncompressed_dicom)
    local.per_file_budget = 0.0  # a model that costs nothing: decoding here never pays
    with FolderPool(str(folder), process_id, workers=1, local=local) as pool:
        pids = [o.value for o in pool.imap(crawl(folder), max_in_flight=1)]
    assert pids[:3] == [os.getpid()] * 3
    assert pids[3] != os.getpid()


@pytest.mark.parametrize("batch_size", [3, 16])
def test_scoring_rows_do_not_depend_on_where_files_are_decoded(
    tmp_path: Path, batch_size: int
) -> None:
    folder = tmp_path / "in"
    shutil.copytree(CORPUS, folder / "corpus")
    shutil.copytree(BROKEN, folder / "broken")
    write_png(folder / "gray.png", 90, size=12)
    outs = {}
    for name, options in {
        "here": {"workers": 2},
        "pool": {"workers": 2, "decode_here": False},
        "alone": {"workers": 0},
    }.items():
        outs[name] = tmp_path / f"{name}.csv"
        score_folder(
            folder, MeanPredictor(), outs[name], batch_size=batch_size, progress=False, **options
        )
    rows = read_rows(outs["here"])
    assert rows == read_rows(outs["pool"]) == read_rows(outs["alone"])
    assert sum(row["status"] == "ok" for row in rows) == 39 + 1


def test_the_compiled_model_call_equals_the_eager_one() -> None:
    import keras

    from medtransfer.models.inputs import to_model_input
    from medtransfer.predictor import KerasPredictor, ModelInfo

    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    info = ModelInfo("m", "binary", ["a", "b"], "b", (16, 16), 1, "dicom", "first")
    predictor = KerasPredictor(model, info, batch_size=4)
    images = list(np.random.default_rng(0).random((10, 20, 24), dtype=np.float32))
    probs = predictor.predict(images)  # chunks of 4, 4 and 2
    expected = np.asarray(model(to_model_input(images, (16, 16), 1), training=False))
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    predictor.predict(images[:3])
    # Two batch sizes trace twice at most; every later size reuses the relaxed graph.
    assert predictor._call.experimental_get_tracing_count() <= 2
