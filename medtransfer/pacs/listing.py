"""What a PACS run scores: QIDO-RS finds the series, WADO-RS series metadata says what each
instance is, and the series rules (``rules.py``) pick the instances.

Every series found is reported (``SeriesRow``), selected or not, with the reason for each
instance left out: a rejected series is listed in the run's series table, never dropped
silently. Instances are ordered by study, series, Instance Number and SOP Instance UID, so a
resumed run lists the same order and skips what an earlier run scored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

import requests
from pydicom.datadict import tag_for_keyword

from medtransfer.pacs.client import PacsError, Server, client_for, http_problem
from medtransfer.pacs.rules import Selection, values_of, verdict

__all__ = ["SERIES_COLUMNS", "Instance", "SeriesRow", "list_instances", "parse_query"]

SERIES_COLUMNS = (
    "study_instance_uid",
    "series_instance_uid",
    "modality",
    "body_part",
    "instances",
    "selected",
    "rejected_because",
)


@dataclass(frozen=True)
class Instance:
    study: str
    series: str
    sop: str

    @property
    def key(self) -> str:
        """The ``path`` cell of its row: readable, stable, unique within the PACS."""
        return f"{self.study}/{self.series}/{self.sop}"


@dataclass(frozen=True)
class SeriesRow:
    study: str
    series: str
    modality: str
    body_part: str
    instances: int
    selected: int
    rejected_because: str  # each reason with how many instances it left out

    def cells(self) -> list[str]:
        return [self.study, self.series, self.modality, self.body_part, str(self.instances),
                str(self.selected), self.rejected_because]  # fmt: skip


def parse_query(query: str | None) -> dict[str, str]:
    """``Modality=DX&StudyDate=20260101-`` as QIDO-RS search filters, keywords checked."""
    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=False, strict_parsing=True)
    except ValueError:
        raise PacsError(f"--query {query!r} is not KEYWORD=VALUE&KEYWORD=VALUE") from None
    for keyword, _ in pairs:
        if tag_for_keyword(keyword) is None:
            raise PacsError(f"--query: {keyword!r} is not a DICOM keyword")
    return dict(pairs)


def list_instances(
    server: Server, selections: Sequence[Selection], study: str | None, query: str | None
) -> tuple[list[Instance], list[SeriesRow]]:
    """The selected instances in scoring order, and one row per series found. Raises
    PacsError when the server cannot be asked or nothing matches: usage, not data."""
    filters = parse_query(query)
    client = client_for(server)
    try:
        found = client.search_for_series(study, search_filters=filters, get_remaining=True)
    except requests.RequestException as exc:
        raise PacsError(f"QIDO-RS on {server.url} failed: {http_problem(exc, server)}") from None
    if not found:
        asked = f"study {study}" if study else f"series matching --query {query!r}"
        raise PacsError(f"{server.url}: no {asked} found (QIDO-RS)")
    keys = sorted({(_first(s, "StudyInstanceUID"), _first(s, "SeriesInstanceUID")) for s in found})
    instances: list[Instance] = []
    rows = []
    for study_uid, series_uid in keys:
        chosen, row = _series(server, study_uid, series_uid, selections)
        instances += chosen
        rows.append(row)
    return instances, rows


def _series(
    server: Server, study: str, series: str, selections: Sequence[Selection]
) -> tuple[list[Instance], SeriesRow]:
    try:
        metadata = client_for(server).retrieve_series_metadata(study, series)
    except requests.RequestException as exc:
        reason = f"cannot read its metadata: {http_problem(exc, server)}"
        return [], SeriesRow(study, series, "", "", 0, 0, reason)
    metadata = sorted(metadata, key=lambda m: (_number(m), _first(m, "SOPInstanceUID")))
    chosen, reasons = [], Counter()
    for item in metadata:
        why = verdict(item, selections) or ("" if _first(item, "SOPInstanceUID") else "no UID")
        if why:
            reasons[why] += 1
        else:
            chosen.append(Instance(study, series, _first(item, "SOPInstanceUID")))
    first = metadata[0] if metadata else {}
    rejected = "; ".join(f"{why} ({n})" for why, n in sorted(reasons.items()))
    row = SeriesRow(study, series, _first(first, "Modality"), _first(first, "BodyPartExamined"),
                    len(metadata), len(chosen), rejected)  # fmt: skip
    return chosen, row


def _first(metadata: dict, keyword: str) -> str:
    values = values_of(metadata, keyword)
    return str(values[0]) if values else ""


def _number(metadata: dict) -> int:
    try:
        return int(_first(metadata, "InstanceNumber") or 0)
    except ValueError:
        return 0
