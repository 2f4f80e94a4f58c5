"""``report.html``: one self-contained page (figures embedded) a clinical reader can open offline.

Plain HTML with escaped text and base64 PNGs: no scripts, no external styles or fonts, so it
can be attached to an email or archived with a study and still render the same.
"""

from __future__ import annotations

import base64
from html import escape

import numpy as np

STYLE = """
body { font-family: sans-serif; margin: 2em auto; padding: 0 1em; max-width: 62em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; } .flag { color: #a33; font-weight: bold; }
.ok { color: #256029; } .ci { white-space: nowrap; } .unreliable { color: #888; }
code { font-size: 0.85em; color: #555; }
.warning { border: 3px solid #a33; background: #fdecea; color: #611; padding: 0.6em 1em; }
.provenance { border: 1px solid #99a; background: #f5f6fa; padding: 0.2em 1em; }
.provenance table { margin: 0.3em 0 0.6em; } .provenance th, .provenance td { text-align: left; }
.matrices { display: flex; flex-wrap: wrap; gap: 0 1.2em; }
.confusion caption { font-size: 0.85em; text-align: left; padding-bottom: 0.2em; }
.confusion td { min-width: 4.5em; } .confusion td.right { background: #eef6ee; }
.confusion td.wrong { background: #fbeeee; }
figure { display: inline-block; vertical-align: top; margin: 0.5em; max-width: 100%; }
img { max-width: 100%; height: auto; } figcaption { font-size: 0.85em; color: #555; }
p, li, .provenance td { overflow-wrap: anywhere; }
"""

SMALL_IMAGES, SMALL_PER_CLASS = 50, 10  # below either, an interval is not to be relied on


def number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _range(pair: list[float] | tuple[float, float] | None, digits: int = 3) -> str:
    """An interval kept on one line: a table cell may wrap before it, never inside it."""
    if pair is None:
        return "n/a"
    return f"<span class='ci'>{pair[0]:.{digits}f}&ndash;{pair[1]:.{digits}f}</span>"


def _interval(pair: list[float] | tuple[float, float] | None, digits: int = 3) -> str:
    return "" if pair is None else f" ({_range(pair, digits)})"


def _percent(count: int, total: int) -> str:
    return f"{count} / {total} ({100 * count / total:.1f}%)" if total else "n/a (no images)"


