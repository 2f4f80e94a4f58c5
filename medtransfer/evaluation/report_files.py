"""An assessment on disk: the report folder, and for a run directory the run itself.

The run keeps its metrics and thresholds (``evaluation/`` through ``rundir``) because export
ships the thresholds chosen on validation beside the graph, and a later reader of the run should
not need the report folder to know how the model did.
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from medtransfer import atomic
from medtransfer.evaluation.assessment import Assessment
from medtransfer.evaluation.html_report import render_report
from medtransfer.evaluation.thresholds import write_thresholds
from medtransfer.rundir import (
    THRESHOLDS_FILE,
    is_run,
    metrics_file_name,
    open_run,
    thresholds_file_name,
)


def write_report(assessment: Assessment, out_dir: str | Path) -> Path:
    """Write metrics.json, predictions.csv, thresholds.json, one PNG per figure (roc.png,
    reliability.png, gradcam.png) and a self-contained report.html into ``out_dir``; an
    assessed run directory also keeps the metrics and thresholds (``evaluation/``), where
    ``export`` picks the thresholds up. Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "metrics.json", assessment.metrics)
    atomic.write_text(out / "predictions.csv", assessment.predictions.to_csv(index=False))
    write_thresholds(out / THRESHOLDS_FILE, assessment.thresholds)
    pngs = {}
    for name, shown in assessment.figures.items():
        pngs[shown.caption] = png_bytes(shown.figure)
        atomic.write_bytes(out / f"{name}.png", pngs[shown.caption])
    atomic.write_text(
        out / "report.html", render_report(assessment.metrics, pngs, assessment.title)
    )
    if is_run(assessment.model_dir):
        _keep_in_run(assessment)
    return out


def _keep_in_run(assessment: Assessment) -> None:
    """The run's own copy of the metrics (one file per split, plain or TTA) and thresholds."""
    run, metrics = open_run(assessment.model_dir), assessment.metrics
    atomic.write_json(run.kept(metrics_file_name(metrics["split"], metrics["tta"])), metrics)
    write_thresholds(run.kept(thresholds_file_name(metrics["tta"])), assessment.thresholds)


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
