"""Figures for reports and notebooks.

Functions build ``matplotlib.figure.Figure`` objects directly instead of going through pyplot:
no global state, nothing opens a window on a headless server, and notebooks still display a
returned figure inline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve


def roc_figure(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    *,
    task: str,
    positive_class: str | None = None,
    title: str = "ROC",
    points: dict[str, dict[str, tuple[float, float]]] | None = None,
) -> Figure:
    """One ROC curve per class (only the positive class's for a binary task), AUROC in legend.

    ``points`` marks operating points on a class's curve: class -> label -> (1 - specificity,
    sensitivity), e.g. the thresholds chosen on validation as they fare on this split."""
    fig = Figure(figsize=(5, 5), dpi=110)
    ax = fig.subplots()
    shown = [positive_class or classes[-1]] if task == "binary" else classes
    markers = "oDs^vP*X"
    for name in shown:
        k = classes.index(name)
        known = ~np.isnan(y_true[:, k])
        y, p = y_true[known, k], probabilities[known, k]
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        (line,) = ax.plot(
            fpr, tpr, lw=2, label=f"{name} (AUROC {roc_auc_score(y, p):.3f}, n={len(y)})"
        )
        for i, (label, (x, sensitivity)) in enumerate((points or {}).get(name, {}).items()):
            ax.plot(
                x, sensitivity, ls="none", marker=markers[i % len(markers)], ms=7, mfc="white",
                mec=line.get_color(), mew=1.5, label=f"{name}: {label}" if shown[1:] else label,
            )  # fmt: skip
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(
        xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)"
    )
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title, aspect="equal")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def history_figure(history: dict[str, list[float]], phases: list[dict] | None = None) -> Figure:
    """Loss and AUROC per epoch, training vs validation.

    ``phases`` (a run's ``run.info["phases"]``) marks where each fine-tuning phase began: a jump
    in the curves there is the backbone being unfrozen, not instability.
    """
    fig = Figure(figsize=(9, 3.5), dpi=110)
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "auc"), strict=True):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + metric)
            if values is not None:
                epochs = np.arange(1, len(values) + 1)
                ax.plot(epochs, values, style, label=(prefix or "train_") + metric)
        for phase in (phases or [])[1:]:
            boundary = phase["first_epoch"] - 0.5
            ax.axvline(boundary, color="grey", ls=":", lw=1.5)
            ax.text(
                boundary,
                0.98,
                f" {phase['name']}",
                transform=ax.get_xaxis_transform(),
                fontsize=8,
                va="top",
                color="grey",
            )
        ax.set(xlabel="epoch", title="AUROC" if metric == "auc" else "loss")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def reliability_figure(calibration: dict, title: str = "Reliability") -> Figure:
    """Observed frequency against mean predicted probability per bin (the diagonal is perfect),
    before and, when fitted, after temperature scaling; bar heights show how many images each
    bin holds, so an empty or tiny bin is not over-read."""
    fig = Figure(figsize=(5, 5.6), dpi=110)
    ax, counts = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    shown = [("uncalibrated", "model")]
    if "temperature_scaled" in calibration:
        shown.append(("temperature_scaled", f"T = {calibration['temperature']:.2f}"))
    for key, label in shown:
        bins = calibration[key]["bins"]
        predicted = np.array(bins["mean_predicted"], dtype=float)
        observed = np.array(bins["observed_frequency"], dtype=float)
        keep = ~np.isnan(predicted)
        ece = calibration[key]["ece"]
        ax.plot(
            predicted[keep], observed[keep], marker="o", lw=1.5, label=f"{label} (ECE {ece:.3f})"
        )
    bins = calibration["uncalibrated"]["bins"]
    low, high = np.array(bins["bin_low"]), np.array(bins["bin_high"])
    counts.bar(low, bins["count"], width=high - low, align="edge", color="lightgrey", ec="grey")
    ax.set(ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="upper left", fontsize=8)
    counts.set(xlabel="predicted probability", ylabel="images")
    fig.tight_layout()
    return fig


def cam_overlay_figure(
    images: np.ndarray,
    heatmaps: np.ndarray,
    titles: Sequence[str] | None = None,
    alpha: float = 0.4,
    *,
    cmap: str = "jet",
    columns: int = 4,
) -> Figure:
    """One panel per image: the image in grey under its heatmap (``gradcam.grad_cam``) in
    ``cmap`` at ``alpha``, so a reader sees what the map points at.

    Images [N, H, W] or [N, H, W, C] (colour shown as its channel mean); heatmaps [N, h, w] are
    stretched over their image if the sizes differ.
    """
    images = np.asarray(images, np.float32)
    heatmaps = np.asarray(heatmaps, np.float32)
    if images.ndim == 4:
        images = images.mean(axis=-1)
    if images.ndim != 3 or heatmaps.ndim != 3 or len(images) != len(heatmaps):
        raise ValueError(
            f"need images [N, H, W(, C)] and heatmaps [N, h, w], got {images.shape} and "
            f"{heatmaps.shape}"
        )
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    n = len(images)
    cols = max(1, min(columns, n))
    rows = -(-n // cols)
    fig = Figure(figsize=(2.6 * cols, 2.8 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i >= n:
            fig.delaxes(ax)
            continue
        height, width = images[i].shape
        extent = (-0.5, width - 0.5, height - 0.5, -0.5)
        ax.imshow(images[i], cmap="gray", vmin=0.0, vmax=1.0, extent=extent)
        ax.imshow(heatmaps[i], cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha, extent=extent)
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    return fig
