"""What a monitor leaves in its folder: ``monitor.csv``, ``monitor.json``, ``monitor.html`` and
the figures as PNGs, each written atomically (a reader sees the previous run's file or this
one's, never half of one).

The page is for a clinical analyst, not a statistician: it says first, in plain words, whether
and where the images drifted, then gives a table per batch and the figures. It is one
self-contained file (figures embedded as base64 PNGs, escaped text, no scripts, no external
styles), so it can be archived or mailed and render the same offline. Figures are built with
matplotlib's ``Figure`` API (no pyplot: no global state, nothing opens a window on a server).
Only aggregates reach any output: batch labels, counts, shares, statistics.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from medtransfer import atomic
from medtransfer.monitoring.batches import Batch
from medtransfer.monitoring.checks import INTENSITY, MonitorThresholds, format_p
from medtransfer.monitoring.reference import MonitorReference

MONITOR_CSV, MONITOR_JSON, MONITOR_HTML = "monitor.csv", "monitor.json", "monitor.html"
FIGURE_FILES = {
    "psi": "monitor_psi.png",
    "out_of_scope": "monitor_out_of_scope.png",
    "prevalence": "monitor_prevalence.png",
    "last_batch": "monitor_last_batch.png",
}
_PLAIN = {
    "errors": "files that could not be scored",
    "out_of_scope": "files unlike those the model was trained on (modality, body part, "
    "screenshots, scouts, or features far from the training images)",
    "ood_score": "how unlike the training images the model finds the images (median "
    "percentile among the validation images)",
    "intensity_mean": "image brightness (mean pixel value, model input scale 0 to 1)",
    "intensity_std": "image contrast (pixel standard deviation, model input scale 0 to 1)",
    "modality": "modality in the DICOM header (share of files with one unseen in training)",
    "body_part": "body part in the DICOM header (share of files with one unseen in training)",
}
PSI_SHOWN_FROM = 1e-3  # the log scale's floor: a PSI below is drawn there
_HOLLOW = "; hollow points: too few files to judge"
_SHARES = ("errors", "out_of_scope", "modality", "body_part", "prevalence:")


_PLAIN_PER_CLASS = {
    "prevalence": "how often the model calls {} (share of scored files)",
    "probability": "the model's probability of {} (median)",
}
_SHORT = {
    "out_of_scope": "more files outside the model's scope",
    "ood_score": "images less like the training images (OOD score)",
    "intensity_mean": "image brightness",
    "intensity_std": "image contrast",
    "modality": "the mix of modalities",
    "body_part": "the mix of body parts",
}
_SHORT_PER_CLASS = {
    "prevalence": "how often the model calls {}",
    "probability": "the model's {} probabilities",
}


def _words(check: str, named: dict[str, str], per_class: dict[str, str]) -> str:
    kind, _, name = check.partition(":")
    return per_class[kind].format(name) if kind in per_class else named.get(check, check)


def plain_words(check: str) -> str:
    """What a check follows, for a reader who does not know the column names."""
    return _words(check, _PLAIN, _PLAIN_PER_CLASS)


def short_words(check: str) -> str:
    """What changed, when ``check`` alarms, in a few words."""
    return _words(check, _SHORT, _SHORT_PER_CLASS)


# --- figures --------------------------------------------------------------------------------------


def _series(findings: pd.DataFrame, check: str, column: str, labels: list[str]) -> np.ndarray:
    """One finding column of one check, in batch order (NaN where absent)."""
    rows = findings[findings["check"] == check].set_index("batch")[column]
    return np.array([rows.get(label, np.nan) for label in labels], dtype=np.float64)


def _over_batches(
    findings: pd.DataFrame, labels: list[str], title: str, ylabel: str
) -> tuple[Figure, Axes]:
    """A figure with one x position per batch, each labelled with its file count."""
    fig = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    files = _series(findings, "errors", "n", labels)  # every row of the table
    ticks = [f"{label}\n({n:.0f} files)" for label, n in zip(labels, files, strict=True)]
    ax.set_xticks(range(len(labels)), ticks, rotation=30, ha="right", fontsize=8)
    ax.set(title=title, ylabel=ylabel, xlim=(-0.5, len(labels) - 0.5))
    ax.grid(alpha=0.3)
    return fig, ax


def _line(ax: Axes, values: np.ndarray, small: np.ndarray, **style: object) -> Line2D:
    """A line over the batches; a point from too few files to judge is drawn hollow."""
    x = np.arange(len(values))
    (line,) = ax.plot(x, values, marker="o", **style)
    ax.plot(x[small], values[small], ls="none", marker="o", mfc="white", color=line.get_color())
    return line


def _small(
    findings: pd.DataFrame, check: str, labels: list[str], t: MonitorThresholds
) -> np.ndarray:
    return _series(findings, check, "n", labels) < t.min_files


def psi_figure(findings: pd.DataFrame, labels: list[str], t: MonitorThresholds) -> Figure | None:
    """PSI of every distribution check over the batches, on a log scale (a new modality can
    reach PSI 5 while a drifting brightness creeps through 0.1), alarms ringed in red."""
    checks = [c for c in dict.fromkeys(findings["check"]) if findings.loc[
        findings["check"] == c, "psi"].notna().any()]  # fmt: skip
    if not checks:
        return None
    title = "Population stability index per batch"
    fig, ax = _over_batches(findings, labels, title, "PSI (log scale)")
    for check in checks:
        psi = np.maximum(_series(findings, check, "psi", labels), PSI_SHOWN_FROM)
        _line(ax, psi, _small(findings, check, labels, t), label=check)
        alarm = _series(findings, check, "alarm", labels) == 1
        ax.plot(np.flatnonzero(alarm), psi[alarm], ls="none", marker="o", ms=13, mfc="none",
                mec="red", mew=1.5, color="red")  # fmt: skip
    ax.axhline(t.psi_alarm, ls="--", color="grey", label=f"alarm level {t.psi_alarm:g}")
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="upper left", ncols=2)
    return fig


def scope_figure(findings: pd.DataFrame, labels: list[str], t: MonitorThresholds) -> Figure | None:
    share = _series(findings, "out_of_scope", "value", labels)
    if not np.isfinite(share).any():
        return None
    fig, ax = _over_batches(findings, labels, "Files out of the model's scope", "share (%)")
    small = _small(findings, "out_of_scope", labels, t)
    _line(ax, 100 * share, small, color="tab:red", label="share of files out of scope")
    limit = 100 * t.max_out_of_scope
    ax.axhline(limit, ls="--", color="grey", label=f"alarm above {limit:g}%")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return fig


def prevalence_figure(
    findings: pd.DataFrame, labels: list[str], t: MonitorThresholds
) -> Figure | None:
    """Predicted share per reported class, with its share on the validation images dashed in
    the same colour."""
    checks = [c for c in dict.fromkeys(findings["check"]) if c.startswith("prevalence:")]
    checks = [c for c in checks if np.isfinite(_series(findings, c, "value", labels)).any()]
    if not checks:
        return None
    fig, ax = _over_batches(findings, labels, "Predicted prevalence", "share of scored files (%)")
    for check in checks:
        name = check.partition(":")[2]
        share = 100 * _series(findings, check, "value", labels)
        line = _line(ax, share, _small(findings, check, labels, t), label=f"called {name}")
        validation = np.nanmax(_series(findings, check, "reference", labels))
        ax.axhline(100 * validation, ls="--", color=line.get_color(),
                   label=f"{name} on validation")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return fig


def _last_batch_panels(
    batch: Batch, reference: MonitorReference
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(measure, reference values, batch values) for each measure both sides have."""
    panels = []
    if reference.validation_scores is not None and "ood_score" in batch.table:
        panels.append(("ood_score", reference.validation_scores, batch.ok["ood_score"]))
    for column in INTENSITY:
        trained = reference.intensity_samples(column)
        if trained is not None and column in batch.table:
            panels.append((column, trained, batch.table[column]))
    finite = [(n, np.asarray(r, float), np.asarray(b, float)) for n, r, b in panels]
    finite = [(n, r[np.isfinite(r)], b[np.isfinite(b)]) for n, r, b in finite]
    return [(n, r, b) for n, r, b in finite if len(r) and len(b)]