def html_table(header: list[str], rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{f' class={css!r}' if css else ''}><tr>{head}</tr>{body}</table>"


def _unreliable(n_images: int, n_positive: int, n_negative: int) -> bool:
    return n_images < SMALL_IMAGES or min(n_positive, n_negative) < SMALL_PER_CLASS


_CAUTION = (
    f" <span class='flag'>interval unreliable (fewer than {SMALL_IMAGES} images or "
    f"{SMALL_PER_CLASS} positives or negatives)</span>"
)


def _provenance(metrics: dict) -> str:
    """The header a reader sees first: which model, trained how, evaluated when, on what."""
    source = metrics.get("provenance")
    if not source:
        return ""
    model = source["model"]
    seen = metrics.get("threshold_selection", {})
    epoch = model.get("best_epoch")
    best = f", best epoch {epoch} (validation AUROC {number(model.get('best_val_auroc'))})"
    rows = [
        ("Model", f"{escape(model['kind'])} <b>{escape(model['folder'])}</b> "
                  f"(model name {escape(model['name'])})"),
        ("Training", f"backbone {escape(str(model.get('backbone', 'not recorded')))} "
                     f"(weights {escape(str(model.get('weights', '?')))}), seed "
                     f"{escape(str(model.get('seed')))}" + (best if epoch else "")),
        ("Training data fingerprint", f"<code>{escape(str(model.get('data_fingerprint')))}</code>"),
        ("Evaluated", f"{escape(source['evaluated_at'])} with medtransfer "
                      f"{escape(source['medtransfer_version'])}"
                      + ("; test-time augmentation" if metrics.get("tta") else "")),
        ("Evaluated images", f"<b>{escape(source['split'])}</b> split, n = {source['n_images']} "
                             f"images of {metrics.get('n_patients', '?')} patients; fingerprint "
                             f"<code>{escape(source['data_fingerprint'])}</code>"),
        ("Thresholds chosen on", f"validation split, n = {seen.get('n_images', '?')} images, "
                                 "applied unchanged here"),
    ]  # fmt: skip
    cells = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    heading = "<h2>Provenance</h2>"
    return f"<section class='provenance' id='provenance'>{heading}<table>{cells}</table></section>"


def _prevalence(metrics: dict) -> str:
    """How common each reported class is here and where the thresholds were chosen: PPV and
    NPV depend on it, so they do not carry over to a population where it differs."""
    chosen_on = metrics.get("threshold_selection", {}).get("classes", {})
    rows = []
    for name, d in metrics["discrimination"].items():
        n = d["n_positive"] + d["n_negative"]
        val = chosen_on.get(name)
        val_text = (
            _percent(val["n_positive"], val["n_positive"] + val["n_negative"]) if val else "n/a"
        )
        rows.append([escape(name), _percent(d["n_positive"], n), val_text])
    header = ["class", f"positives on {escape(metrics['split'])} (prevalence)",
              "positives on val, where thresholds were chosen"]  # fmt: skip
    note = (
        "<p class='note'>PPV and NPV depend on prevalence: where the condition is rarer or "
        "commoner than here, they differ even if sensitivity and specificity hold.</p>"
    )
    return html_table(header, rows) + note


def _discrimination(metrics: dict) -> str:
    level = round(100 * metrics["clinical_settings"]["level"])
    rows = []
    for name, d in metrics["discrimination"].items():
        n_pos, n_neg = d["n_positive"], d["n_negative"]
        caution = _CAUTION if _unreliable(n_pos + n_neg, n_pos, n_neg) else ""
        rows.append(
            [
                escape(name),
                f"{n_pos} / {n_neg}",
                number(d["auroc"]) + _interval(d["auroc_ci_delong"]) + caution,
                _range(d["auroc_ci_bootstrap"]),
                number(d["auprc"]),
            ]
        )
    header = ["class", "positives / negatives", f"AUROC ({level}% CI, DeLong)",
              f"{level}% CI, bootstrap", "AUPRC"]  # fmt: skip
    return html_table(header, rows)


def _threshold(m: dict) -> str:
    if m.get("threshold_note") or m["threshold"] is None or m["threshold"] == float("inf"):
        return "none (no image called positive)"
    return number(m["threshold"], 4)


def _target(m: dict) -> str:
    """Whether a point chosen for a target rate on validation reaches it on this split."""
    target = m.get("target")
    if not target:
        return ""
    rate, value, observed = target["rate"], target["value"], m[target["rate"]]
    if target["met"]:
        return f"<br><span class='ok'>target {rate} {value:g} reached here</span>"
    return (
        f"<br><span class='flag'>&#9888; target missed here: {rate} {number(observed)} "
        f"&lt; {value:g}</span>"
    )


def _point_rows(points: dict) -> list[list[str]]:
    return [
        [
            f"{escape(m.get('label', point))} <code>{escape(point)}</code>{_target(m)}",
            _threshold(m),
            number(m["sensitivity"]) + _interval(m["sensitivity_ci"]),
            number(m["specificity"]) + _interval(m["specificity_ci"]),
            number(m["ppv"]) + _interval(m["ppv_ci"]),
            number(m["npv"]) + _interval(m["npv_ci"]),
            number(m["f1"]),
        ]
        for point, m in points.items()
    ]


def _confusion(name: str, point: str, m: dict) -> str:
    """One operating point's 2x2 table of counts: rows the truth, columns the call."""
    label = escape(m.get("label", point))
    has, lacks = escape(f"{name} present"), escape(f"{name} absent")
    return (
        f"<table class='confusion'><caption>{label}, threshold {_threshold(m)}</caption>"
        "<tr><th>truth \\ call</th><th>called positive</th><th>called negative</th></tr>"
        f"<tr><th>{has}</th><td class='right'>TP {m['tp']}</td>"
        f"<td class='wrong'>FN {m['fn']}</td></tr>"
        f"<tr><th>{lacks}</th><td class='wrong'>FP {m['fp']}</td>"
        f"<td class='right'>TN {m['tn']}</td></tr></table>"
    )


def _operating_points(metrics: dict) -> str:
    if not metrics.get("operating_points"):
        return "<p class='note'>No operating points: the validation split lacks a class.</p>"
    n_val = metrics.get("threshold_selection", {}).get("n_images", "?")
    header = ["operating point", f"threshold (chosen on val, n = {n_val})", "sensitivity",
              "specificity", "PPV", "NPV", "F1"]  # fmt: skip
    parts = []
    for name, points in metrics["operating_points"].items():
        matrices = "".join(_confusion(name, point, m) for point, m in points.items())
        parts.append(
            f"<h3>{escape(name)}</h3>{html_table(header, _point_rows(points))}"
            f"<h4>Confusion matrices on {escape(metrics['split'])}</h4>"
            f"<div class='matrices'>{matrices}</div>"
        )
    return "".join(parts)


def _calibration(metrics: dict) -> str:
    c = metrics.get("calibration", {})
    if "uncalibrated" not in c:
        return f"<p class='note'>{escape(c.get('skipped', 'not computed'))}</p>"
    raw = c["uncalibrated"]
    rows = [["model output", number(raw["ece"]), number(raw["brier"])]]
    if "temperature_scaled" in c:
        scaled = c["temperature_scaled"]
        label = f"temperature scaling, T = {c['temperature']:.3f} (fitted on val)"
        rows.append([label, number(scaled["ece"]), number(scaled["brier"])])
    return html_table(["probabilities", f"ECE ({c['bins']} bins)", "Brier score"], rows)


def _subgroup_auroc(g: dict) -> str:
    shown = number(g["auroc"]) + _interval(g["auroc_ci_delong"])
    unreliable = g.get("interval_unreliable", g["small"]) or _unreliable(
        g["n_images"], g["n_positive"], g["n_negative"]
    )
    return f"<span class='unreliable'>{shown}</span>{_CAUTION}" if unreliable else shown


def _subgroups(metrics: dict) -> str:
    groups = metrics.get("subgroups")
    if not groups:
        return "<p class='note'>No subgroup columns (site, tabular features, DICOM tags).</p>"
    rows = []
    for column, values in groups.items():
        for value, g in values.items():
            rows.append(
                [
                    escape(f"{column} = {value}"),
                    str(g["n_images"]),
                    f"{g['n_positive']} / {g['n_negative']}",
                    _subgroup_auroc(g),
                ]
            )
    shown = escape(str(metrics.get("subgroups_class", "")))
    note = f"<p class='note'>AUROC of {shown} within each group.</p>" if shown else ""
    return note + html_table(
        ["subgroup", "images", "positives / negatives", "AUROC (DeLong CI)"], rows
    )


def _pair(row: dict, low: str, high: str) -> tuple[float, float] | None:
    """An interval from a robustness.csv record; missing (None or NaN) when not computed."""
    lo, hi = row.get(low), row.get(high)
    return None if lo is None or hi is None or np.isnan(lo) or np.isnan(hi) else (lo, hi)


def robustness_rows(records: list[dict]) -> list[list[str]]:
    """robustness.csv records as table cells: condition, epsilon or severity, AUROC with its
    DeLong and bootstrap intervals, accuracy with its Wilson interval."""
    out = []
    for row in records:
        attack = row["kind"] in ("fgsm", "pgd")
        level = f"{row['epsilon_255']:g}/255" if attack else f"{row['level']:g}"
        accuracy = _pair(row, "accuracy_ci_low", "accuracy_ci_high")
        out.append(
            [escape(row["kind"]), escape(row["name"]), level, number(row["auroc"]),
             _range(_pair(row, "auroc_ci_delong_low", "auroc_ci_delong_high")),
             _range(_pair(row, "auroc_ci_bootstrap_low", "auroc_ci_bootstrap_high")),
             f"{number(row['accuracy'])} {_range(accuracy)}"]
        )  # fmt: skip
    return out


def robustness_header(level: int) -> list[str]:
    return ["kind", "name", "epsilon / severity", "AUROC", f"{level}% CI, DeLong",
            f"{level}% CI, bootstrap", "accuracy (Wilson CI)"]  # fmt: skip


def _robustness(metrics: dict) -> str:
    """The section ``evaluate --robustness`` adds: headline conditions and a link to the full
    robustness page written beside the report."""
    section = metrics.get("robustness")
    if not section:
        return ""
    summary = section["summary"]
    level = round(100 * section["settings"]["level"])
    skipped = section.get("attacks_skipped")
    attacks = f"<p class='flag'>No attacks: {escape(skipped)}</p>" if skipped else ""
    link = escape(section["report"])
    return (
        f"<h2 id='robustness'>Robustness</h2>{attacks}<p>Clean AUROC "
        f"{number(summary['clean_auroc'])}; mean AUROC over every corruption and severity "
        f"{number(summary['mean_corruption_auroc'])}. Below: each attack, and each corruption "
        f"at its mildest and harshest severity; every severity, the attack settings and the "
        f"method are in <a href='{link}'>{link}</a>. Epsilon is in grey levels of the [0, 1] "
        "model input; the attacks' gradients run through the whole model, its in-graph "
        "preprocessing included.</p>"
        + html_table(robustness_header(level), robustness_rows(section["conditions"]))
    )


def _warning(metrics: dict) -> str:
    """A box above everything else when the model is degenerate: its figures are not results."""
    degenerate = metrics.get("degenerate_model")
    if not degenerate:
        return ""
    message = escape(degenerate["message"])
    return f"<div class='warning' role='alert'><b>Warning:</b> {message}</div>"


def figures_html(figures: dict[str, bytes]) -> str:
    return "".join(
        f"<figure><img alt='{escape(caption)}' src='data:image/png;base64,"
        f"{base64.b64encode(png).decode()}'><figcaption>{escape(caption)}</figcaption></figure>"
        for caption, png in figures.items()
    )


def render_report(metrics: dict, figures: dict[str, bytes], title: str) -> str:
    """The whole page as a string; ``figures`` maps a caption to PNG bytes."""
    settings = metrics["clinical_settings"]
    method = (
        f"AUROC intervals: DeLong (Wald, clipped to [0, 1]) and a stratified percentile "
        f"bootstrap ({settings['bootstrap_resamples']} resamples, seed {settings['seed']}; "
        "whole patients resampled when a patient has several images). Rates: Wilson score "
        "intervals. Operating-point thresholds were chosen on the validation split and applied "
        "unchanged here; a threshold is applied as probability &ge; threshold. A target rate "
        "reached on validation may be missed on another split: that is flagged, not hidden."
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{escape(title)}</h1>{_warning(metrics)}{_provenance(metrics)}
<p>Split <b>{escape(metrics["split"])}</b>: {metrics["n_images"]} images,
{metrics.get("n_patients", "?")} patients. Task: {escape(metrics["task"])}.
Accuracy {number(metrics["accuracy"])} ({escape(metrics["accuracy_definition"])}); balanced
accuracy {number(metrics.get("balanced_accuracy"))}.</p>
<h2>Prevalence</h2>{_prevalence(metrics)}
<h2>Discrimination</h2>{_discrimination(metrics)}
<h2>Operating points</h2>{_operating_points(metrics)}
<h2>Calibration</h2>{_calibration(metrics)}
<h2>Subgroups</h2>{_subgroups(metrics)}{_robustness(metrics)}
<h2>Figures</h2>{figures_html(figures)}
<p class="note">{method}</p>
</body></html>
"""
