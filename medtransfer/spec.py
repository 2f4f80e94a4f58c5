"""Data spec v1: one YAML file says where the images are, what the labels mean, and how to train.

Specs are validated in full before any data is read or any model is built, and every problem is
reported with the spec file, the dotted field name and what is wrong, so a typo costs seconds,
not a failed overnight run. Relative paths are relative to the spec file, never to the current
directory, so a spec means the same thing wherever the CLI is started.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medtransfer.errors import SpecError
from medtransfer.models.adaptation_methods import ADAPTATION_METHODS
from medtransfer.rundir import RUN_WEIGHTS, is_run

Task = Literal["binary", "multiclass", "multilabel"]
Modality = Literal[
    "xray",
    "mammography",
    "ct",
    "mr",
    "ultrasound",
    "dermoscopy",
    "fundus",
    "histopathology",
    "other",
]
# Projection radiographs: laterality is part of what they show, so they are never mirrored
# (no flip augmentation by default, no mirrored test-time view).
RADIOGRAPHS = ("xray", "mammography")
Preset = Literal["none", "light", "xray", "ct", "color", "histopathology"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExplicitWindow(_Strict):
    center: float
    width: Annotated[float, Field(gt=0)]


class DataSource(_Strict):
    """Where the images and labels are.

    ``npz``: a MedMNIST-style archive with ``train_images``/``train_labels`` (and val/test); the
    file's own splits are used. ``manifest``: a CSV with one row per image. ``folders``: a tree
    ``ROOT/<class>/...`` or ``ROOT/<split>/<class>/...``. ``dicom_folder``: a folder as exported
    from a PACS (crawled recursively, DICOM recognised by content) plus a ``labels`` CSV whose
    ``key_column`` holds each file's SOPInstanceUID (``key: sop_instance_uid``) or its path
    relative to the folder (``key: path``); patients default to the files' PatientID (hashed),
    and ``site_tag`` names a DICOM tag whose value is the site (hashed unless it is a safe,
    non-identifying tag such as Manufacturer).
    """

    format: Literal["npz", "manifest", "folders", "dicom_folder"]
    path: Path
    labels: Path | None = None
    key: Literal["path", "sop_instance_uid"] = "path"
    key_column: str | None = None
    site_tag: str | None = None
    image_column: str = "path"
    label_columns: list[str] = Field(default_factory=lambda: ["label"], min_length=1)
    label_separator: str = "|"
    patient_column: str | None = None
    site_column: str | None = None
    split_column: str | None = None

    @model_validator(mode="after")
    def _dicom_folder_needs_labels(self) -> DataSource:
        if self.format == "dicom_folder" and self.labels is None:
            raise ValueError("format dicom_folder needs labels: a CSV of labels per file")
        if self.format != "dicom_folder" and (self.labels or self.site_tag or self.key_column):
            raise ValueError("labels, key_column and site_tag only apply to format dicom_folder")
        return self

    @property
    def label_key_column(self) -> str:
        return self.key_column or self.key


class SplitSpec(_Strict):
    """Patient-level random split, used when the data carries no split of its own."""

    val: Annotated[float, Field(ge=0, lt=1)] = 0.15
    test: Annotated[float, Field(ge=0, lt=1)] = 0.15
    seed: int = 0

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitSpec:
        if self.val + self.test >= 1:
            raise ValueError(f"val + test = {self.val + self.test:g} leaves nothing to train on")
        return self


class ImageSpec(_Strict):
    size: tuple[Annotated[int, Field(ge=32, le=1024)], Annotated[int, Field(ge=32, le=1024)]] = (
        224,
        224,
    )
    channels: Literal[1, 3] = 1
    window: str | ExplicitWindow | list[str | ExplicitWindow] = "dicom"
    frames: Literal["first", "middle"] = "first"

    @field_validator("window")
    @classmethod
    def _known_windows(cls, value):
        from medtransfer.io.dicom import CT_WINDOWS

        names = ("dicom", "minmax", "percentile", *CT_WINDOWS)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, str) and item not in names:
                raise ValueError(
                    f"unknown window {item!r}{_did_you_mean(item, names)}; "
                    f"choose one of {', '.join(names)}"
                )
        if isinstance(value, list) and len(value) != 3:
            raise ValueError(f"stacked windows fill 3 channels; got {len(value)}")
        return value

    @model_validator(mode="after")
    def _stacked_windows_make_three_channels(self) -> ImageSpec:
        if isinstance(self.window, list) and self.channels != 3:
            raise ValueError("three stacked windows need channels: 3")
        return self

    @property
    def window_policy(self) -> str | dict[str, float] | list[str | dict[str, float]]:
        """The window as ``medtransfer.io.load_image`` takes it (plain data, picklable)."""

        def plain(window: str | ExplicitWindow) -> str | dict[str, float]:
            return window if isinstance(window, str) else window.model_dump()

        if isinstance(self.window, list):
            return [plain(w) for w in self.window]
        return plain(self.window)


class ModelSpec(_Strict):
    backbone: str = "resnet50"
    weights: str = "imagenet"
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from medtransfer.models.backbones import BACKBONES

        name = value.lower()
        if name not in BACKBONES:
            raise ValueError(
                f"unknown backbone {value!r}{_did_you_mean(name, BACKBONES)}; "
                f"choose one of {', '.join(BACKBONES)}"
            )
        return name


class FineTuneSpec(_Strict):
    """The two-phase schedule used with pretrained weights (ignored for ``weights: none``).

    Phase 1 trains the head for ``head_epochs`` with the backbone frozen; phase 2 unfreezes the
    top ``unfreeze`` blocks (a count >= 1, or a fraction of the blocks < 1) at the learning rate
    times ``learning_rate_factor``. ``batchnorm: frozen`` keeps BatchNormalization in inference
    mode throughout (ImageNet statistics are worth keeping); ``train`` lets the unfrozen blocks'
    BatchNormalization learn the target's statistics. ``auto`` (default) trains it when the
    weights come from another medtransfer run (a small medical source whose statistics rarely
    fit the target: on PneumoniaMNIST -> BreastMNIST test AUROC 0.838 frozen vs 0.894 trained,
    benchmarks/RESULTS.md) and freezes it otherwise.

    ``method`` says what trains in phase 2 (``medtransfer.models.peft``): ``full`` (default)
    the top ``unfreeze`` blocks whole; ``lora`` low-rank updates of rank ``lora_rank`` to every
    Conv2D and Dense kernel of the backbone (kernels frozen; BatchNormalization as
    ``batchnorm`` says); ``norm`` only normalisation scales and offsets and the biases.
    ``lora`` and ``norm`` adapt the whole backbone, so ``unfreeze`` does not apply to them.
    """

    head_epochs: Annotated[int, Field(ge=0)] = 3
    unfreeze: Annotated[float, Field(gt=0)] = 0.25
    learning_rate_factor: Annotated[float, Field(gt=0, le=1)] = 0.1
    batchnorm: Literal["auto", "frozen", "train"] = "auto"
    method: Literal["full", "lora", "norm"] = "full"
    lora_rank: Annotated[int, Field(ge=1, le=256)] | None = None  # None: 4 for method lora

    @model_validator(mode="after")
    def _rank_needs_lora(self) -> FineTuneSpec:
        if self.lora_rank is not None and self.method != "lora":
            raise ValueError(f"lora_rank applies to method: lora only (method is {self.method})")
        return self

    @property
    def rank(self) -> int:
        """The LoRA rank in use (``lora_rank``, default 4)."""
        return self.lora_rank or 4

    def trains_batchnorm(self, weights: str) -> bool:
        """Whether phase 2 lets BatchNormalization train, for these ``model.weights``."""
        if self.batchnorm == "auto":
            return weights.startswith("run:")
        return self.batchnorm == "train"


class AdversarialSpec(_Strict):
    """Adversarial training (``medtransfer.training.adversarial``): every batch is attacked
    (L∞, ``epsilon`` in pixel units of the [0, 1] image, e.g. ``2/255``) with the weights
    frozen, and the loss is ``(1 - weight) * clean + weight * adversarial``.

    ``pgd`` takes ``steps`` (default 3) signed steps of ``step_size`` (default ``2.5 *
    epsilon / steps``) from a random point of the ε-ball (``random_start``, default true);
    ``fgsm`` is one step of size ``epsilon`` from the image, so those three are not its
    settings (left out, they stay null in the stored spec).
    """

    method: Literal["pgd", "fgsm"] = "pgd"
    epsilon: Annotated[float, Field(gt=0, le=0.25)] = 2 / 255
    steps: Annotated[int, Field(ge=1, le=100)] | None = None
    step_size: Annotated[float, Field(gt=0, le=0.25)] | None = None
    random_start: bool | None = None
    weight: Annotated[float, Field(gt=0, le=1)] = 0.5

    @field_validator("epsilon", "step_size", mode="before")
    @classmethod
    def _fraction_of_255(cls, value: Any) -> Any:
        # "2/255" reads as grey levels of an 8-bit image, the way such budgets are quoted
        if isinstance(value, str) and re.fullmatch(r"\s*[\d.]+\s*/\s*[\d.]+\s*", value):
            top, bottom = (float(part) for part in value.split("/"))
            if bottom == 0:
                raise ValueError(f"{value!r} divides by zero")
            return top / bottom
        return value

    @model_validator(mode="after")
    def _fgsm_is_one_step(self) -> AdversarialSpec:
        fields = ("steps", "step_size", "random_start")
        given = [name for name in fields if getattr(self, name) is not None]
        if self.method == "fgsm" and given:
            raise ValueError(
                f"method fgsm is one step of size epsilon from the image; {', '.join(given)} "
                "only apply to method pgd"
            )
        return self


class TrainingSpec(_Strict):
    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 32
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    seed: int = 0
    early_stopping_patience: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    class_weight: Literal["none", "balanced"] = "none"
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    focal_gamma: Annotated[float, Field(ge=0)] = 2.0
    fine_tune: FineTuneSpec = FineTuneSpec()
    adversarial: AdversarialSpec | None = None  # None: plain training

    @model_validator(mode="after")
    def _warmup_leaves_epochs(self) -> TrainingSpec:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs")
        return self


class PretrainingSpec(_Strict):
    """Self-supervised pretraining (``medtransfer pretrain``): ``simsiam`` (no negatives, the
    default) or ``simclr`` (NT-Xent at ``temperature``: every other image of the batch is a
    negative, an explicit guard against the representation collapsing)."""

    objective: Literal["simsiam", "simclr"] = "simsiam"
    temperature: Annotated[float, Field(gt=0, le=1)] = 0.2


class AugmentOption(_Strict):
    """One option's override; a field left out keeps the preset's (or the option's) value."""

    probability: Annotated[float, Field(ge=0, le=1)] | None = None
    magnitude: Annotated[float, Field(ge=0)] | None = None


class AugmentationSpec(_Strict):
    """Training-time augmentation (``medtransfer.data.augment``).

    ``preset`` defaults to the modality's (xray -> xray, ct -> ct, dermoscopy and fundus ->
    color, histopathology -> histopathology, others -> light); ``options`` override or add any
    option; ``albumentations`` names a pipeline saved with ``albumentations.save``, run after
    the graph options (optional extra ``medtransfer[albumentations]``).
    """

    preset: Preset | None = None
    options: dict[str, AugmentOption] = Field(default_factory=dict)
    albumentations: Path | None = None

    @field_validator("options")
    @classmethod
    def _known_options(cls, value: dict[str, AugmentOption]) -> dict[str, AugmentOption]:
        from medtransfer.data.augment_presets import OPTIONS

        unknown = sorted(set(value) - set(OPTIONS))
        if unknown:
            hints = "".join(_did_you_mean(name, OPTIONS, name) for name in unknown)
            raise ValueError(f"unknown options {unknown}{hints}; choose from {', '.join(OPTIONS)}")
        return value


# The method registry's names (models/adaptation_methods.py): registering a method allows it.
AdaptationMethod = Literal[tuple(ADAPTATION_METHODS)]


class DomainAdaptationSpec(_Strict):
    """Train at one hospital, work at another (``medtransfer.training.domain``).

    Sites are the manifest's ``site`` values (``data.site_column``, or ``data.site_tag`` for a
    DICOM folder). ``source`` sites give the labelled training images (default for ``method:
    none``: every site not in ``target``); ``target`` sites give unlabelled training images to
    adapt to (their labels are never used for training; they are evaluated like any other
    site). ``dann``, ``coral`` and ``mmd`` align the pooled backbone features of source and
    target batches during training (loss = task + ``weight`` * alignment); ``adabn`` trains
    on source alone, then re-estimates BatchNormalization statistics on the target images.
    ``validation`` picks the images that choose the best epoch: ``source`` (default: needs no
    target labels), ``target`` or ``all`` (both use target labels to choose the epoch).
    """

    method: AdaptationMethod = "none"
    source: list[str] = Field(default_factory=list)
    target: list[str] = Field(default_factory=list)
    weight: Annotated[float, Field(ge=0)] = 1.0
    validation: Literal["source", "target", "all"] = "source"

    @field_validator("source", "target", mode="before")
    @classmethod
    def _site_names(cls, value: Any) -> Any:
        # YAML reads a site called 2 as a number; sites are compared as the manifest's text.
        if isinstance(value, list):
            return [
                str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                for v in value
            ]
        return value

    @model_validator(mode="after")
    def _sites_make_sense(self) -> DomainAdaptationSpec:
        for role in ("source", "target"):
            names = getattr(self, role)
            if len(set(names)) != len(names):
                raise ValueError(f"{role} lists a site twice: {names}")
        if self.method != "none" and (not self.source or not self.target):
            raise ValueError(
                f"method {self.method} needs both source and target sites (non-empty lists)"
            )
        both = sorted(set(self.source) & set(self.target))
        if both:
            raise ValueError(
                f"site(s) {both} are both source and target; the lists must not overlap"
            )
        if self.validation == "target" and not self.target:
            raise ValueError("validation: target needs target sites")
        return self

    @property
    def active(self) -> bool:
        """Whether training differs from a plain run (sites restricted or adaptation on)."""
        return self.method != "none" or bool(self.source or self.target)


# Identifiers and dates that must never become model inputs (they would ride into exports).
_PHI_TAGS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "AccessionNumber",
        "ReferringPhysicianName",
        "InstitutionAddress",
    }
)
DEFAULT_TAGS = {"age": "PatientAge", "sex": "PatientSex", "view": "ViewPosition"}


