"""Augmentation options and presets as plain data (no TensorFlow: specs validate against it).

The layers behind each option live in ``medtransfer.data.augment_options``; this module says what
options exist, what their magnitudes mean and which presets set which
(``medtransfer.data.augment_settings`` resolves a spec against them). Options are listed in
the order they are applied: geometry, intensity, erasing, policies, then the label-mixing
MixUp and CutMix.
"""

from __future__ import annotations

from dataclasses import dataclass


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
# Self-supervised pretraining (``medtransfer pretrain``) compares two views of one image: the
# views must differ enough that agreeing on them means knowing what is in the image, not where
# its pixels are. Stronger and more frequent than the training presets: crop-like zoom and
# shift, intensity changes, blur and erasing (SimSiam's crops, colour jitter and blur, for
# grey images). No flips (radiographs keep their laterality), and no label mixing (no labels).
# Not a spec preset: the pretrain verb applies it on top of nothing else.
SSL_PRESET = "ssl"
PRETRAINING_PRESETS: dict[str, dict[str, Setting]] = {
    SSL_PRESET: {
        "rotation": Setting(0.8, 15.0),
        "zoom": Setting(0.8, 0.3),
        "translation": Setting(0.8, 0.15),
        "contrast": Setting(0.8, 0.4),
        "brightness": Setting(0.8, 0.2),
        "gamma": Setting(0.5, 0.4),
        "blur": Setting(0.5, 1.0),
        "noise": Setting(0.3, 0.03),
        "erasing": Setting(0.3, 0.2),
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
