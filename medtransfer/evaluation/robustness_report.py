"""A robustness assessment on disk: robustness.json, robustness.csv, two PNG figures and a
self-contained robustness.html, each written atomically.

The figures and the page follow the evaluation report's conventions (matplotlib ``Figure``
objects without pyplot, escaped HTML with embedded PNGs and no scripts), so a robustness page
can be archived or mailed beside report.html.
"""

from __future__ import annotations

import json
from dataclasses import replace
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medtransfer import atomic
from medtransfer.evaluation.assessment import Assessment, ReportFigure
from medtransfer.evaluation.html_report import (
    STYLE,
    figures_html,
    html_table,
    number,
    robustness_header,
    robustness_rows,
)
from medtransfer.evaluation.report_files import png_bytes
from medtransfer.evaluation.robustness import Robustness


def _band(ax, x, rows: pd.DataFrame, label: str, marker: str) -> None:
    """AUROC against ``x`` with its bootstrap interval as a shaded band."""
    (line,) = ax.plot(x, rows["auroc"], marker=marker, lw=1.8, label=label)
    low, high = rows["auroc_ci_bootstrap_low"], rows["auroc_ci_bootstrap_high"]
    if low.notna().all():
        ax.fill_between(
            x, low.astype(float), high.astype(float), color=line.get_color(), alpha=0.15
        )


