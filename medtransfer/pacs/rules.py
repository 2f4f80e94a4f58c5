"""Series selection rules: which instances of a PACS study are scored, as data (a YAML file).

A study holds more than the images a model was made for: localizers, secondary captures, reports,
other modalities. MONAI Deploy's series selector picks series by rules on their DICOM attributes;
this is the same idea, kept small: ``selections``, each a name and ``conditions`` (keyword ->
``any_of`` / ``none_of`` / ``matches``), judged on each instance's WADO-RS metadata (DICOM JSON).
An instance is selected when every condition of some selection holds; otherwise the verdict says
which condition failed, so a rejected series is reported with its reason, never dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydicom.datadict import tag_for_keyword

from medtransfer.errors import MedtransferError

__all__ = ["DEFAULT_RULES", "Condition", "RulesError", "Selection", "load_rules", "verdict"]

DEFAULT_RULES = Path(__file__).with_name("series_rules.yaml")
_KINDS = ("any_of", "none_of", "matches")


class RulesError(MedtransferError, ValueError):
    """A series rules file that cannot be used; the CLI reports it in one line (exit 2)."""


@dataclass(frozen=True)
class Condition:
    """One attribute's test: ``kind`` is any_of, none_of or matches; ``values`` upper-cased
    (any_of, none_of) or one compiled pattern's source (matches)."""

    keyword: str
    kind: str
    values: tuple[str, ...]

    def failure(self, metadata: Mapping[str, Any]) -> str:
        """Why ``metadata`` (one instance's DICOM JSON) fails this condition; "" when it holds."""
        found = [str(v).upper() for v in values_of(metadata, self.keyword)]
        if self.kind == "none_of":
            hit = sorted(set(found) & set(self.values))
            return f"{self.keyword} is {'/'.join(hit)}" if hit else ""
        if not found:
            return f"no {self.keyword}"
        if self.kind == "any_of":
            ok = any(v in self.values for v in found)
        else:
            ok = any(re.fullmatch(self.values[0], v, re.IGNORECASE) for v in found)
        return "" if ok else f"{self.keyword} is {'/'.join(found)}"


@dataclass(frozen=True)
class Selection:
    name: str
    conditions: tuple[Condition, ...]


def load_rules(path: str | Path = DEFAULT_RULES) -> tuple[Selection, ...]:
    """The selections of a rules file, checked: a keyword pydicom does not know, an unknown
    condition kind or a bad pattern is refused here, before anything is fetched."""
    try:
        record = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RulesError(f"cannot read series rules {path}: {exc}") from None
    selections = record.get("selections") if isinstance(record, dict) else None
    if not selections or not isinstance(selections, list):
        raise RulesError(f"{path}: needs a non-empty list 'selections'")
    return tuple(_selection(path, item) for item in selections)


def _selection(path: str | Path, item: Any) -> Selection:
    if not isinstance(item, dict) or not isinstance(item.get("conditions"), dict):
        raise RulesError(f"{path}: each selection needs 'name' and a mapping 'conditions'")
    name = str(item.get("name", "selection"))
    return Selection(name, tuple(_condition(path, k, v) for k, v in item["conditions"].items()))


def _condition(path: str | Path, keyword: str, test: Any) -> Condition:
    where = f"{path}: condition {keyword}"
    if tag_for_keyword(keyword) is None:
        raise RulesError(f"{where}: not a DICOM keyword")
    if not isinstance(test, dict) or len(test) != 1 or next(iter(test)) not in _KINDS:
        raise RulesError(f"{where}: give one of {', '.join(_KINDS)}")
    kind, value = next(iter(test.items()))
    if kind == "matches":
        try:
            re.compile(str(value))
        except re.error as exc:
            raise RulesError(f"{where}: bad pattern: {exc}") from None
        return Condition(keyword, kind, (str(value),))
    if not isinstance(value, list) or not value:
        raise RulesError(f"{where}: {kind} needs a non-empty list")
    return Condition(keyword, kind, tuple(str(v).upper() for v in value))


def values_of(metadata: Mapping[str, Any], keyword: str) -> list[Any]:
    """An attribute's values in DICOM JSON (``{"00080060": {"vr": "CS", "Value": [...]}}``)."""
    element = metadata.get(f"{tag_for_keyword(keyword):08X}") or {}
    return list(element.get("Value") or [])


def verdict(metadata: Mapping[str, Any], selections: Sequence[Selection]) -> str:
    """Why no selection takes the instance (each selection's first failed condition), or an
    empty string when one does."""
    reasons = []
    for selection in selections:
        failed = [f for c in selection.conditions if (f := c.failure(metadata))]
        if not failed:
            return ""
        reasons.append(f"{selection.name}: {failed[0]}")
    return "; ".join(reasons)