class TabularFeature(_Strict):
    """One non-image input (``medtransfer.data.tabular``), fused with the image features.

    Values come from ``column`` of the labels CSV (default: the feature's name) or, when the CSV
    has no such column, from DICOM ``tag`` (default for age, sex and view: PatientAge,
    PatientSex, ViewPosition); scoring a DICOM folder reads the tag. Categorical ``values``
    are the known categories; anything else, and a missing value, is the model's "other or
    missing" category.
    """

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
    type: Literal["numeric", "categorical"]
    values: list[str] | None = None
    column: str | None = None
    tag: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TabularFeature:
        if self.name == "image":
            raise ValueError("'image' is the image input's name; call the feature otherwise")
        if self.type == "categorical":
            if not self.values or len(set(self.values)) != len(self.values):
                raise ValueError(f"categorical feature {self.name!r} needs unique values: [...]")
            if "" in self.values:
                raise ValueError("the empty value means missing; it cannot be a category")
        elif self.values is not None:
            raise ValueError(f"numeric feature {self.name!r} takes no values")
        if self.tag is not None:
            from pydicom.datadict import tag_for_keyword

            if tag_for_keyword(self.tag) is None:
                raise ValueError(f"{self.tag!r} is not a DICOM keyword (e.g. PatientAge)")
            if self.tag in _PHI_TAGS:
                raise ValueError(f"{self.tag} identifies a patient; it cannot be a model input")
        return self

    @property
    def source_column(self) -> str:
        return self.column or self.name

    @property
    def source_tag(self) -> str | None:
        return self.tag or DEFAULT_TAGS.get(self.name)


