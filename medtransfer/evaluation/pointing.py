"""The pointing game: does a heatmap's maximum land on the finding?

A localisation score that needs no segmentation, only where each finding is (Zhang et al. 2018,
"Top-down neural attention by excitation backprop", IJCV). It scores any heatmap, whatever
made it (``gradcam.grad_cam`` or another method), so it lives apart from the CAM computation
and needs nothing but NumPy. ``benchmarks/gradcam_pointing.py`` plays it on the synthetic
chest data, where every nodule's position is known.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Zhang et al. 2018 count a pointing hit when the maximum lies on the object "with a 15-pixel
# tolerance", which absorbs the coarseness of a map upsampled from a small feature grid. Pixels
# of the heatmap, i.e. of the image the heatmap was computed for: a caller who works at another
# scale should scale it.
POINTING_TOLERANCE = 15.0


def heatmap_peaks(heatmaps: np.ndarray) -> np.ndarray:
    """Where each heatmap points: (row, col) [N, 2] of its maximum, NaN for a constant map.

    Ties are resolved to the centroid of the maximal pixels. They are common, not a corner
    case: bilinear upsampling clamps at the border, so a maximum in an edge cell of the
    feature grid becomes a plateau several pixels wide, and its first pixel in reading order
    would sit at the plateau's corner rather than where the cell is. A constant map (no
    positive evidence anywhere) points nowhere.
    """
    heatmaps = np.asarray(heatmaps, np.float64)
    if heatmaps.ndim != 3:
        raise ValueError(f"heatmaps must be [N, H, W], got shape {heatmaps.shape}")
    peaks = np.full((len(heatmaps), 2), np.nan)
    for i, heatmap in enumerate(heatmaps):
        top, bottom = heatmap.max(), heatmap.min()
        if not top > bottom:
            continue
        rows, cols = np.nonzero(heatmap >= top - 1e-6 * (top - bottom))
        peaks[i] = rows.mean(), cols.mean()
    return peaks


def point_hits(
    points: np.ndarray,
    findings: Sequence[Sequence[float]],
    *,
    tolerance: float = POINTING_TOLERANCE,
) -> np.ndarray:
    """Whether each point (row, col) lies within ``tolerance`` pixels of its finding: [N] bool.

    A finding is a circle ``(row, col, radius)`` (e.g. ``Nodule.in_pixels(size)``) or a box
    ``(row_min, col_min, row_max, col_max)``, in pixel coordinates (pixel centres at integers,
    box bounds inclusive). A NaN point (a constant heatmap) is a miss.
    """
    points = np.asarray(points, np.float64).reshape(-1, 2)
    if len(points) != len(findings):
        raise ValueError(f"{len(points)} points but {len(findings)} findings")
    hits = np.zeros(len(points), bool)
    for i, ((row, col), finding) in enumerate(zip(points, findings, strict=True)):
        if np.isnan(row) or np.isnan(col):
            continue
        if len(finding) == 3:
            center_row, center_col, radius = finding
            distance = np.hypot(row - center_row, col - center_col) - radius
        elif len(finding) == 4:
            row_min, col_min, row_max, col_max = finding
            d_row = max(row_min - row, 0.0, row - row_max)
            d_col = max(col_min - col, 0.0, col - col_max)
            distance = np.hypot(d_row, d_col)
        else:
            raise ValueError(f"a finding is (row, col, radius) or a box of 4, got {finding!r}")
        hits[i] = distance <= tolerance
    return hits


def pointing_game(
    heatmaps: np.ndarray,
    findings: Sequence[Sequence[float]],
    *,
    tolerance: float = POINTING_TOLERANCE,
) -> tuple[int, int]:
    """(hits, n): how many heatmaps have their maximum on their finding (Zhang et al. 2018).

    A hit when the maximum (``heatmap_peaks``) lies inside the finding or within ``tolerance``
    pixels of it; the default, 15 px, is the tolerance of Zhang et al. A finding is a circle
    ``(row, col, radius)`` or a box ``(row_min, col_min, row_max, col_max)``, in the heatmap's
    pixels. The game scores localisation only, on images known to hold a finding; a constant
    heatmap is a miss. Report it beside the hit rate of a random point and of the image centre
    at the same tolerance: with a generous tolerance a fixed point can score well.
    """
    hits = point_hits(heatmap_peaks(heatmaps), findings, tolerance=tolerance)
    return int(hits.sum()), len(hits)
