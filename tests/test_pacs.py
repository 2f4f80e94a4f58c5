"""PACS scoring against a real Orthanc: DICOMweb in, one row per instance, SRs out and back.

The demo's generated DICOM files (``medtransfer.synthetic``) are uploaded to a throwaway Orthanc
(``tests/orthanc.py``), scored over DICOMweb and compared with folder scoring of the same files.
The stand-in model of ``test_scoring`` keeps these tests free of TensorFlow; the command line
with a real exported model is the slow test at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.uid import generate_uid

from medtransfer.pacs.client import PacsError, Server
from medtransfer.pacs.listing import Instance
from medtransfer.pacs.rules import RulesError, load_rules, verdict
from medtransfer.pacs.score import Reports, score_dicomweb
from medtransfer.pacs.sr import CLASS_SCHEME, Algorithm, Decision
from medtransfer.scoring import ScoreOptions, score_folder
from medtransfer.synthetic import generate_dicom_dataset
from tests.orthanc import free_port, missing, start_orthanc
from tests.test_scoring import MeanPredictor, read_rows, wait_for

TESTS = Path(__file__).resolve().parent
ALGORITHM = Algorithm("mean-intensity", "7")
THRESHOLD = 0.4  # MeanPredictor's P(high) is the mean pixel: the files fall on both sides
DECISIONS = (Decision("high", "youden", THRESHOLD),)
OPTIONS = ScoreOptions(workers=1, batch_size=4, progress=False)

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "Orthanc is installed")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def uploaded(orthanc, tmp_path_factory) -> dict:
    """8 generated DX images (4 patients, 2 studies' worth of series each) in Orthanc, the first
    patient without a birth date, plus a SECONDARY copy the series rules must reject."""
    root = tmp_path_factory.mktemp("pacs-data")
    generate_dicom_dataset(root, n_patients=4, images_per_patient=2, seed=3)
    folder = root / "dicom"
    files = sorted(folder.rglob("*.dcm"))
    first_patient = pydicom.dcmread(files[0]).PatientID
    for path in files:
        ds = pydicom.dcmread(path)
        if ds.PatientID == first_patient:
            del ds.PatientBirthDate
            ds.save_as(path, enforce_file_format=True)
        orthanc.upload(path)
    secondary = pydicom.dcmread(files[-1])
    secondary.ImageType = ["DERIVED", "SECONDARY"]
    secondary.SeriesInstanceUID = generate_uid(entropy_srcs=["test_pacs", "secondary series"])
    secondary.SOPInstanceUID = generate_uid(entropy_srcs=["test_pacs", "secondary"])
    secondary.file_meta.MediaStorageSOPInstanceUID = secondary.SOPInstanceUID
    extra = root / "secondary.dcm"  # outside the folder: folder scoring must not see it
    secondary.save_as(extra, enforce_file_format=True)
    orthanc.upload(extra)
    sources = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in files}
    return {
        "folder": folder,
        "sources": sources,
        "no_birth_date": first_patient,
        "secondary": secondary,
    }


@pytest.fixture(scope="module")
def scored(orthanc, uploaded, tmp_path_factory) -> dict:
    """One PACS run (SRs to a folder and stored back) and folder scoring of the same files."""
    out = tmp_path_factory.mktemp("pacs-out")
    server = Server(orthanc.dicomweb, timeout=10)
    reports = Reports(ALGORITHM, DECISIONS, out / "sr", stow=server)
    summary = score_dicomweb(
        server,
        MeanPredictor(),
        out / "scores.csv",
        query="Modality=DX",
        reports=reports,
        options=OPTIONS,
    )
    score_folder(uploaded["folder"], MeanPredictor(), out / "folder.csv", workers=1, progress=False)
    return {
        "summary": summary,
        "out": out,
        "rows": read_rows(out / "scores.csv"),
        "folder_rows": read_rows(out / "folder.csv"),
    }


def probabilities(row: dict[str, str]) -> list[float]:
    return [float(row["prob_low"]), float(row["prob_high"])]


def test_every_selected_instance_is_one_row_equal_to_folder_scoring(scored, uploaded) -> None:
    rows, folder_rows = scored["rows"], scored["folder_rows"]
    assert len(rows) == len(uploaded["sources"]) == 8
    assert len({row["path"] for row in rows}) == 8
    by_sop = {row["sop_instance_uid"]: row for row in folder_rows}
    assert set(by_sop) == {row["sop_instance_uid"] for row in rows} == set(uploaded["sources"])
    for row in rows:
        source = pydicom.dcmread(uploaded["sources"][row["sop_instance_uid"]])
        assert (
            row["path"]
            == f"{source.StudyInstanceUID}/{source.SeriesInstanceUID}/" + (row["sop_instance_uid"])
        )
        assert (row["status"], row["error"], row["modality"]) == ("ok", "", "DX")
        folder = by_sop[row["sop_instance_uid"]]
        np.testing.assert_allclose(probabilities(row), probabilities(folder), atol=1e-5)
        assert row["intensity_mean"] == folder["intensity_mean"]
    assert scored["summary"].exit_code == 0
    assert not (scored["out"] / "scores.csv.dicomweb-staging").exists()


def test_rejected_series_are_reported_with_their_reason(scored, uploaded) -> None:
    table = read_rows(scored["out"] / "scores.series.csv")
    assert len(table) == 9 and scored["summary"].n_series_rejected == 1
    rejected = [row for row in table if row["selected"] == "0"]
    assert [row["series_instance_uid"] for row in rejected] == [
        uploaded["secondary"].SeriesInstanceUID
    ]
    assert rejected[0]["rejected_because"] == ("projection radiographs: ImageType is SECONDARY (1)")
    assert all(row["instances"] == row["selected"] == "1" for row in table if row not in rejected)


def stored_reports(orthanc) -> list[pydicom.Dataset]:
    """Every SR in Orthanc, read back over WADO-RS."""
    client = DICOMwebClient(orthanc.dicomweb)
    found = client.search_for_instances(search_filters={"Modality": "SR"})
    return [
        client.retrieve_instance(
            item["0020000D"]["Value"][0], item["0020000E"]["Value"][0], item["00080018"]["Value"][0]
        )
        for item in found
    ]


def read_sr(dataset: pydicom.Dataset) -> hd.sr.Comprehensive3DSR:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.srread(buffer)


def items(sequence) -> list:
    """Every content item of an SR tree, depth first."""
    found = []
    for item in sequence:
        found.append(item)
        found += items(getattr(item, "ContentSequence", []))
    return found


def test_stored_reports_reference_their_source_and_carry_the_probabilities(scored, orthanc) -> None:
    rows = {row["sop_instance_uid"]: row for row in scored["rows"]}
    stored = stored_reports(orthanc)
    assert len(stored) == 8
    seen = set()
    for dataset in stored:
        sr = read_sr(dataset)
        groups = sr.content.get_image_measurement_groups()
        assert [str(g.finding_type.meaning) for g in groups] == ["low", "high"]
        assert {g.finding_type.scheme_designator for g in groups} == {CLASS_SCHEME}
        (source,) = {g.source_images[0].referenced_sop_instance_uid for g in groups}
        seen.add(source)
        row = rows[source]
        values = [g.get_measurements()[0].value for g in groups]
        np.testing.assert_allclose(values, probabilities(row), atol=1e-6)
        assert {g.get_measurements()[0].name.value for g in groups} == {"122157"}
        (decision,) = groups[1].get_qualitative_evaluations()
        present = float(row["prob_high"]) >= THRESHOLD
        assert decision.value.value == ("52101004" if present else "272519000")
        assert groups[0].get_qualitative_evaluations() == []
        named = {
            i.ConceptNameCodeSequence[0].CodeValue: getattr(i, "TextValue", None)
            for i in items(sr.ContentSequence)
        }
        assert (named["111001"], named["111003"]) == (ALGORITHM.name, ALGORITHM.version)
        referenced = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        assert referenced[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source
    assert seen == set(rows)
    on_disk = {p.name for p in (scored["out"] / "sr").iterdir()}
    assert on_disk == {f"{sop}.dcm" for sop in rows}


# Patient and study attributes: an SR may hold the source's values, or leave Type 2 ones empty.
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyInstanceUID",
)
# What the sources hold of their site and acquisition: never copied into an SR.
NEVER_COPIED = ("InstitutionName", "ManufacturerModelName", "PatientOrientation", "ViewPosition")


def test_reports_carry_no_patient_data_beyond_their_source(scored, uploaded) -> None:
    checked_missing_birth_date = 0
    for path in sorted((scored["out"] / "sr").iterdir()):
        sr = pydicom.dcmread(path)
        sop = path.name.removesuffix(".dcm")
        source = pydicom.dcmread(uploaded["sources"][sop], stop_before_pixels=True)
        for keyword in PATIENT_AND_STUDY:
            if keyword in source:
                assert sr[keyword].value == source[keyword].value, keyword
            else:
                assert keyword not in sr or sr[keyword].value in (None, ""), keyword
        patient_tags = {e.keyword for e in sr if e.tag.group == 0x0010}
        assert patient_tags <= {e.keyword for e in source if e.tag.group == 0x0010} | {
            "PatientBirthDate"
        }
        held = {(e.keyword, str(e.value)) for e in sr.iterall()}
        assert not held & {(k, str(source[k].value)) for k in NEVER_COPIED}
        if source.PatientID == uploaded["no_birth_date"]:
            assert "PatientBirthDate" not in source and not sr.get("PatientBirthDate")
            checked_missing_birth_date += 1
    assert checked_missing_birth_date == 2


def score_first_study(orthanc, uploaded, out: Path, reports: Reports | None = None):
    """The first uploaded file's study scored over DICOMweb by the stand-in model."""
    study = pydicom.dcmread(next(iter(uploaded["sources"].values()))).StudyInstanceUID
    server = Server(orthanc.dicomweb, 10)
    return score_dicomweb(
        server, MeanPredictor(), out, study=study, reports=reports, options=OPTIONS
    )


def test_an_instance_that_cannot_be_fetched_is_an_error_row(
    orthanc, uploaded, tmp_path, monkeypatch
) -> None:
    import medtransfer.pacs.score as pacs_score

    real = pacs_score.list_instances

    def with_a_missing_instance(*args, **kwargs):
        instances, series = real(*args, **kwargs)
        gone = Instance(instances[0].study, instances[0].series, "1.2.3.4.5.6.7.404")
        return [gone, *instances[:1]], series

    monkeypatch.setattr(pacs_score, "list_instances", with_a_missing_instance)
    summary = score_first_study(orthanc, uploaded, tmp_path / "s.csv")
    rows = read_rows(tmp_path / "s.csv")
    assert [(r["status"], r["error"]) for r in rows] == [
        ("error", "fetch failed: HTTP 404 Not Found"),
        ("ok", ""),
    ]
    assert summary.exit_code == 1


def test_a_pacs_that_refuses_the_reports_turns_their_rows_into_error_rows(
    orthanc, uploaded, tmp_path
) -> None:
    """The images were scored and their SRs written, but not stored: no row may claim its
    report is in the PACS, and the run ends with exit 1, not 0."""
    dead = Server(f"http://127.0.0.1:{free_port()}/dicom-web", 2)
    reports = Reports(ALGORITHM, DECISIONS, tmp_path / "sr", stow=dead)
    summary = score_first_study(orthanc, uploaded, tmp_path / "s.csv", reports)
    rows = read_rows(tmp_path / "s.csv")
    assert len(rows) == 2 and summary.exit_code == 1
    for row in rows:
        assert row["status"] == "error" and row["prob_high"] == "" == row["prob_low"]
        assert (
            row["error"]
            == "STOW-RS failed: cannot connect (server down, wrong host or port, or refused)"
        )
        assert row["sop_instance_uid"] == row["path"].split("/")[-1]
    assert len(list((tmp_path / "sr").glob("*.dcm"))) == 2  # written before the store failed


def test_reports_name_a_released_model_and_a_known_operating_point(tmp_path) -> None:
    from medtransfer.export_layout import EXPORT_GRAPH, EXPORT_INFO, MODEL_CARD
    from medtransfer.pacs.sr import algorithm_of
    from medtransfer.scoring import ScoringError

    export = tmp_path / "breast" / "3"
    (export / EXPORT_INFO).parent.mkdir(parents=True)
    (export / EXPORT_GRAPH).write_bytes(b"")
    (export / EXPORT_INFO).write_text("{}")
    with pytest.raises(ScoringError, match=r"need an exported model .* run medtransfer export"):
        algorithm_of(tmp_path)  # a run directory, or anything without a model card
    (export / MODEL_CARD).write_text(json.dumps({"model": "breast"}))
    assert algorithm_of(export) == (Algorithm("breast", "3"), [])  # exported unevaluated
    thresholds = {"thresholds": {"malignant": {"youden": 0.3, "sensitivity_0.95": None}}}
    (export / EXPORT_INFO.parent / "thresholds.json").write_text(json.dumps(thresholds))
    _, decisions = algorithm_of(export, "sensitivity_0.95")
    assert decisions == [Decision("malignant", "sensitivity_0.95", math.inf)]
    with pytest.raises(
        ScoringError, match=r"'youdn' is not one of .*\['sensitivity_0.95', 'youden'\]"
    ):
        algorithm_of(export, "youdn")


def run_cli(argv: list[str], monkeypatch) -> int:
    """``medtransfer`` in this process, with the stand-in model (no TensorFlow import)."""
    from medtransfer.cli import main

    stub = types.SimpleNamespace(load_predictor=lambda *a, **k: MeanPredictor())
    monkeypatch.setitem(sys.modules, "medtransfer.predictor", stub)
    return main(argv)


def test_usage_errors_exit_2_with_a_clear_message(orthanc, tmp_path, monkeypatch, capsys) -> None:
    out = str(tmp_path / "s.csv")
    silent = socket.socket()  # accepts connections, never answers: the timeout must hold
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    cases = {
        f"http://127.0.0.1:{free_port()}/dicom-web": "cannot connect",
        f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web": "no answer within 1 s",
    }
    # first (and untimed): the command line's own start-up, TensorFlow's import included
    both = ["score", str(tmp_path), "--dicomweb", orthanc.dicomweb, "--model", "m", "--out", out]
    assert run_cli(both, monkeypatch) == 2
    assert "give INPUT_DIR or --dicomweb URL" in capsys.readouterr().err
    with silent:
        for url, message in cases.items():
            start = time.monotonic()
            argv = ["score", "--dicomweb", url, "--study", "1.2.3", "--dicomweb-timeout", "1"]
            assert run_cli([*argv, "--model", "m", "--out", out], monkeypatch) == 2
            assert message in capsys.readouterr().err
            assert time.monotonic() - start < 10
    unknown = ["score", "--dicomweb", orthanc.dicomweb, "--study", "1.2.3.999", "--model", "m"]
    assert run_cli([*unknown, "--out", out], monkeypatch) == 2
    assert "no study 1.2.3.999 found" in capsys.readouterr().err
    assert not Path(out).exists()


def test_resume_after_a_kill_scores_each_instance_once(orthanc, scored, tmp_path) -> None:
    out = tmp_path / "scores.csv"
    partial = out.with_name("scores.csv.partial")
    script = (
        f"import sys; sys.path.insert(0, {str(TESTS.parent)!r})\n"
        "from pathlib import Path\n"
        "from tests.test_scoring import MeanPredictor\n"
        "from tests.test_pacs import ALGORITHM, DECISIONS\n"
        "from medtransfer.pacs.client import Server\n"
        "from medtransfer.pacs.score import Reports, score_dicomweb\n"
        "from medtransfer.scoring import ScoreOptions\n"
        "if __name__ == '__main__':\n"
        f"    score_dicomweb(Server({orthanc.dicomweb!r}), MeanPredictor(delay_per_image=0.8),\n"
        f"        {str(out)!r}, query='Modality=DX',\n"
        f"        reports=Reports(ALGORITHM, DECISIONS, Path({str(tmp_path / 'sr')!r})),\n"
        "        options=ScoreOptions(workers=1, batch_size=1, progress=False))\n"
    )
    (tmp_path / "run.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py")], start_new_session=True)
    try:
        wait_for(lambda: partial.exists() and partial.read_text().count("\n") > 3)
        assert proc.poll() is None, "scoring ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not out.exists()
    kept = len(read_rows(partial))
    summary = score_dicomweb(
        Server(orthanc.dicomweb),
        MeanPredictor(),
        out,
        query="Modality=DX",
        reports=Reports(ALGORITHM, DECISIONS, tmp_path / "sr"),
        options=ScoreOptions(workers=1, batch_size=4, resume=True, progress=False),
    )
    assert 3 <= summary.scores.n_resumed == kept < 8
    assert summary.scores.n_files == 8
    assert "Scored " + str(8 - kept) + " in" in str(summary.scores)
    assert read_rows(out) == scored["rows"]
    assert len(list((tmp_path / "sr").glob("*.dcm"))) == 8