class Spec(_Strict):
    """A validated data spec. ``source_file`` is where it was read from (for messages)."""

    name: str
    task: Task
    classes: list[str] = Field(min_length=1)
    positive_class: str | None = None
    modality: Modality = "other"
    data: DataSource
    split: SplitSpec = SplitSpec()
    image: ImageSpec = ImageSpec()
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    pretraining: PretrainingSpec = PretrainingSpec()
    augmentation: AugmentationSpec = AugmentationSpec()
    tabular: list[TabularFeature] = Field(default_factory=list)
    domain_adaptation: DomainAdaptationSpec = DomainAdaptationSpec()
    source_file: Path | None = None

    @model_validator(mode="after")
    def _classes_fit_task(self) -> Spec:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be unique, got {self.classes}")
        if self.task == "binary" and len(self.classes) != 2:
            raise ValueError(f"a binary task needs exactly 2 classes, got {len(self.classes)}")
        if self.task == "multiclass" and len(self.classes) < 3:
            raise ValueError("a multiclass task needs at least 3 classes (use task: binary for 2)")
        if self.task == "multilabel" and self.training.class_weight != "none":
            raise ValueError("class_weight applies to binary and multiclass tasks only")
        if self.positive_class is not None:
            if self.task != "binary":
                raise ValueError("positive_class only applies to task: binary")
            if self.positive_class not in self.classes:
                raise ValueError(f"positive_class {self.positive_class!r} is not in {self.classes}")
        if self.tabular:
            names = [feature.name for feature in self.tabular]
            if len(set(names)) != len(names):
                raise ValueError(f"tabular feature names must be unique, got {names}")
            if self.data.format not in ("manifest", "dicom_folder"):
                raise ValueError(
                    "tabular features need a table per image: data.format manifest or dicom_folder"
                )
        adaptation = self.domain_adaptation
        if adaptation.active and not (self.data.site_column or self.data.site_tag):
            raise ValueError(
                "domain_adaptation names sites, but the data has none: set data.site_column "
                "(manifest) or data.site_tag (dicom_folder)"
            )
        if adaptation.method != "none" and self.tabular:
            raise ValueError(
                f"domain_adaptation method {adaptation.method} does not support tabular "
                "features yet (the alignment and AdaBN work on image features only); remove "
                "tabular or use method: none"
            )
        return self

    @model_validator(mode="after")
    def _adversarial_fits(self) -> Spec:
        """Adversarial training attacks the image of a plain classifier's batch: a tabular
        model's other inputs, or a domain-adaptation model's paired batches, are not that."""
        if self.training.adversarial is None:
            return self
        if self.tabular:
            raise ValueError(
                "training.adversarial attacks images only; a model with tabular features is "
                "not supported: remove tabular or training.adversarial"
            )
        method = self.domain_adaptation.method
        if ADAPTATION_METHODS[method].aligns_features:
            raise ValueError(
                f"training.adversarial cannot be combined with domain_adaptation method "
                f"{method} (it trains its own model on paired batches); use none or adabn"
            )
        return self

    @model_validator(mode="after")
    def _adapters_need_pretrained_weights(self) -> Spec:
        method = self.training.fine_tune.method
        if method != "full" and self.model.weights.lower() == "none":
            raise ValueError(
                f"training.fine_tune.method {method} adapts a pretrained backbone, but "
                "model.weights is none (random weights, trained whole in one phase): use "
                "method full, or weights imagenet, a weights file or run:RUN"
            )
        return self

    @property
    def origin(self) -> str:
        """Where the spec came from, for messages."""
        return str(self.source_file) if self.source_file else "<spec>"

    @property
    def positive(self) -> str:
        """The class whose probability a binary model's scores are read as."""
        return self.positive_class or self.classes[-1]

    def with_overrides(self, **sections: dict[str, Any]) -> Spec:
        """A copy with fields replaced, re-validated (CLI flags override the YAML this way)."""
        raw = self.model_dump(mode="python")
        for section, values in sections.items():
            raw[section] = {**raw[section], **{k: v for k, v in values.items() if v is not None}}
        return _validate(raw, self.source_file)


