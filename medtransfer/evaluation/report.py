"""Evaluate a model on one split of a spec and write the report files.

``evaluate`` is ``assessment.assess`` (compute, in memory) followed by
``report_files.write_report`` (the report folder, and the run's own copy of metrics and
thresholds); a notebook that wants the numbers without files calls ``assess``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medtransfer.errors import SpecError
from medtransfer.evaluation.assessment import compute_assessment
from medtransfer.evaluation.clinical import ClinicalSettings
from medtransfer.evaluation.report_files import write_report
from medtransfer.evaluation.robustness import RobustnessSettings, assess_robustness
from medtransfer.evaluation.robustness_report import with_robustness, write_robustness
from medtransfer.models.degenerate import warn_degenerate
from medtransfer.spec import Spec

ROBUSTNESS_FOLDER = "robustness"  # evaluate --robustness: the full files, beside report.html


@dataclass(frozen=True)
class Evaluation:
    metrics: dict
    predictions: pd.DataFrame
    out_dir: Path

    @property
    def auroc(self) -> float | None:
        return self.metrics["auroc"]["macro"]

    def summary(self) -> str:
        m = self.metrics
        lines = [f"{m['split']} split: {m['n_images']} images"]
        per_class = m["auroc"]["per_class"]
        shown = [m["positive_class"]] if m["task"] == "binary" else list(per_class)
        level = round(100 * m["clinical_settings"]["level"])
        for name in shown:
            value = per_class[name]
            d = m["discrimination"].get(name, {})
            ci = d.get("auroc_ci_delong")
            interval = f"  ({level}% CI {ci[0]:.4f}-{ci[1]:.4f}, DeLong)" if ci else ""
            lines.append(
                f"  AUROC {name:<20} {'n/a' if value is None else f'{value:.4f}'}{interval}"
            )
        if m["task"] != "binary":
            macro = m["auroc"]["macro"]
            lines.append(f"  AUROC {'(macro)':<20} {'n/a' if macro is None else f'{macro:.4f}'}")
        lines.append(f"  accuracy {m['accuracy']:.4f} ({m['accuracy_definition']})")
        for name, points in m["operating_points"].items():
            youden = points.get("youden")
            if youden and youden["sensitivity"] is not None and youden["specificity"] is not None:
                lines.append(
                    f"  {name} at the Youden threshold from val ({youden['threshold']:.4f}): "
                    f"sensitivity {youden['sensitivity']:.3f}, "
                    f"specificity {youden['specificity']:.3f}"
                )
        return "\n".join(lines)


def evaluate(
    model_dir: str | Path,
    spec: Spec,
    *,
    split: str = "test",
    out_dir: str | Path,
    workers: int | None = None,
    settings: ClinicalSettings | None = None,
    tta: bool = False,
    robustness: RobustnessSettings | None = None,
) -> Evaluation:
    """Predict one split and write the report: metrics.json, predictions.csv, thresholds.json,
    roc.png, reliability.png and a self-contained report.html, in ``out_dir``.

    The validation split is predicted too: operating points and the calibration temperature
    are chosen there and applied unchanged to ``split``. For a run directory the thresholds
    are also kept in the run (``evaluation/thresholds.json``), where ``export`` picks them up.
    ``tta`` evaluates the model averaged over test-time views (``medtransfer.models.tta``);
    its thresholds are then the TTA model's, for an export made with ``--tta``.
    A model whose predictions do not vary across the images of either split is flagged
    (``degenerate_model`` in metrics.json, a box atop report.html, a DegenerateModelWarning).
    ``robustness`` adds a robustness section (``assess_robustness`` on the same split, its
    full files in ``out_dir/robustness/``); it assesses the plain model, so not with ``tta``.
    """
    if robustness is not None and tta:
        raise SpecError(
            "a robustness section assesses the model without test-time augmentation: "
            "evaluate with --tta and with --robustness separately"
        )
    assessment = compute_assessment(
        model_dir, spec, split=split, workers=workers, settings=settings, tta=tta
    )
    # warned here, not through assess, so that the warning points at the caller of evaluate
    warn_degenerate(assessment.metrics["degenerate_model"], f"evaluate {assessment.model_dir}")
    if robustness is not None:
        result = assess_robustness(
            model_dir, spec, split=split, workers=workers, settings=robustness
        )
        write_robustness(result, Path(out_dir) / ROBUSTNESS_FOLDER)
        assessment = with_robustness(assessment, result, ROBUSTNESS_FOLDER)
    out = write_report(assessment, out_dir)
    return Evaluation(assessment.metrics, assessment.predictions, out)
