"""Spec validation: good specs load with paths anchored at the spec file; bad ones fail early
with the file, the field and the problem in the message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medtransfer.errors import SpecError
from medtransfer.spec import dump_spec, load_spec, spec_from_dict

from .conftest import REPO, SHARED_DATA

NPZ = SHARED_DATA / "medmnist" / "breastmnist.npz"


def write(tmp_path: Path, raw: dict | str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def base(**changes) -> dict:
    raw = {
        "name": "t",
        "task": "binary",
        "classes": ["a", "b"],
        "data": {"format": "npz", "path": str(NPZ)},
    }
    raw.update(changes)
    return raw


@pytest.mark.parametrize("name", ["breastmnist", "pneumoniamnist", "retinamnist"])
def test_shipped_specs_load_and_point_at_shared_data(name):
    spec = load_spec(REPO / "data_specs" / f"{name}.yaml")
    assert spec.data.path == (SHARED_DATA / "medmnist" / f"{name}.npz").resolve()
    assert spec.source_file == (REPO / "data_specs" / f"{name}.yaml").resolve()


def test_breastmnist_spec_names_malignant_positive():
    spec = load_spec(REPO / "data_specs" / "breastmnist.yaml")
    assert spec.task == "binary"
    assert spec.classes == ["malignant", "normal_or_benign"]
    assert spec.positive == "malignant"


def test_relative_paths_are_relative_to_the_spec_file(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "m.csv").write_text("path,label\n")
    specs = tmp_path / "specs"
    specs.mkdir()
    path = write(specs, base(data={"format": "manifest", "path": "../data/m.csv"}))
    monkeypatch.chdir(data)  # the current directory must not matter
    assert load_spec(path).data.path == (data / "m.csv").resolve()


@pytest.mark.parametrize(
    ("raw", "field", "problem"),
    [
        (base(task="regression"), "task", "'binary', 'multiclass' or 'multilabel'"),
        (base(classes=["a", "b", "c"]), "(top level)", "exactly 2 classes"),
        (base(task="multiclass"), "(top level)", "at least 3 classes"),
        (base(classes=["a", "a"]), "(top level)", "unique"),
        (base(positive_class="c"), "(top level)", "not in ['a', 'b']"),
        (base(model={"backbone": "vgg99"}), "model.backbone", "unknown backbone 'vgg99'"),
        (base(image={"size": [8, 8]}), "image.size.0", "greater than or equal to 32"),
        (base(image={"channels": 2}), "image.channels", "1 or 3"),
        (base(training={"epoch": 3}), "training.epoch", "unknown field"),
        (base(split={"val": 0.5, "test": 0.5}), "split", "nothing to train on"),
        (
            {"task": "binary", "classes": ["a", "b"], "data": {"format": "npz", "path": str(NPZ)}},
            "name",
            "required field is missing",
        ),
    ],
)
def test_bad_fields_name_the_file_the_field_and_the_problem(tmp_path, raw, field, problem):
    path = write(tmp_path, raw)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert str(path) in message
    assert f"  {field}: " in message
    assert problem in message


def test_missing_data_path_says_where_it_looked(tmp_path):
    path = write(tmp_path, base(data={"format": "npz", "path": "nowhere/x.npz"}))
    with pytest.raises(SpecError, match=r"data\.path: nowhere/x\.npz not found") as info:
        load_spec(path)
    assert str(tmp_path / "nowhere" / "x.npz") in str(info.value)


def test_folders_format_needs_a_folder(tmp_path):
    path = write(tmp_path, base(data={"format": "folders", "path": str(NPZ)}))
    with pytest.raises(SpecError, match="must be a folder"):
        load_spec(path)


def test_weights_file_must_exist(tmp_path):
    path = write(tmp_path, base(model={"weights": "weights/none_here.h5"}))
    with pytest.raises(SpecError, match=r"model\.weights: 'weights/none_here\.h5' is neither"):
        load_spec(path)


def test_yaml_syntax_error_gives_line(tmp_path):
    path = write(tmp_path, "name: x\ntask: [binary\n")
    with pytest.raises(SpecError, match=r"not valid YAML \(line 3"):
        load_spec(path)


def test_yaml_cannot_run_code(tmp_path):
    path = write(tmp_path, "!!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_overrides_are_validated():
    spec = spec_from_dict(base())
    assert spec.with_overrides(training={"epochs": 3, "seed": None}).training.epochs == 3
    with pytest.raises(SpecError, match=r"training\.epochs"):
        spec.with_overrides(training={"epochs": 0})


def test_dump_round_trips(tmp_path):
    spec = load_spec(REPO / "data_specs" / "retinamnist.yaml")
    again = load_spec(write(tmp_path, dump_spec(spec)))
    assert again.model_dump(exclude={"source_file"}) == spec.model_dump(exclude={"source_file"})


def test_ct_window_presets_and_stacking_in_a_spec():
    spec = spec_from_dict(
        base(image={"window": ["lung", {"center": 50, "width": 350}, "bone"], "channels": 3})
    )
    assert spec.image.window_policy == ["lung", {"center": 50.0, "width": 350.0}, "bone"]
    assert spec_from_dict(base(image={"window": "brain"})).image.window_policy == "brain"
    with pytest.raises(SpecError, match=r"image\.window.*unknown window 'lungs'"):
        spec_from_dict(base(image={"window": "lungs"}))
    with pytest.raises(SpecError, match="need channels: 3"):
        spec_from_dict(base(image={"window": ["lung", "mediastinum", "bone"], "channels": 1}))
    with pytest.raises(SpecError, match="fill 3 channels"):
        spec_from_dict(base(image={"window": ["lung", "bone"], "channels": 3}))


@pytest.mark.parametrize(
    "changes, field, hint",
    [
        ({"training": {"batchsize": 8}}, "training.batchsize", "did you mean 'batch_size'?"),
        ({"training": {"fine_tune": {"head_epoch": 2}}}, "head_epochs", "'head_epochs'?"),
        ({"modalty": "xray"}, "modalty: unknown field", "did you mean 'modality'?"),
        ({"tabular": [{"name": "age", "type": "numeric", "colum": "x"}]}, "colum", "'column'?"),
        (
            {"augmentation": {"options": {"flip": {"probabilty": 0.5}}}},
            "augmentation.options.flip.probabilty",
            "did you mean 'probability'?",
        ),
    ],
)
def test_a_misspelt_field_gets_the_closest_name(tmp_path, changes, field, hint):
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, base(**changes)))
    line = next(line for line in str(caught.value).splitlines() if field in line)
    assert "unknown field" in line and hint in line


def test_a_field_with_no_close_name_keeps_the_spelling_hint(tmp_path):
    with pytest.raises(SpecError, match=r"zzzz: unknown field \(check the spelling\)"):
        load_spec(write(tmp_path, base(zzzz=1)))


@pytest.mark.parametrize(
    "changes, hint",
    [
        ({"modality": "xrya"}, "did you mean 'xray'?"),
        ({"task": "binery"}, "did you mean 'binary'?"),
        ({"model": {"backbone": "resnet5"}}, "did you mean 'resnet50'?"),
        ({"image": {"window": "lunk"}}, "did you mean 'lung'?"),
        ({"augmentation": {"options": {"rotaton": {}}}}, "rotaton: did you mean 'rotation'?"),
        ({"training": {"class_weight": "balance"}}, "did you mean 'balanced'?"),
    ],
)
def test_a_misspelt_value_gets_the_closest_choice(tmp_path, changes, hint):
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, base(**changes)))
    assert hint in str(caught.value)


def test_a_value_far_from_every_choice_gets_no_guess(tmp_path):
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, base(modality="qqqqqq")))
    assert "did you mean" not in str(caught.value) and "modality" in str(caught.value)