def _format_errors(error: ValidationError, source: Path | None) -> str:
    where = str(source) if source else "<spec>"
    lines = [f"{where}: invalid data spec"]
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            names = _field_names(item["loc"][:-1])
            hint = _did_you_mean(str(item["loc"][-1]), names)
            message = f"unknown field{hint or ' (check the spelling)'}"
        elif item["type"] == "literal_error" and isinstance(item["input"], str):
            allowed = re.findall(r"'([^']*)'", item["ctx"]["expected"])
            message += _did_you_mean(item["input"], allowed)
        elif item["type"] == "missing":
            message = "required field is missing"
        lines.append(f"  {field}: {message}")
    return "\n".join(lines)


def _did_you_mean(word: str, choices, label: str = "") -> str:
    """``" (did you mean 'xray'?)"`` for the closest of ``choices``, or "" when none is close;
    ``label`` names the misspelt word (when a message lists several)."""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    if not close:
        return ""
    return f" ({label + ': ' if label else ''}did you mean {close[0]!r}?)"


def _field_names(loc: tuple) -> list[str]:
    """The field names allowed where ``loc`` points: walk the schema from ``Spec`` through
    nested models, stepping over list indices and dict keys (``tabular.0``, ``options.flip``)."""
    model: type[BaseModel] = Spec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is not None:
            model = _inner_model(field.annotation) or model
    return [name for name in model.model_fields if name != "source_file"]


