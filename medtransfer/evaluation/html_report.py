"""``report.html``: one self-contained page (figures embedded) a clinical reader can open offline.

Plain HTML with escaped text and base64 PNGs: no scripts, no external styles or fonts, so it
can be attached to an email or archived with a study and still render the same.
"""

from __future__ import annotations

import base64
from html import escape

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 62em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; } .flag { color: #a33; }
.warning { border: 3px solid #a33; background: #fdecea; color: #611; padding: 0.6em 1em; }
figure { display: inline-block; margin: 0.5em; } figcaption { font-size: 0.85em; color: #555; }
"""


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(pair: list[float] | tuple[float, float] | None, digits: int = 3) -> str:
    return "" if pair is None else f" ({pair[0]:.{digits}f}&ndash;{pair[1]:.{digits}f})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _discrimination(metrics: dict) -> str:
    level = round(100 * metrics["clinical_settings"]["level"])
    rows = []
    for name, d in metrics["discrimination"].items():
        rows.append(
            [
                escape(name),
                f"{d['n_positive']} / {d['n_negative']}",
                _number(d["auroc"]) + _interval(d["auroc_ci_delong"]),
                _interval(d["auroc_ci_bootstrap"]).strip(" ()") or "n/a",
                _number(d["auprc"]),
            ]
        )
    header = ["class", "positives / negatives", f"AUROC ({level}% CI, DeLong)",
              f"{level}% CI, bootstrap", "AUPRC"]  # fmt: skip
    return _table(header, rows)


def _operating_points(metrics: dict) -> str:
    if not metrics.get("operating_points"):
        return "<p class='note'>No operating points: the validation split lacks a class.</p>"
    parts = []
    for name, points in metrics["operating_points"].items():
        rows = []
        for point, m in points.items():
            rows.append(
                [
                    escape(point),
                    _number(m["threshold"], 4),
                    _number(m["sensitivity"]) + _interval(m["sensitivity_ci"]),
                    _number(m["specificity"]) + _interval(m["specificity_ci"]),
                    _number(m["ppv"]) + _interval(m["ppv_ci"]),
                    _number(m["npv"]) + _interval(m["npv_ci"]),
                    _number(m["f1"]),
                    f"{m['tp']} / {m['fp']} / {m['tn']} / {m['fn']}",
                ]
            )
        header = ["operating point", "threshold (from val)", "sensitivity", "specificity",
                  "PPV", "NPV", "F1", "TP / FP / TN / FN"]  # fmt: skip
        parts.append(f"<h3>{escape(name)}</h3>" + _table(header, rows))
    return "".join(parts)


def _calibration(metrics: dict) -> str:
    c = metrics.get("calibration", {})
    if "uncalibrated" not in c:
        return f"<p class='note'>{escape(c.get('skipped', 'not computed'))}</p>"
    raw = c["uncalibrated"]
    rows = [["model output", _number(raw["ece"]), _number(raw["brier"])]]
    if "temperature_scaled" in c:
        scaled = c["temperature_scaled"]
        label = f"temperature scaling, T = {c['temperature']:.3f} (fitted on val)"
        rows.append([label, _number(scaled["ece"]), _number(scaled["brier"])])
    return _table(["probabilities", f"ECE ({c['bins']} bins)", "Brier score"], rows)


def _subgroups(metrics: dict) -> str:
    groups = metrics.get("subgroups")
    if not groups:
        return "<p class='note'>No subgroup columns (site, tabular features, DICOM tags).</p>"
    rows = []
    for column, values in groups.items():
        for value, g in values.items():
            flag = " <span class='flag'>small: do not over-read</span>" if g["small"] else ""
            rows.append(
                [
                    escape(f"{column} = {value}"),
                    str(g["n_images"]),
                    f"{g['n_positive']} / {g['n_negative']}",
                    _number(g["auroc"]) + _interval(g["auroc_ci_delong"]) + flag,
                ]
            )
    return _table(["subgroup", "images", "positives / negatives", "AUROC (DeLong CI)"], rows)


def _warning(metrics: dict) -> str:
    """A box above everything else when the model is degenerate: its figures are not results."""
    degenerate = metrics.get("degenerate_model")
    if not degenerate:
        return ""
    message = escape(degenerate["message"])
    return f"<div class='warning' role='alert'><b>Warning:</b> {message}</div>"


def render_report(metrics: dict, figures: dict[str, bytes], title: str) -> str:
    """The whole page as a string; ``figures`` maps a caption to PNG bytes."""
    settings = metrics["clinical_settings"]
    images = "".join(
        f"<figure><img alt='{escape(caption)}' src='data:image/png;base64,"
        f"{base64.b64encode(png).decode()}'><figcaption>{escape(caption)}</figcaption></figure>"
        for caption, png in figures.items()
    )
    method = (
        f"AUROC intervals: DeLong (Wald, clipped to [0, 1]) and a stratified percentile "
        f"bootstrap ({settings['bootstrap_resamples']} resamples, seed {settings['seed']}; "
        "whole patients resampled when a patient has several images). Rates: Wilson score "
        "intervals. Operating-point thresholds were chosen on the validation split and applied "
        "unchanged here; a threshold is applied as probability &ge; threshold."
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{escape(title)}</h1>{_warning(metrics)}
<p>Split <b>{escape(metrics["split"])}</b>: {metrics["n_images"]} images,
{metrics.get("n_patients", "?")} patients. Task: {escape(metrics["task"])}.
Accuracy {_number(metrics["accuracy"])} ({escape(metrics["accuracy_definition"])}); balanced
accuracy {_number(metrics.get("balanced_accuracy"))}.</p>
<h2>Discrimination</h2>{_discrimination(metrics)}
<h2>Operating points</h2>{_operating_points(metrics)}
<h2>Calibration</h2>{_calibration(metrics)}
<h2>Subgroups</h2>{_subgroups(metrics)}
<h2>Figures</h2>{images}
<p class="note">{method}</p>
</body></html>
"""
