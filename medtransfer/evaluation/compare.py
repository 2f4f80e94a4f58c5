"""``medtransfer compare``: is model A better than model B on the same images?

Two reports' ``predictions.csv`` are joined image by image and each reported class gets a paired
DeLong test (DeLong et al. 1988): the two AUROCs are correlated because the images are shared,
and comparing their separate intervals would be wrong (too conservative when the models agree,
misleading when they do not).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from medtransfer.errors import MedtransferError
from medtransfer.evaluation.stats import paired_delong
from medtransfer.spec import reported_classes


def compare_reports(report_a: str | Path, report_b: str | Path, level: float = 0.95) -> dict:
    """Paired DeLong per reported class on the images both reports scored."""
    a, b = Path(report_a), Path(report_b)
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (a, b)]
    if metrics[0]["classes"] != metrics[1]["classes"] or metrics[0]["task"] != metrics[1]["task"]:
        raise MedtransferError(f"{a} and {b} report different tasks or classes")
    if metrics[0]["split"] != metrics[1]["split"]:
        raise MedtransferError(f"{a} is on the {metrics[0]['split']} split, {b} on another")
    left, right = (pd.read_csv(r / "predictions.csv") for r in (a, b))
    joined = left.merge(right, on="path", suffixes=("_a", "_b"))
    if joined.empty:
        raise MedtransferError(f"{a} and {b} have no image in common")
    classes, task = metrics[0]["classes"], metrics[0]["task"]
    z = float(norm.ppf(0.5 + level / 2))
    out = {
        "split": metrics[0]["split"],
        "n_common": len(joined),
        "only_a": len(left) - len(joined),
        "only_b": len(right) - len(joined),
        "classes": {},
    }
    for name in reported_classes(classes, task, metrics[0].get("positive_class")):
        y_a, y_b = joined[f"y_{name}_a"].to_numpy(), joined[f"y_{name}_b"].to_numpy()
        known = ~np.isnan(y_a)
        if not np.array_equal(y_a[known], y_b[known]) or not np.array_equal(known, ~np.isnan(y_b)):
            raise MedtransferError(f"{a} and {b} disagree on the labels of {name}")
        test = paired_delong(
            y_a[known].astype(int),
            joined.loc[known, f"prob_{name}_a"].to_numpy(),
            joined.loc[known, f"prob_{name}_b"].to_numpy(),
        )
        half = z * np.sqrt(test.variance)
        out["classes"][name] = {
            "auroc_a": test.auc_a,
            "auroc_b": test.auc_b,
            "difference": test.difference,
            "difference_ci": [test.difference - half, test.difference + half],
            "z": test.z,
            "p_value": test.p_value,
            "n_images": int(known.sum()),
        }
    return out


def comparison_summary(result: dict, a: str, b: str) -> str:
    lines = [f"{result['split']} split, {result['n_common']} images in both reports"]
    if result["only_a"] or result["only_b"]:
        lines.append(f"  (left out: {result['only_a']} only in A, {result['only_b']} only in B)")
    for name, c in result["classes"].items():
        low, high = c["difference_ci"]
        lines.append(
            f"  {name}: AUROC A {c['auroc_a']:.4f} vs B {c['auroc_b']:.4f}, difference "
            f"{c['difference']:+.4f} (95% CI {low:+.4f} to {high:+.4f}), paired DeLong "
            f"p = {c['p_value']:.3g}"
        )
    lines.append(f"  A = {a}\n  B = {b}")
    return "\n".join(lines)
