"""Figures of a site report: the sites in feature space, their pixel values, their labels.

Built like ``plots`` (a ``Figure`` without pyplot), so they render headless for the report
folder and inline in a notebook.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from medtransfer.evaluation.site_findings import SiteReport
from medtransfer.evaluation.site_pixels import HISTOGRAM_BINS


def embedding_figure(report: SiteReport) -> Figure:
    """The features' first two principal components, one colour per site."""
    fig = Figure(figsize=(5.5, 4.5), dpi=110)
    ax = fig.subplots()
    sites = np.asarray(report.embedding_sites)
    for site in report.sites:
        points = report.embedding[sites == site]
        ax.scatter(points[:, 0], points[:, 1], s=10, alpha=0.6, label=f"{site} (n={len(points)})")
    auroc = report.separability.get("auroc")
    title = "backbone features, PCA"
    if auroc is not None:
        title += f" (site AUROC {auroc:.2f})"
    ax.set(xlabel="PC 1", ylabel="PC 2", title=title)
    ax.legend(fontsize=8, markerscale=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def intensity_figure(report: SiteReport) -> Figure:
    """Pixel-value histograms per site (the model's input pixels, density)."""
    fig = Figure(figsize=(6, 3.8), dpi=110)
    ax = fig.subplots()
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for site in report.sites:
        summary = report.intensity.get(site)
        if summary:
            density = np.asarray(summary["histogram"]) * HISTOGRAM_BINS
            ax.plot(centres, density, lw=2, label=f"{site} (mean {summary['mean']:.2f})")
    ax.set(xlabel="pixel value (model input, [0, 1])", ylabel="density", title="intensity by site")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def prevalence_figure(report: SiteReport) -> Figure:
    """Label prevalence per site, one group of bars per class shown."""
    fig = Figure(figsize=(5.5, 3.8), dpi=110)
    ax = fig.subplots()
    classes = list(next(iter(report.prevalence.values())).keys())
    width = 0.8 / max(len(report.sites), 1)
    for index, site in enumerate(report.sites):
        values = [report.prevalence[site][c] for c in classes]
        ax.bar(np.arange(len(classes)) + index * width, values, width, label=site)
    ax.set_xticks(np.arange(len(classes)) + width * (len(report.sites) - 1) / 2, classes)
    ax.set(ylabel="prevalence", ylim=(0, 1), title="label prevalence by site")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
