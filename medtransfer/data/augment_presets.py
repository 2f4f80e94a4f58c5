"""Augmentation options and presets as plain data (no TensorFlow: specs validate against it).

The layers behind each option live in ``medtransfer.data.augment``; this module says what
options exist, what their magnitudes mean, which presets set which, and what a spec resolves
to. Options are listed in the order they are applied: geometry, intensity, erasing, policies,
then the label-mixing MixUp and CutMix.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from medtransfer.errors import SpecError

if TYPE_CHECKING:
    from medtransfer.spec import Spec

RADIOGRAPHS = ("xray", "mammography")


@dataclass(frozen=True)
class Option:
    """One augmentation option: its default magnitude and what the magnitude measures."""

    name: str
    magnitude: float
    meaning: str
    rgb_only: bool = False
    square_only: bool = False
    flips: bool = False


_OPTION_LIST = [
    # geometry
    Option("rotation", 10.0, "maximum angle in degrees"),
    Option("zoom", 0.1, "maximum zoom in or out, as a fraction of the size"),
    Option("translation", 0.05, "maximum shift, as a fraction of height and width"),
    Option("shear", 10.0, "maximum shear angle in degrees"),
    Option("perspective", 0.1, "maximum corner displacement, as a fraction of the size"),
    Option("elastic", 0.5, "displacement strength (Keras RandomElasticTransform scale)"),
    Option("flip_horizontal", 1.0, "unused: the probability is the chance of a flip", flips=True),
    Option("flip_vertical", 1.0, "unused: the probability is the chance of a flip", flips=True),
    Option("rot90", 1.0, "unused: turns of 90, 180 or 270 degrees", square_only=True, flips=True),
    # intensity
    Option("contrast", 0.2, "maximum relative contrast change"),
    Option("brightness", 0.1, "maximum shift, as a fraction of the value range"),
    Option("gamma", 0.25, "maximum |log gamma|"),
    Option("saturation", 0.2, "Keras RandomSaturation factor", rgb_only=True),
    Option("hue", 0.05, "Keras RandomHue factor", rgb_only=True),
    Option("noise", 0.02, "maximum noise standard deviation (image range 0-1)"),
    Option("blur", 1.0, "maximum Gaussian sigma in pixels (3x3 kernel)"),
    Option("sharpness", 0.5, "Keras RandomSharpness factor"),
    Option("clahe", 2.0, "CLAHE clip limit"),
    # erasing
    Option("erasing", 0.2, "maximum erased area, as a fraction of the image"),
    # policies (grey images are run through them as repeated RGB and averaged back)
    Option("randaugment", 0.3, "RandAugment magnitude (0-1), two operations per image"),
    Option("augmix", 0.3, "AugMix severity (0-1)"),
    # label mixing
    Option("mixup", 0.2, "alpha of the Beta(alpha, alpha) mixing weight"),
    Option("cutmix", 1.0, "alpha of the Beta(alpha, alpha) pasted area"),
]
OPTIONS: dict[str, Option] = {option.name: option for option in _OPTION_LIST}


@dataclass(frozen=True)
class Setting:
    """An option as a preset or a spec sets it: the chance per image, and how strong."""

    probability: float
    magnitude: float


PRESETS: dict[str, dict[str, Setting]] = {
    "none": {},
    "light": {
        "rotation": Setting(0.5, 5.0),
        "zoom": Setting(0.5, 0.05),
        "translation": Setting(0.5, 0.05),
        "contrast": Setting(0.5, 0.1),
        "brightness": Setting(0.5, 0.05),
    },
    # no flips: a mirrored chest film puts the heart on the wrong side
    "xray": {
        "rotation": Setting(0.5, 7.0),
        "zoom": Setting(0.5, 0.1),
        "translation": Setting(0.5, 0.06),
        "contrast": Setting(0.5, 0.2),
        "gamma": Setting(0.5, 0.25),
        "noise": Setting(0.3, 0.02),
    },
    # intensities are already windowed: change them little
    "ct": {
        "rotation": Setting(0.5, 5.0),
        "zoom": Setting(0.5, 0.05),
        "translation": Setting(0.5, 0.05),
        "contrast": Setting(0.3, 0.1),
        "brightness": Setting(0.3, 0.05),
        "noise": Setting(0.3, 0.01),
    },
    # dermoscopy, fundus: no canonical orientation; colour varies with camera and light
    "color": {
        "flip_horizontal": Setting(0.5, 1.0),
        "flip_vertical": Setting(0.5, 1.0),
        "rotation": Setting(0.5, 30.0),
        "zoom": Setting(0.5, 0.1),
        "contrast": Setting(0.5, 0.2),
        "brightness": Setting(0.5, 0.1),
        "saturation": Setting(0.5, 0.2),
        "hue": Setting(0.3, 0.03),
    },
    # tiles have no up; stain strength and hue vary between labs; focus varies across a slide
    "histopathology": {
        "flip_horizontal": Setting(0.5, 1.0),
        "flip_vertical": Setting(0.5, 1.0),
        "rot90": Setting(0.75, 1.0),
        "saturation": Setting(0.5, 0.25),
        "hue": Setting(0.5, 0.04),
        "brightness": Setting(0.5, 0.1),
        "contrast": Setting(0.5, 0.2),
        "blur": Setting(0.2, 1.0),
    },
}
MODALITY_PRESETS = {
    "xray": "xray",
    "mammography": "light",
    "ct": "ct",
    "mr": "light",
    "ultrasound": "light",
    "dermoscopy": "color",
    "fundus": "color",
    "histopathology": "histopathology",
    "other": "light",
}


def resolve_settings(spec: Spec) -> dict[str, Setting]:
    """The preset (the spec's, or its modality's default) with the spec's overrides applied,
    in application order, without options whose probability is 0.

    An override may give only a probability or only a magnitude; the other comes from the
    preset, else from the option (magnitude default, probability 0.5).
    """
    section = spec.augmentation
    settings = dict(PRESETS[section.preset or MODALITY_PRESETS[spec.modality]])
    for name, override in section.options.items():
        given = {k: v for k, v in override.model_dump().items() if v is not None}
        settings[name] = replace(settings.get(name, Setting(0.5, OPTIONS[name].magnitude)), **given)
    return {n: settings[n] for n in OPTIONS if n in settings and settings[n].probability > 0}


def check_settings(settings: Mapping[str, Setting], spec: Spec) -> None:
    """Refuse options that cannot work on the spec's images; warn about flipped radiographs."""
    for name in settings:
        option = OPTIONS[name]
        if option.rgb_only and spec.image.channels != 3:
            raise SpecError(f"{spec.origin}: augmentation option {name!r} needs image.channels: 3")
        if option.square_only and spec.image.size[0] != spec.image.size[1]:
            raise SpecError(f"{spec.origin}: augmentation option {name!r} needs square images")
    mixing = [name for name in ("mixup", "cutmix") if name in settings]
    if mixing and spec.tabular:
        raise SpecError(
            f"{spec.origin}: augmentation option(s) {mixing} blend two images but a model with "
            "tabular inputs would keep only one image's features; set their probability to 0"
        )
    flips = [name for name in settings if OPTIONS[name].flips]
    if flips and spec.modality in RADIOGRAPHS:
        warnings.warn(
            f"{spec.origin}: augmentation flips {spec.modality} images ({', '.join(flips)}); "
            "laterality is part of a radiograph's meaning (a mirrored chest film shows "
            "dextrocardia): set their probability to 0 unless that is intended",
            stacklevel=2,
        )