def last_batch_figure(batch: Batch, reference: MonitorReference) -> Figure | None:
    """The last batch's distributions over the reference's, on shared bins (densities, so
    batches of any size compare)."""
    panels = _last_batch_panels(batch, reference)
    if not panels:
        return None
    fig = Figure(figsize=(4 * len(panels), 3.4), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, trained, values) in zip(axes, panels, strict=True):
        bins = np.histogram_bin_edges(np.concatenate([trained, values]), bins=30)
        ax.hist(trained, bins=bins, density=True, color="lightgrey", ec="grey",
                label=f"reference (n={len(trained)})")  # fmt: skip
        ax.hist(values, bins=bins, density=True, histtype="step", lw=2, color="tab:blue",
                label=f"last batch (n={len(values)})")  # fmt: skip
        ax.set(title=name, ylabel="density")
        ax.legend(fontsize=7)
    fig.suptitle(f"Last batch ({batch.label}) against the reference", fontsize=10)
    return fig


def build_figures(
    findings: pd.DataFrame, batches: Sequence[Batch], reference: MonitorReference,
    t: MonitorThresholds,
) -> dict[str, tuple[str, Figure]]:  # fmt: skip
    """Figure key (``FIGURE_FILES``) -> (caption, figure), for the figures there is data for."""
    labels = [batch.label for batch in batches]
    built = {
        "psi": (f"PSI per batch (dashed: the alarm level; red rings: alarms; PSI below "
                f"{PSI_SHOWN_FROM:g} drawn at {PSI_SHOWN_FROM:g}{_HOLLOW})",
                psi_figure(findings, labels, t)),
        "out_of_scope": (f"Share of files out of scope (dashed: the alarm level{_HOLLOW})",
                         scope_figure(findings, labels, t)),
        "prevalence": (f"Predicted prevalence (dashed: on the validation images{_HOLLOW})",
                       prevalence_figure(findings, labels, t)),
        "last_batch": ("The last batch against the reference",
                       last_batch_figure(batches[-1], reference)),
    }  # fmt: skip
    return {key: pair for key, pair in built.items() if pair[1] is not None}


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# --- the page -------------------------------------------------------------------------------------

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d2327; margin: 0 auto; padding: 1em 1.5em;
       max-width: 64em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #dde3e8; }