def adversarial_figure(table: pd.DataFrame, title: str = "AUROC under attack") -> Figure:
    """AUROC against epsilon (in 255ths of the [0, 1] range), one line per attack, starting
    from the clean AUROC at epsilon 0, with bootstrap intervals."""
    fig = Figure(figsize=(5.5, 4), dpi=110)
    ax = fig.subplots()
    clean = table[table["kind"] == "clean"]
    for method, marker in (("fgsm", "o"), ("pgd", "s")):
        rows = pd.concat([clean, table[table["kind"] == method]])
        if len(rows) > 1:
            _band(ax, 255 * rows["level"].to_numpy(float), rows, method.upper(), marker)
    ax.axhline(0.5, ls="--", color="grey", lw=1, label="chance")
    ax.set(xlabel="epsilon (grey levels of 255, L∞)", ylabel="AUROC", ylim=(0, 1.01), title=title)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def corruption_figure(table: pd.DataFrame, title: str = "AUROC under corruptions") -> Figure:
    """AUROC against severity (0 = clean), one line per corruption."""
    fig = Figure(figsize=(6.5, 4.2), dpi=110)
    ax = fig.subplots()
    clean = table[table["kind"] == "clean"]
    corrupted = table[table["kind"] == "corruption"]
    markers = "os^vDPX*"
    for i, name in enumerate(dict.fromkeys(corrupted["name"])):
        rows = pd.concat([clean, corrupted[corrupted["name"] == name]])
        ax.plot(
            rows["level"].to_numpy(float), rows["auroc"], marker=markers[i % len(markers)],
            lw=1.5, label=name,
        )  # fmt: skip
    ax.axhline(0.5, ls="--", color="grey", lw=1, label="chance")
    ax.set(xlabel="severity (0 = clean)", ylabel="AUROC", ylim=(0, 1.01), title=title)
    ax.set_xticks(np.arange(0, 6))
    ax.legend(loc="lower left", fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def render_robustness(result: Robustness, figures: dict[str, bytes]) -> str:
    """robustness.html as a string; ``figures`` maps a caption to PNG bytes."""
    metrics, summary = result.metrics, result.metrics["summary"]
    header = robustness_header(round(100 * metrics["settings"]["level"]))
    skipped = metrics.get("attacks_skipped")
    attacks = (
        f"<p class='flag'>No attacks: {escape(skipped)}</p>" if skipped else
        "<p class='note'>Attacks: " + escape("; ".join(_attack_text(a) for a in metrics["attacks"]))
        + f" against the true labels with the {escape(metrics['attack_loss'])} loss.</p>"
    )  # fmt: skip
    model = metrics["provenance"]["model"]
    title = (
        f"{model['name']}: robustness on {metrics['split']} (n={metrics['provenance']['n_images']})"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{STYLE}</style></head><body>
<h1>{escape(title)}</h1>
<p>Model folder <code>{escape(model["folder"])}</code> ({escape(model["kind"])}). Clean AUROC
{number(summary["clean_auroc"])}; mean AUROC over every corruption and severity
{number(summary["mean_corruption_auroc"])}.</p>{attacks}
<h2>Conditions</h2>{html_table(header, robustness_rows(_records(result.table)))}
<h2>Figures</h2>{figures_html(figures)}
<p class="note">Epsilon is in pixel units of the [0, 1] model input (1/255 = one grey level of
an 8-bit image); the gradient runs through the whole model, in-graph preprocessing included.
AUROC intervals as in report.html ({metrics["settings"]["bootstrap_resamples"]} bootstrap
resamples, seed {metrics["settings"]["ci_seed"]}); accuracy: Wilson score interval.</p>
</body></html>
"""


def _attack_text(attack: dict) -> str:
    start = ", random start" if attack["random_start"] else ""
    return (
        f"{attack['method'].upper()} epsilon {255 * attack['epsilon']:g}/255: "
        f"{attack['steps']} step(s) of {255 * attack['step_size']:.3g}/255{start}"
    )


def robustness_figures(result: Robustness) -> dict[str, ReportFigure]:
    """The figures by file name: ``adversarial`` (when the model was attacked) and
    ``corruptions``."""
    figures = {}
    if "attacks" in result.metrics:
        figures["adversarial"] = ReportFigure(
            "AUROC against epsilon", adversarial_figure(result.table)
        )
    figures["corruptions"] = ReportFigure("AUROC against severity", corruption_figure(result.table))
    return figures


def write_robustness(result: Robustness, out_dir: str | Path) -> Path:
    """robustness.json, robustness.csv, adversarial.png (when attacked), corruptions.png and
    robustness.html in ``out_dir``, each replaced atomically. Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "robustness.json", result.metrics)
    atomic.write_text(out / "robustness.csv", result.table.to_csv(index=False))
    pngs = {}
    for name, shown in robustness_figures(result).items():
        pngs[shown.caption] = png_bytes(shown.figure)
        atomic.write_bytes(out / f"{name}.png", pngs[shown.caption])
    atomic.write_text(out / "robustness.html", render_robustness(result, pngs))
    return out


def with_robustness(assessment: Assessment, result: Robustness, folder: str) -> Assessment:
    """The assessment with a robustness section for report.html: the headline conditions (clean,
    each attack and epsilon, each corruption's mean and worst severity) in metrics.json's
    ``robustness``, and the two figures beside the report's own. ``folder`` is where the full
    robustness files are written, relative to the report."""
    metrics = result.metrics
    section = {
        "report": f"{folder}/robustness.html",
        "split": metrics["split"],
        "n_images": metrics["provenance"]["n_images"],
        "settings": metrics["settings"],
        "summary": metrics["summary"],
        "conditions": _headline_rows(result.table),
    }
    for key in ("attacks", "attack_loss", "attacks_skipped"):
        if key in metrics:
            section[key] = metrics[key]
    figures = {f"robustness_{name}": shown for name, shown in robustness_figures(result).items()}
    return replace(
        assessment,
        metrics=assessment.metrics | {"robustness": section},
        figures=assessment.figures | figures,
    )


def _records(table: pd.DataFrame) -> list[dict]:
    """Rows as JSON would store them: missing intervals are None."""
    return json.loads(table.to_json(orient="records"))


def _headline_rows(table: pd.DataFrame) -> list[dict]:
    """Clean and attacked rows as they are; per corruption, its mildest and harshest severity
    (the full grid is in robustness.csv)."""
    kept = table[table["kind"] != "corruption"]
    corrupted = table[table["kind"] == "corruption"]
    levels = corrupted.groupby("name")["level"]
    ends = corrupted["level"].eq(levels.transform("min")) | corrupted["level"].eq(
        levels.transform("max")
    )
    return _records(pd.concat([kept, corrupted[ends]]))