def _inner_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _validate(raw: dict[str, Any], source: Path | None) -> Spec:
    try:
        spec = Spec.model_validate({**raw, "source_file": source})
    except ValidationError as error:
        raise SpecError(_format_errors(error, source)) from None
    return _resolve_paths(spec)


def _resolve_paths(spec: Spec) -> Spec:
    """Anchor relative paths at the spec's folder and check that the data exists."""
    base = spec.source_file.parent if spec.source_file else Path.cwd()
    data_path = spec.data.path if spec.data.path.is_absolute() else base / spec.data.path
    data_path = Path(data_path).resolve()
    if not data_path.exists():
        raise SpecError(
            f"{spec.origin}: data.path: {spec.data.path} not found "
            f"(looked for {data_path}; relative paths are relative to the spec file)"
        )
    wants_dir = spec.data.format in ("folders", "dicom_folder")
    if wants_dir != data_path.is_dir():
        kind = "a folder" if wants_dir else "a file"
        raise SpecError(
            f"{spec.origin}: data.path: {data_path} must be {kind} for format {spec.data.format!r}"
        )
    weights = spec.model.weights
    if weights.startswith(RUN_WEIGHTS):
        run_dir = Path(weights.removeprefix(RUN_WEIGHTS))
        run_dir = (run_dir if run_dir.is_absolute() else base / run_dir).resolve()
        if not is_run(run_dir):
            raise SpecError(
                f"{spec.origin}: model.weights: {weights!r} is not a finished medtransfer run"
            )
        weights = f"{RUN_WEIGHTS}{run_dir}"
    elif weights.lower() not in ("imagenet", "none"):
        weights_path = Path(weights) if Path(weights).is_absolute() else base / weights
        if not weights_path.is_file():
            raise SpecError(
                f"{spec.origin}: model.weights: {weights!r} is neither "
                "'imagenet', 'none' nor an existing weights file"
            )
        weights = str(weights_path.resolve())
    albumentations = spec.augmentation.albumentations
    if albumentations is not None:
        albumentations = (
            albumentations if albumentations.is_absolute() else base / albumentations
        ).resolve()
        if not albumentations.is_file():
            raise SpecError(
                f"{spec.origin}: augmentation.albumentations: {spec.augmentation.albumentations}"
                f" not found ({albumentations})"
            )
    labels = spec.data.labels
    if labels is not None:
        labels = (labels if labels.is_absolute() else base / labels).resolve()
        if not labels.is_file():
            raise SpecError(f"{spec.origin}: data.labels: {spec.data.labels} not found ({labels})")
    return spec.model_copy(
        update={
            "data": spec.data.model_copy(update={"path": data_path, "labels": labels}),
            "model": spec.model.model_copy(update={"weights": weights}),
            "augmentation": spec.augmentation.model_copy(update={"albumentations": albumentations}),
        }
    )


def load_spec(path: str | Path) -> Spec:
    """Read and validate a YAML spec (``yaml.safe_load``: a spec cannot run code)."""
    source = Path(path).resolve()
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecError(f"{path}: cannot read spec: {error.strerror or error}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise SpecError(f"{source}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec must be a mapping of fields, got {type(raw).__name__}")
    return _validate(raw, source)


def spec_from_dict(raw: dict[str, Any], base_dir: str | Path | None = None) -> Spec:
    """Validate a spec given as a dict (notebooks); relative paths are relative to ``base_dir``."""
    source = Path(base_dir).resolve() / "<inline spec>" if base_dir else None
    return _validate(dict(raw), source)


def dump_spec(spec: Spec) -> str:
    """The resolved spec as YAML (absolute paths), as stored in a run directory."""
    raw = spec.model_dump(mode="json", exclude={"source_file"})
    return yaml.safe_dump(raw, sort_keys=False)


def reported_classes(classes: list[str], task: Task, positive_class: str | None) -> list[str]:
    """The classes with their own figures: a binary task's positive class, else all."""
    return [positive_class or classes[-1]] if task == "binary" else list(classes)
