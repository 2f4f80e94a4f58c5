"""What a manifest holds, as a small table: images, patients and class prevalence per split.

``train`` prints it before training starts; notebooks can show ``data_summary(manifest,
classes)`` directly. Pure: it reads only the manifest (no image is opened).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from medtransfer.data.manifest import SPLITS, target_columns

ALL_SITES = "(all)"


def data_summary(manifest: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """One row per split (train, val, test, then any other) and, when the manifest has several
    sites, one more row per split and site.

    Columns: ``split``, ``site`` (``"(all)"`` on a split's total row; only with several sites),
    ``images``, ``patients``, then per class ``<class>`` (images labelled with it) and
    ``<class> %`` (its prevalence, in percent). Unknown labels (NaN targets: multilabel cells
    left empty or -1) are not counted: prevalence is over the images whose label for that class
    is known, and ``<class> known`` columns say how many those are (only when any is unknown).
    """
    splits = [s for s in SPLITS if (manifest["split"] == s).any()]
    splits += sorted(set(manifest["split"].astype(str)) - set(SPLITS))
    sites = sorted(set(manifest["site"].fillna("").astype(str))) if "site" in manifest else [""]
    columns = target_columns(list(classes))
    with_unknown = bool(manifest[columns].isna().to_numpy().any())
    rows = []
    for split in splits:
        in_split = manifest[manifest["split"] == split]
        groups = [(ALL_SITES, in_split)] if len(sites) > 1 else [(None, in_split)]
        if len(sites) > 1:
            site_of = in_split["site"].fillna("").astype(str)
            groups += [(site, in_split[site_of == site]) for site in sites]
        for site, rows_of in groups:
            if site is not None and site != ALL_SITES and rows_of.empty:
                continue
            rows.append(_row(split, site, rows_of, classes, columns, with_unknown))
    return pd.DataFrame(rows)


def _row(
    split: str,
    site: str | None,
    rows: pd.DataFrame,
    classes: Sequence[str],
    columns: list[str],
    with_unknown: bool,
) -> dict:
    row: dict = {"split": split}
    if site is not None:
        row["site"] = site
    row["images"] = len(rows)
    row["patients"] = int(rows["patient"].nunique())
    for name, column in zip(classes, columns, strict=True):
        values = rows[column]
        known = int(values.notna().sum())
        positive = int((values > 0.5).sum())
        row[name] = positive
        row[f"{name} %"] = round(100 * positive / known, 1) if known else float("nan")
        if with_unknown:
            row[f"{name} known"] = known
    return row


def format_data_summary(table: pd.DataFrame, classes: Sequence[str], task: str = "") -> str:
    """The summary as fixed-width text: each class as ``count (prevalence%)``, and a note
    under the table when labels are multilabel or partly unknown."""
    shown = table[[c for c in ("split", "site", "images", "patients") if c in table]].copy()
    for text in ("split", "site"):  # names read best left-aligned
        if text in shown:
            width = max(len(text), *(len(str(v)) for v in shown[text]))
            shown[text] = [str(v).ljust(width) for v in shown[text]]
    for name in classes:
        shown[name] = [
            f"{count} ({percent:.1f}%)" if percent == percent else f"{count} (-)"
            for count, percent in zip(table[name], table[f"{name} %"], strict=True)
        ]
    lines = ["data:", shown.to_string(index=False)]
    if task == "multilabel":
        lines.append("multilabel: an image counts toward every class it has")
    if any(f"{name} known" in table for name in classes):
        unknown = {
            name: int((table["images"] - table[f"{name} known"])[_total_rows(table)].sum())
            for name in classes
        }
        listed = ", ".join(f"{name} {n}" for name, n in unknown.items() if n)
        lines.append(
            f"unknown labels are not counted; % is of the known labels only (unknown: {listed})"
        )
    return "\n".join(lines)


def _total_rows(table: pd.DataFrame) -> pd.Series:
    """The one row per split (not its per-site rows)."""
    if "site" not in table:
        return pd.Series(True, index=table.index)
    return table["site"] == ALL_SITES
