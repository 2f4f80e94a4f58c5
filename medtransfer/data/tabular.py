"""Tabular inputs (age, sex, view, ...) read beside each image and fed to the model with it.

Values come from a column of the labels CSV or, failing that, from a DICOM tag of the image
(``age`` -> PatientAge, ``sex`` -> PatientSex, ``view`` -> ViewPosition by default), so a model
that learned from the CSV can still be scored on a bare DICOM folder. Missing values are normal
in hospital data: a numeric value becomes NaN and a categorical one the empty string, and the
model's own encoding layers (``medtransfer.models.layers``) turn both into an explicit
"missing" signal rather than a guess.

Plain numpy only: scoring's decode workers import this module, and they stay light.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from medtransfer.spec import TabularFeature

COLUMN_PREFIX = "t:"
MISSING_CATEGORY = ""
# DICOM Age String: three digits and a unit (D, W, M, Y), e.g. "045Y". Real files also carry
# "22Y" or a bare "81", so the digit count is not enforced.
_AGE_STRING = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([DWMYdwmy]?)\s*$")
_UNIT_IN_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def column_name(feature: str) -> str:
    """The manifest column holding a feature's values."""
    return f"{COLUMN_PREFIX}{feature}"


def parse_number(text: object) -> float:
    """A numeric cell or tag value as a float; NaN when missing; ValueError when not a number.

    DICOM Age Strings are read in years ("045Y" -> 45, "006M" -> 0.5), so a CSV and the image
    headers agree on the unit.
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return math.nan
    value = str(text).strip()
    if not value:
        return math.nan
    match = _AGE_STRING.match(value)
    if match is None:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    number, unit = match.groups()
    return float(number) * _UNIT_IN_YEARS[unit.upper()]


def parse_category(text: object) -> str:
    """A categorical cell or tag value, stripped; missing values become the empty string."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return MISSING_CATEGORY
    return str(text).strip()


def parse_values(raw: Iterable[object], feature: TabularFeature) -> list[float] | list[str]:
    """Raw cells or tag values of one feature -> its values (raises ValueError on a bad number)."""
    if feature.type == "numeric":
        return [parse_number(v) for v in raw]
    return [parse_category(v) for v in raw]


def tolerant_values(raw: Iterable[object], feature: TabularFeature) -> list[float] | list[str]:
    """As ``parse_values``, but a malformed value is missing: for tags of files being scored,
    where one odd header must not cost the file its score."""
    if feature.type != "numeric":
        return [parse_category(v) for v in raw]
    out = []
    for value in raw:
        try:
            out.append(parse_number(value))
        except ValueError:
            out.append(math.nan)
    return out


def model_inputs(
    values_by_name: Mapping[str, Sequence[object]], features: Sequence[TabularFeature]
) -> dict[str, np.ndarray]:
    """Parsed values per feature name -> the model's tabular inputs.

    Numeric features are float32 [N, 1] (NaN = missing); categorical ones are strings [N, 1]
    ("" = missing), as the model's named inputs take them.
    """
    out = {}
    for feature in features:
        values = list(values_by_name[feature.name])
        if feature.type == "numeric":
            out[feature.name] = np.asarray(values, np.float32).reshape(-1, 1)
        else:
            out[feature.name] = np.asarray([parse_category(v) for v in values], object).reshape(
                -1, 1
            )
    return out


def numeric_statistics(
    inputs: Mapping[str, np.ndarray], features: Sequence[TabularFeature]
) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of each numeric feature over its known training values.

    ``inputs`` are the training split's model inputs; the figures are frozen into the model, so
    validation, test and serving are standardised exactly as training was. No known value
    gives (0, 1): the feature then only carries its missing flag.
    """
    stats = {}
    for feature in features:
        if feature.type != "numeric":
            continue
        values = np.asarray(inputs[feature.name], np.float64).ravel()
        known = values[~np.isnan(values)]
        mean = float(known.mean()) if len(known) else 0.0
        std = float(known.std()) if len(known) > 1 else 0.0
        stats[feature.name] = (mean, std if std > 0 else 1.0)
    return stats


def summary(rows: pd.DataFrame, features: Sequence[TabularFeature]) -> dict[str, dict]:
    """Per feature: how many values are missing, and the range or the category counts.

    Stored in ``run.json`` so a reader sees what the model was given without opening data.
    """
    out: dict[str, dict] = {}
    for feature in features:
        column = rows[column_name(feature.name)]
        if feature.type == "numeric":
            values = column.to_numpy(np.float64)
            known = values[~np.isnan(values)]
            out[feature.name] = {
                "missing": int(np.isnan(values).sum()),
                "min": float(known.min()) if len(known) else None,
                "max": float(known.max()) if len(known) else None,
            }
        else:
            counts = column.map(parse_category).value_counts()
            out[feature.name] = {
                "missing": int(counts.get(MISSING_CATEGORY, 0)),
                "counts": {str(k): int(v) for k, v in counts.items() if k != MISSING_CATEGORY},
            }
    return out
