"""Tabular inputs: DICOM age strings, values from real headers and from CSV columns, the spec's
refusals, the in-graph encoding, and a model that must learn a label only the tabular data
carries (the images are noise) through train, evaluate, export and scoring."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medtransfer.data.manifest import build_manifest
from medtransfer.data.tabular import column_name, numeric_statistics, parse_number
from medtransfer.errors import SpecError
from medtransfer.models.saved import load_run_model
from medtransfer.spec import spec_from_dict

from .conftest import SHARED_DATA

CORPUS = SHARED_DATA / "dicom" / "corpus"
CXR = SHARED_DATA / "cxr_png"
AGE_SEX_VIEW = [
    {"name": "age", "type": "numeric"},
    {"name": "sex", "type": "categorical", "values": ["F", "M"]},
    {"name": "view", "type": "categorical", "values": ["PA", "AP"]},
]


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("045Y", 45.0),
        ("006M", 0.5),
        ("003W", 21 / 365.25),
        ("010D", 10 / 365.25),
        ("22Y", 22.0),  # real file: bad_sequence.dcm (two digits)
        ("81", 81.0),  # real file: the NIH CXR14 DX (no unit)
        (" 7.5 ", 7.5),
        ("-3", -3.0),
    ],
)
def test_numbers_and_dicom_age_strings_read_in_years(text, years):
    assert parse_number(text) == pytest.approx(years, rel=1e-12)


@pytest.mark.parametrize("missing", ["", "   ", None, math.nan])
def test_missing_numbers_are_nan(missing):
    assert math.isnan(parse_number(missing))


def test_a_word_is_not_a_number():
    with pytest.raises(ValueError, match="'abc' is not a number"):
        parse_number("abc")


def corpus_spec(tmp_path, files: dict[str, str], tabular=AGE_SEX_VIEW, **data):
    labels = tmp_path / "labels.csv"
    pd.DataFrame(
        {
            "path": list(files),
            "label": list(files.values()),
            "patient": [f"p{i}" for i in range(len(files))],
            "split": ["train"] * (len(files) - 1) + ["val"],
        }
    ).to_csv(labels, index=False)
    return spec_from_dict(
        {
            "name": "corpus",
            "task": "binary",
            "classes": ["a", "b"],
            "data": {
                "format": "dicom_folder",
                "path": str(CORPUS),
                "labels": str(labels),
                "patient_column": "patient",
                "split_column": "split",
                **data,
            },
            "tabular": tabular,
        }
    )


def test_dicom_folder_reads_age_sex_and_view_from_real_headers(tmp_path):
    files = {
        "ELSCINT1_JP2vsJ2K.dcm": "a",  # PatientAge 074Y, sex M
        "NIH_CXR14_DX_NoFinding_1.3.6.1.4.1.11129.5.5.1105.dcm": "b",  # PatientAge "81", M
        "bad_sequence.dcm": "a",  # 22Y, M
        "RG3_J2KR.dcm": "b",  # no PatientAge, F, view AP
        "966_fixed.dcm": "a",  # empty PatientAge and sex, view PA
        "parametric_map_float.dcm": "b",  # 000Y, sex O (not a listed value)
    }
    names = {p.name for p in CORPUS.iterdir()}
    assert set(files) <= names, "corpus file names changed"
    with pytest.warns(UserWarning, match=r"tabular.sex: value\(s\) \['O'\] are not in values"):
        df = build_manifest(corpus_spec(tmp_path, files))
    df = df.set_index(df["path"].map(lambda p: p.rsplit("/", 1)[1]))
    ages = df[column_name("age")].to_dict()
    assert ages["ELSCINT1_JP2vsJ2K.dcm"] == 74.0
    assert ages["bad_sequence.dcm"] == 22.0
    assert ages["parametric_map_float.dcm"] == 0.0
    assert math.isnan(ages["RG3_J2KR.dcm"]) and math.isnan(ages["966_fixed.dcm"])
    assert sorted(v for v in ages.values() if not math.isnan(v)) == [0.0, 22.0, 74.0, 81.0]
    assert df[column_name("sex")].tolist() == [
        {"ELSCINT1": "M", "NIH_CXR1": "M", "bad_sequ": "M", "RG3_J2KR": "F", "966_fixe": "",
         "parametr": "O"}[name[:8]]
        for name in df.index
    ]  # fmt: skip
    assert df.loc["RG3_J2KR.dcm", column_name("view")] == "AP"
    assert df.loc["966_fixed.dcm", column_name("view")] == "PA"
    assert df.loc["bad_sequence.dcm", column_name("view")] == ""


def test_a_csv_column_wins_over_the_tag_and_a_bad_cell_names_itself(tmp_path):
    files = {"ELSCINT1_JP2vsJ2K.dcm": "a", "bad_sequence.dcm": "b"}
    spec = corpus_spec(tmp_path, files, tabular=[{"name": "age", "type": "numeric"}])
    table = pd.read_csv(spec.data.labels)
    table["age"] = ["006M", ""]
    table.to_csv(spec.data.labels, index=False)
    ages = build_manifest(spec)[column_name("age")].tolist()
    assert ages[0] == 0.5 and math.isnan(ages[1])  # not the headers' 74 and 22
    table["age"] = ["40", "forty"]
    table.to_csv(spec.data.labels, index=False)
    with pytest.raises(SpecError, match=r"tabular.age: column 'age': 'forty' is not a number"):
        build_manifest(spec)


def png_manifest_spec(tmp_path, tabular, extra_columns=None):
    table = pd.read_csv(CXR / "labels.csv")
    rows = pd.DataFrame(
        {
            "path": [str(CXR / f) for f in table["filename"]],
            "label": table["no_finding"],
            "split": ["train", "train", "train", "train", "val", "val", "val"],
            **(extra_columns or {}),
        }
    )
    rows.to_csv(tmp_path / "manifest.csv", index=False)
    return spec_from_dict(
        {
            "name": "cxr",
            "task": "binary",
            "classes": ["finding", "no_finding"],
            "data": {"format": "manifest", "path": str(tmp_path / "manifest.csv")},
            "tabular": tabular,
            "split": {"val": 0.3, "test": 0.0},
        }
    )


def test_manifest_of_pngs_reads_columns_and_has_no_tags_to_fall_back_on(tmp_path):
    spec = png_manifest_spec(
        tmp_path,
        [{"name": "age", "type": "numeric"}, {"name": "sex", "type": "categorical",
                                              "values": ["F", "M"]}],
        {"sex": ["M", "M", "F", "F", "M", "", "F"]},
    )  # fmt: skip
    df = build_manifest(spec)
    assert df[column_name("age")].isna().all()  # no column, and PNGs carry no PatientAge
    assert df[column_name("sex")].tolist() == ["M", "M", "F", "F", "M", "", "F"]
    smoker = png_manifest_spec(tmp_path, [{"name": "smoker", "type": "categorical",
                                           "values": ["yes", "no"]}])  # fmt: skip
    with pytest.raises(SpecError, match=r"no column 'smoker'.*no DICOM tag"):
        build_manifest(smoker)


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        ({"name": "pid", "type": "categorical", "values": ["x"], "tag": "PatientID"}, "identifies"),
        ({"name": "dob", "type": "numeric", "tag": "PatientBirthDate"}, "identifies"),
        ({"name": "x", "type": "numeric", "tag": "NotAKeyword"}, "not a DICOM keyword"),
        ({"name": "sex", "type": "categorical"}, "needs unique values"),
        ({"name": "sex", "type": "categorical", "values": ["F", ""]}, "empty value means"),
        ({"name": "age", "type": "numeric", "values": ["1"]}, "takes no values"),
        ({"name": "image", "type": "numeric"}, "image input's name"),
        ({"name": "Age", "type": "numeric"}, "should match pattern"),
    ],
)
def test_spec_refuses_unusable_features(tmp_path, feature, message):
    with pytest.raises(SpecError, match=message):
        png_manifest_spec(tmp_path, [feature])


def test_spec_refuses_tabular_features_on_npz_and_with_image_mixing(tmp_path):
    with pytest.raises(SpecError, match="need a table per image"):
        spec_from_dict(
            {
                "name": "breast",
                "task": "binary",
                "classes": ["a", "b"],
                "data": {"format": "npz", "path": str(SHARED_DATA / "medmnist/breastmnist.npz")},
                "tabular": [{"name": "age", "type": "numeric"}],
            }
        )
    from medtransfer.data.augment_settings import check_settings, resolve_settings

    spec = png_manifest_spec(tmp_path, [{"name": "age", "type": "numeric"}])
    mixing = spec.with_overrides(augmentation={"options": {"mixup": {"probability": 0.5}}})
    with pytest.raises(SpecError, match=r"\['mixup'\] blend two images"):
        check_settings(resolve_settings(mixing), mixing)


# --- the model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_spec(tmp_path_factory):
    from medtransfer.models.build import build_model

    spec = png_manifest_spec(tmp_path_factory.mktemp("m"), AGE_SEX_VIEW[:2])
    spec = spec.with_overrides(
        model={"backbone": "mobilenetv3small", "weights": "none"}, image={"size": (32, 32)}
    )
    return build_model(spec, {"age": (50.0, 10.0)}), spec


def batch(ages, sexes, same_image=False):
    """Model inputs as TensorFlow tensors (a Keras call cannot mix them with numpy arrays)."""
    import tensorflow as tf

    images = np.random.default_rng(0).random((len(ages), 40, 40, 1), np.float32)
    if same_image:
        images[:] = images[0]
    return {
        "image": tf.constant(images),
        "age": tf.constant(np.asarray(ages, np.float32).reshape(-1, 1)),
        "sex": tf.constant(np.asarray(sexes, object).reshape(-1, 1)),
    }


def test_encoding_standardises_flags_missing_and_one_hots_with_an_other_slot(model_and_spec):
    model, _ = model_and_spec
    assert sorted(model.input.keys()) == ["age", "image", "sex"]
    age = model.get_layer("age_standardize")(np.array([[40.0], [np.nan], [65.0]], np.float32))
    assert np.asarray(age).tolist() == [[-1.0, 0.0], [0.0, 1.0], [1.5, 0.0]]
    sex = model.get_layer("sex_lookup")(batch([0] * 4, ["F", "M", "", "X"])["sex"])
    assert np.asarray(sex).tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0], [1, 0, 0]]


def test_prediction_depends_on_the_tabular_inputs(model_and_spec):
    model, _ = model_and_spec
    x = batch([30, 70, np.nan, 30], ["F", "F", "F", "M"], same_image=True)
    p = np.asarray(model(x, training=False))
    assert np.abs(p[0] - p[1]).max() > 1e-4  # age matters
    assert np.abs(p[0] - p[2]).max() > 1e-4  # so does its absence
    assert np.abs(p[0] - p[3]).max() > 1e-4  # and sex


def test_tabular_model_reloads_in_safe_mode_with_its_statistics(model_and_spec, tmp_path):
    import keras

    model, _ = model_and_spec
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    x = batch([35, np.nan, 80], ["M", "", "F"])
    assert np.array_equal(
        np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False))
    )
    assert loaded.get_layer("age_standardize").get_config()["mean"] == 50.0


def test_statistics_come_from_known_training_values_only():
    from medtransfer.spec import TabularFeature

    features = [TabularFeature(name="age", type="numeric")]
    stats = numeric_statistics({"age": np.array([[20.0], [np.nan], [40.0]])}, features)
    assert stats == {"age": (30.0, 10.0)}
    assert numeric_statistics({"age": np.array([[np.nan], [7.0]])}, features) == {"age": (7.0, 1.0)}


# --- end to end: a label only the tabular data carries -------------------------------------------


def write_noise_dicoms(root, n: int, seed: int = 0) -> pd.DataFrame:
    """DICOM files whose pixels are noise; the label is 'female' exactly when PatientSex is F.
    Every 10th file has no PatientSex (label drawn at random: the model cannot know it)."""
    rng = np.random.default_rng(seed)
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    rows = []
    for i in range(n):
        ds = template.copy()
        pixels = rng.integers(0, 4000, (64, 64)).astype(template.pixel_array.dtype)
        ds.PixelData = pixels.tobytes()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = f"PATIENT{i:04d}"
        ds.PatientAge = f"{int(rng.integers(20, 90)):03d}Y"
        sex = str(rng.choice(["F", "M"]))
        if i % 10 == 9:
            del ds.PatientSex
            label = str(rng.choice(["female", "male"]))
        else:
            ds.PatientSex = sex
            label = "female" if sex == "F" else "male"
        name = f"img{i:03d}.dcm"
        ds.save_as(root / name, enforce_file_format=True)
        split = "train" if i < 0.6 * n else "val" if i < 0.8 * n else "test"
        rows.append({"path": name, "label": label, "split": split})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory):
    from medtransfer.training.run import train

    root = tmp_path_factory.mktemp("tabular")
    (root / "dicom").mkdir()
    write_noise_dicoms(root / "dicom", 100).to_csv(root / "labels.csv", index=False)
    spec = spec_from_dict(
        {
            "name": "sexonly",
            "task": "binary",
            "classes": ["male", "female"],
            "data": {
                "format": "dicom_folder",
                "path": str(root / "dicom"),
                "labels": str(root / "labels.csv"),
                "split_column": "split",
            },
            "image": {"size": [32, 32], "window": "minmax"},
            "model": {"backbone": "mobilenetv3small", "weights": "none"},
            "training": {"epochs": 6, "batch_size": 20, "learning_rate": 0.01},
            "augmentation": {"preset": "none"},
            "tabular": [
                {"name": "age", "type": "numeric"},
                {"name": "sex", "type": "categorical", "values": ["F", "M"]},
            ],
        }
    )
    return root, spec, train(spec, root / "run", workers=0)


def test_run_records_its_features_and_their_training_summary(tabular_run):
    _, _, run = tabular_run
    info = json.loads((run.path / "run.json").read_text())
    assert [f["name"] for f in info["tabular"]] == ["age", "sex"]
    summary = info["tabular_summary"]
    assert summary["age"]["missing"] == 0 and 20 <= summary["age"]["min"] <= summary["age"]["max"]
    assert summary["sex"]["missing"] == 6  # files 9, 19, ..., 59 of the 60 training files
    assert sum(summary["sex"]["counts"].values()) == 54


def test_model_learns_what_only_the_tabular_data_says(tabular_run, tmp_path):
    from medtransfer.evaluation.report import evaluate

    _, spec, run = tabular_run
    evaluation = evaluate(run.path, spec, split="test", out_dir=tmp_path / "report")
    known = evaluation.predictions["path"].map(lambda p: int(p.rsplit("img", 1)[1][:3]) % 10 != 9)
    labels = (evaluation.predictions["label"] == "female").to_numpy()
    scores = evaluation.predictions["prob_female"].to_numpy()
    from sklearn.metrics import roc_auc_score

    # The pixels are noise: an image-only model scores 0.5 here.
    assert roc_auc_score(labels[known], scores[known]) == 1.0


def test_export_and_scoring_take_the_same_inputs_as_evaluation(tabular_run, tmp_path):
    import tensorflow as tf

    from medtransfer.evaluation.report import evaluate
    from medtransfer.export import export_model
    from medtransfer.predictor import load_predictor
    from medtransfer.scoring import score_folder

    root, spec, run = tabular_run
    exported = export_model(run.path, tmp_path / "sexonly" / "1")
    served = evaluate(exported, spec, split="test", out_dir=tmp_path / "served")
    direct = evaluate(run.path, spec, split="test", out_dir=tmp_path / "direct")
    assert (
        np.abs(served.predictions["prob_female"] - direct.predictions["prob_female"]).max() <= 1e-5
    )

    loaded = tf.saved_model.load(str(exported))
    signature = loaded.signatures["serving_default"]
    assert sorted(signature.structured_input_signature[1]) == ["age", "image", "sex"]
    # A TF Serving REST body, one object per instance, through the signature.
    body = json.loads(
        json.dumps(
            {"instances": [{"image": np.zeros((8, 8, 1)).tolist(), "age": 45.0, "sex": s}
                           for s in ("F", "M", "")]}
        )
    )  # fmt: skip
    columns = {k: [inst[k] for inst in body["instances"]] for k in ("image", "age", "sex")}
    out = signature(
        image=tf.constant(columns["image"], tf.float32),
        age=tf.constant(columns["age"], tf.float32),
        sex=tf.constant(columns["sex"]),
    )["probabilities"].numpy()
    keras_model = load_run_model(run)
    expected = keras_model(
        {
            "image": tf.image.resize(tf.zeros((3, 8, 8, 1)), (32, 32), antialias=True),
            "age": tf.constant([[45.0]] * 3),
            "sex": tf.constant([["F"], ["M"], [""]]),
        },
        training=False,  # (a call without it runs BatchNormalization in training mode)
    )
    assert np.abs(out - np.asarray(expected)).max() <= 1e-5
    assert out[0, 1] > 0.5 > out[1, 1]  # female for F, male for M

    scores = tmp_path / "scores.csv"
    summary = score_folder(root / "dicom", load_predictor(exported), scores, workers=1)
    assert summary.n_ok == 100 and summary.n_error == 0
    scored = pd.read_csv(scores).set_index("path")
    for path, p in zip(direct.predictions["path"], direct.predictions["prob_female"], strict=True):
        assert abs(scored.loc[path.rsplit("/", 1)[1], "prob_female"] - p) <= 1e-5, path


def test_png_signature_takes_the_tabular_inputs_too(tabular_run, tmp_path):
    import tensorflow as tf

    from medtransfer.export import export_model

    _, _, run = tabular_run
    exported = export_model(run.path, tmp_path / "m" / "1")
    png = tf.io.encode_png(tf.zeros((20, 20, 1), tf.uint8))
    out = tf.saved_model.load(str(exported)).signatures["predict_png"](
        image_bytes=tf.stack([png, png, png]),
        age=tf.constant([30.0, math.nan, 50.0]),
        sex=tf.constant(["F", "M", ""]),
    )
    female = out["probabilities"].numpy()[:, 1]
    assert female[0] > 0.5 > female[1]
    card = json.loads((exported / "model_card.json").read_text())
    assert card["input"]["tabular"] == [
        "age: float32 [batch], NaN = missing; scoring reads DICOM PatientAge",
        "sex: string [batch], one of ['F', 'M']; anything else = missing; scoring reads DICOM "
        "PatientSex",
    ]