.verdict { padding: 0.7em 1em; border-radius: 4px; margin: 1em 0; }
.drift { background: #fff1ef; border-left: 6px solid #c0392b; }
.stable { background: #eef7f0; border-left: 6px solid #2e7d32; }
table.checks { border-collapse: collapse; width: 100%; margin: 0.4em 0 1.4em; font-size: 0.9em; }
.checks th { background: #eef1f4; text-align: left; }
.checks th, .checks td { padding: 0.3em 0.5em; border-bottom: 1px solid #dde3e8; }
.checks td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
tr.alarm td { background: #fff1ef; } .alarm-text { color: #a0281b; font-weight: 600; }
.muted { color: #5f6b73; } code { font-size: 0.85em; color: #5f6b73; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #5f6b73; font-size: 0.85em; }
li, td, p { overflow-wrap: anywhere; }
"""


def _number(value: float, check: str) -> str:
    if value is None or not np.isfinite(value):
        return "&ndash;"
    if check.startswith(_SHARES):
        return f"{100 * value:.1f}%"
    return f"{value:.1f}" if check == "ood_score" else f"{value:.3f}"


def _result(row: dict, alarms: list[str]) -> str:
    if row["alarm"]:
        start = f"{row['batch']}: {row['check']} "
        reason = next((a.removeprefix(start) for a in alarms if a.startswith(start)), "drift")
        return f"<span class='alarm-text'>{escape(reason)}</span>"
    return escape(row["note"]) if row["note"] else "<span class='muted'>no drift</span>"


def _batch_table(rows: list[dict], alarms: list[str]) -> str:
    head = ("<tr><th>what is checked</th><th>files</th><th>this batch</th><th>reference</th>"
            "<th>PSI</th><th>test p</th><th>result</th></tr>")  # fmt: skip
    body = []
    for row in rows:
        check, psi, p = row["check"], row["psi"], row["p_value"]
        cells = [
            f"{escape(plain_words(check))}<br><code>{escape(check)}</code>",
            f"<td class='num'>{row['n']}</td>",
            f"<td class='num'>{_number(row['value'], check)}</td>",
            f"<td class='num'>{_number(row['reference'], check)}</td>",
            f"<td class='num'>{'&ndash;' if psi is None or np.isnan(psi) else f'{psi:.3f}'}</td>",
            f"<td class='num'>{'&ndash;' if p is None or np.isnan(p) else format_p(p)}</td>",
            f"<td>{_result(row, alarms)}</td>",
        ]
        css = " class='alarm'" if row["alarm"] else ""
        body.append(f"<tr{css}><td>{cells[0]}</td>{''.join(cells[1:])}</tr>")
    return f"<table class='checks'>{head}{''.join(body)}</table>"


def _verdict(record: dict, findings: pd.DataFrame) -> str:
    """The answer first, in plain words: did anything drift, where, and what it means."""
    batches, alarms = record["batches"], record["alarms"]
    files = sum(batch["files"] for batch in batches)
    if not alarms:
        return (
            f"<div class='verdict stable'><b>No drift found</b> in {len(batches)} batch(es), "
            f"{files} files: by every check that could be run, the images and the model's "
            "answers resemble those of the images it was trained and validated on.</div>"
        )
    flagged = findings[findings["alarm"]]
    items = "".join(
        f"<li><b>{escape(label)}</b>: "
        f"{escape('; '.join(short_words(c) for c in group['check']))}</li>"
        for label, group in flagged.groupby("batch", sort=False)
    )
    return (
        f"<div class='verdict drift'><b>Drift found</b> in {flagged['batch'].nunique()} of "
        f"{len(batches)} batch(es). What changed:<ul>{items}</ul>"
        "An alarm does not by itself mean the model's answers are wrong. It means these images "
        "(or patients) differ from those the model was validated on, so its validated accuracy "
        "may not hold for them. Find out what changed (scanner, protocol, site, referrals) "
        "before relying on the results of these batches.</div>"
    )


def _batch_sections(record: dict, findings: pd.DataFrame) -> str:
    sections = []
    for batch in record["batches"]:
        rows = findings[findings["batch"] == batch["label"]].to_dict("records")
        counts = f"{batch['files']} files: {batch['ok']} scored, {batch['error']} not scored"
        if batch["out_of_scope"] is not None:
            counts += f", {batch['out_of_scope']} out of scope"
        table = _batch_table(rows, record["alarms"])
        sections.append(f"<h3>{escape(batch['label'])}</h3><p class='muted'>{counts}</p>{table}")
    return "".join(sections)


def _alarm_list(alarms: list[str]) -> str:
    if not alarms:
        return "<p>None.</p>"
    return "<ul>" + "".join(f"<li>{escape(alarm)}</li>" for alarm in alarms) + "</ul>"


def _reference(record: dict) -> str:
    ref = record["reference"]
    held = [
        f"validation OOD scores of {ref['validation_scores']} images"
        if ref["validation_scores"] else "no OOD reference",
        f"validation probabilities of {ref['validation_probabilities']} images"
        if ref["validation_probabilities"] else "no validation probabilities",
        f"intensity samples of {ref['intensity_samples']} training images"
        if ref["intensity_samples"] else "no intensity samples",
        f"DICOM headers of {ref['dicom_images']} training files"
        if ref["dicom_images"] else "no DICOM headers",
    ]  # fmt: skip
    return (
        f"<p>Model <code>{escape(record['model'])}</code> ({escape(ref['kind'])}), classes "
        f"{escape(', '.join(ref['classes']))}. Its reference holds {escape('; '.join(held))}.</p>"
    )


def _method(t: dict) -> str:
    return (
        "<p class='muted'>A distribution alarms when its population stability index (PSI, "
        f"10 bins at the reference's deciles) is at least {t['psi_alarm']:g} and a test "
        f"(two-sample Kolmogorov-Smirnov; chi-square for header values) rejects at p &lt; "
        f"{t['alpha']:g}: PSI measures how large a shift is, the test whether a batch of its "
        f"size could show it by chance. The out-of-scope share alarms above "
        f"{100 * t['max_out_of_scope']:g}%; a predicted prevalence alarms when it moves more "
        f"than {100 * t['max_prevalence_shift']:g} percentage points from validation and a "
        f"two-proportion z-test rejects at p &lt; {t['alpha']:g}. A check on fewer than "
        f"{t['min_files']} files is reported but never alarms.</p>"
    )


def _figures(pngs: dict[str, bytes]) -> str:
    return "".join(
        f"<figure><img alt='{escape(caption)}' src='data:image/png;base64,"
        f"{base64.b64encode(data).decode()}'><figcaption>{escape(caption)}</figcaption></figure>"
        for caption, data in pngs.items()
    )


def render_page(record: dict, findings: pd.DataFrame, pngs: dict[str, bytes]) -> str:
    """The whole page as a string; ``pngs`` maps a caption to PNG bytes."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Drift monitor</title><style>{_STYLE}</style></head><body>
<h1>Drift monitor</h1>{_reference(record)}{_verdict(record, findings)}
<h2>Alarms</h2>{_alarm_list(record["alarms"])}
<h2>Batches, in the order given</h2>{_batch_sections(record, findings)}
<h2>Figures</h2>{_figures(pngs)}
<h2>How the checks decide</h2>{_method(record["thresholds"])}
</body></html>
"""


def _csv_text(findings: pd.DataFrame) -> str:
    """The findings as CSV, no text cell readable as a spreadsheet formula."""
    table = findings.copy()
    for column in ("batch", "check", "note"):
        risky = table[column].str.startswith(("=", "+", "-", "@", "\t", "\r", "'"))
        table[column] = table[column].where(~risky, "'" + table[column])
    return table.to_csv(index=False, lineterminator="\n")


def write_outputs(
    out_dir: Path, record: dict, findings: pd.DataFrame, batches: Sequence[Batch],
    reference: MonitorReference, t: MonitorThresholds,
) -> Path:  # fmt: skip
    """Write every output into ``out_dir`` (replacing a previous run's); the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out_dir / MONITOR_CSV, _csv_text(findings))
    atomic.write_json(out_dir / MONITOR_JSON, record)
    figures = build_figures(findings, batches, reference, t)
    pngs = {}
    for key, file in FIGURE_FILES.items():
        if key not in figures:
            (out_dir / file).unlink(missing_ok=True)  # a previous run's figure would mislead
            continue
        caption, fig = figures[key]
        pngs[caption] = png(fig)
        atomic.write_bytes(out_dir / file, pngs[caption])
    atomic.write_text(out_dir / MONITOR_HTML, render_page(record, findings, pngs))
    return out_dir / MONITOR_HTML