def test_series_rules_are_data_and_checked() -> None:
    rules = load_rules()
    dx = {
        "00080060": {"vr": "CS", "Value": ["DX"]},
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]},
    }
    assert verdict(dx, rules) == ""
    localizer = {**dx, "00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}}
    assert verdict(localizer, rules) == "projection radiographs: ImageType is LOCALIZER"
    assert verdict({"00080060": {"vr": "CS", "Value": ["SR"]}}, rules) == (
        "projection radiographs: Modality is SR"
    )
    assert verdict({}, rules) == "projection radiographs: no Modality"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("selections: []", "needs a non-empty list 'selections'"),
        ("selections: [{name: x, conditions: {Modalty: {any_of: [DX]}}}]", "not a DICOM keyword"),
        ("selections: [{name: x, conditions: {Modality: {one_of: [DX]}}}]", "give one of"),
        ("selections: [{name: x, conditions: {Modality: {matches: '('}}}]", "bad pattern"),
    ],
)
def test_a_bad_rules_file_is_refused(tmp_path, text, message) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RulesError, match=message):
        load_rules(path)


def test_a_whole_pacs_is_not_scored_by_accident(tmp_path) -> None:
    with pytest.raises(PacsError, match="needs --study UID or --query"):
        score_dicomweb(Server("http://127.0.0.1:9/dicom-web"), MeanPredictor(), tmp_path / "o.csv")


