"""A spec's augmentation, resolved against the presets: what each option is set to, and
whether the spec's images can take it."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace

from medtransfer.data.augment_presets import MODALITY_PRESETS, OPTIONS, PRESETS, Setting
from medtransfer.errors import SpecError
from medtransfer.spec import RADIOGRAPHS, Spec


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
