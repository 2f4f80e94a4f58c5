"""Label prevalence per site, and the warning when it differs enough to be a shortcut.

A model trained on sites whose label mix differs can learn "which hospital" in place of "which
label". The rule, per class (binary: the positive class): a chi-square test of site x (class /
not class) with p < 0.01 **and** an absolute prevalence difference above 0.1 between some two
sites. Both are needed: with many images a clinically trivial difference is "significant",
with few a large one is noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency

from medtransfer.data.manifest import targets
from medtransfer.spec import Spec

PREVALENCE_P = 0.01
PREVALENCE_DIFFERENCE = 0.1


def prevalence_by_site(
    manifest: pd.DataFrame, spec: Spec
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]], list[str]]:
    """Per-site share of each class (binary: the positive class; multilabel: among images
    whose label is known), one chi-square test per class, and the warnings the rule raises."""
    y = targets(manifest, spec.classes)
    sites = manifest["site"].astype(str).to_numpy()
    names = sorted(set(sites))
    shown = [spec.positive] if spec.task == "binary" else list(spec.classes)
    prevalence: dict[str, dict[str, float]] = {site: {} for site in names}
    tests, warnings = [], []
    for name in shown:
        table = _site_table(y[:, spec.classes.index(name)], sites, names)
        for site, (positives, negatives) in zip(names, table, strict=True):
            known = positives + negatives
            prevalence[site][name] = positives / known if known else float("nan")
        if len(names) < 2:
            continue
        test = _prevalence_test(name, table, [prevalence[site][name] for site in names])
        tests.append(test)
        if test["warning"]:
            warnings.append(_shortcut_warning(name, prevalence, names, test["p_value"]))
    return prevalence, tests, warnings


def _site_table(column: np.ndarray, sites: np.ndarray, names: list[str]) -> list[list[int]]:
    """[positives, negatives] per site among the images whose label for the class is known."""
    known = ~np.isnan(column)
    table = []
    for site in names:
        values = column[(sites == site) & known]
        positives = int(values.sum())
        table.append([positives, len(values) - positives])
    return table


def _prevalence_test(name: str, table: list[list[int]], rates: list[float]) -> dict[str, Any]:
    """The chi-square test over the sites with images, the largest difference, and the rule."""
    rates = [r for r in rates if not np.isnan(r)]
    counts = np.array([row for row in table if sum(row)])
    difference = float(max(rates) - min(rates)) if rates else 0.0
    p_value = 1.0
    if len(counts) >= 2 and (counts.sum(axis=0) > 0).all():
        p_value = float(chi2_contingency(counts)[1])
    flagged = p_value < PREVALENCE_P and difference > PREVALENCE_DIFFERENCE
    return {"class": name, "p_value": p_value, "max_difference": difference, "warning": flagged}


def _shortcut_warning(
    name: str, prevalence: dict[str, dict[str, float]], names: list[str], p_value: float
) -> str:
    low = min(names, key=lambda s: prevalence[s][name])
    high = max(names, key=lambda s: prevalence[s][name])
    return (
        f"the prevalence of {name} differs strongly between sites ({high} "
        f"{prevalence[high][name]:.2f} vs {low} {prevalence[low][name]:.2f}, chi-square "
        f"p = {p_value:.2g}): a model can learn the site as a shortcut for the label; "
        "check per-site AUROC, balance the sites or adapt (domain_adaptation)"
    )