def test_importing_the_fetch_worker_does_not_import_tensorflow() -> None:
    code = "import sys, medtransfer.pacs.fetch; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.slow
def test_cli_with_an_exported_model_matches_folder_scoring(
    orthanc, uploaded, scored, tiny_run, tmp_path
) -> None:
    """The whole command: a real export scores over DICOMweb as it scores the folder, and the
    SRs it stores name the model card's algorithm."""
    from medtransfer.cli import main
    from medtransfer.export import export_model

    exported = export_model(tiny_run, tmp_path / "models" / "tiny" / "1")
    study = pydicom.dcmread(next(iter(uploaded["sources"].values()))).StudyInstanceUID
    pacs, folder = tmp_path / "pacs.csv", tmp_path / "folder.csv"
    argv = [
        "score",
        "--dicomweb",
        orthanc.dicomweb,
        "--study",
        str(study),
        "--model",
        str(exported),
        "--out",
        str(pacs),
        "--sr",
        str(tmp_path / "sr"),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert (
        main(
            [
                "score",
                str(uploaded["folder"]),
                "--model",
                str(exported),
                "--out",
                str(folder),
                "--no-progress",
            ]
        )
        == 0
    )
    by_sop = {row["sop_instance_uid"]: row for row in read_rows(folder)}
    rows = read_rows(pacs)
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows)
    for row in rows:
        expected = by_sop[row["sop_instance_uid"]]
        np.testing.assert_allclose(
            [float(row[c]) for c in ("prob_plain", "prob_spot")],
            [float(expected[c]) for c in ("prob_plain", "prob_spot")],
            atol=1e-5,
        )
        # the tiny model may be degenerate (constant output): the pixels it got must match too
        assert (row["intensity_mean"], row["intensity_std"]) == (
            expected["intensity_mean"],
            expected["intensity_std"],
        )
        sr = hd.sr.srread(tmp_path / "sr" / f"{row['sop_instance_uid']}.dcm")
        assert sr.SeriesDescription == "tiny 1"
