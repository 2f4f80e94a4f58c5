"""Before training on several hospitals: how do the sites differ?

``site_report`` (CLI ``medtransfer sites``) describes each site of a spec's data (the
manifest's ``site`` column: ``data.site_column`` or ``data.site_tag``) and writes ``sites.json``
plus two figures (``site_plots``):

- image counts per split;
- intensity summaries of the pixels the model sees (decoded, windowed, resized to
  ``image.size``) with a histogram per site (``sites_intensity.png``), and the most common
  values of the safe DICOM acquisition tags, never a patient tag (``site_pixels``);
- label prevalence per site, with a **warning when the sites differ strongly**: a model can then
  learn "which hospital" as a shortcut for "which label" (``site_labels`` states the rule);
- **how separable the sites are**: the cross-validated AUROC of a classifier predicting the
  site from pooled backbone features, of a finished run (``model=RUN_DIR``) or of the spec's
  backbone (random weights, when it has none, and the report says so), and a PCA of the same
  features coloured by site (``sites_embedding.png``; ``site_features``).

Intensity, tags and features use at most ``max_per_site`` images per site (a seeded sample);
counts and prevalence use every image. The result is a ``site_findings.SiteReport``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtransfer import atomic
from medtransfer.data.manifest import SPLITS, build_manifest
from medtransfer.data.pipeline import load_spec_images
from medtransfer.errors import SpecError
from medtransfer.evaluation.site_features import backbone_features, domain_separability, pca_2d
from medtransfer.evaluation.site_findings import (
    EMBEDDING_FILE,
    INTENSITY_FILE,
    SITES_FILE,
    SiteReport,
)
from medtransfer.evaluation.site_labels import prevalence_by_site
from medtransfer.evaluation.site_pixels import intensity_summary, sample_per_site, tag_summary
from medtransfer.evaluation.site_plots import embedding_figure, intensity_figure
from medtransfer.spec import Spec


def site_report(
    spec: Spec,
    out_dir: str | Path | None = None,
    *,
    model: str | Path | None = None,
    workers: int | None = None,
    max_per_site: int = 1000,
    seed: int = 0,
    folds: int = 5,
) -> SiteReport:
    """Describe the spec's sites (see the module docstring); write ``sites.json`` and the
    figures into ``out_dir`` when given. ``model``: a run directory whose backbone gives the
    features for separability and the embedding (default: the spec's backbone)."""
    manifest = _site_manifest(spec)
    sites = sorted(manifest["site"].unique())
    prevalence, tests, warnings = prevalence_by_site(manifest, spec)
    sample = sample_per_site(manifest, max_per_site, seed)
    images = load_spec_images(spec, sample, workers=workers)
    sample_sites = sample["site"].to_numpy()
    intensity = {site: intensity_summary(images[sample_sites == site]) for site in sites}
    tags = tag_summary(sample)
    features, described = backbone_features(spec, images, model)
    separability = _separability(spec, sites, sample, features, folds, seed)
    separability["features"] = described
    pair = _source_vs_target(spec, sites, sample, features, separability, folds, seed)
    if pair is not None:
        separability["source_vs_target"] = pair
    report = SiteReport(
        sites=sites,
        counts=_counts(manifest),
        intensity=intensity,
        tags=tags,
        prevalence=prevalence,
        prevalence_tests=tests,
        separability=separability,
        warnings=warnings,
        embedding=pca_2d(features),
        embedding_sites=list(sample_sites),
    )
    if out_dir is not None:
        _write(report, Path(out_dir))
    return report


def _site_manifest(spec: Spec) -> pd.DataFrame:
    """The spec's manifest with its sites as text, or a SpecError naming the missing setting."""
    manifest = build_manifest(spec)
    if not (spec.data.site_column or spec.data.site_tag):
        raise SpecError(
            f"{spec.origin}: data: no sites to compare; set data.site_column (manifest) or "
            "data.site_tag (dicom_folder)"
        )
    manifest["site"] = manifest["site"].astype(str)
    return manifest


def _counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per split and in all, per site (every image, not the sample)."""
    return {
        site: {
            **{split: int((group["split"] == split).sum()) for split in SPLITS},
            "total": len(group),
        }
        for site, group in manifest.groupby("site")
    }


def _separability(
    spec: Spec, sites: list[str], sample: pd.DataFrame, features: np.ndarray, folds: int, seed: int
) -> dict[str, Any]:
    """How well the sample's sites can be told apart from ``features`` (``domain_separability``)."""
    sample_sites, patients = sample["site"].to_numpy(), sample["patient"].to_numpy()
    return domain_separability(features, sample_sites, patients, folds=folds, seed=seed)


def _source_vs_target(
    spec: Spec,
    sites: list[str],
    sample: pd.DataFrame,
    features: np.ndarray,
    separability: dict[str, Any],
    folds: int,
    seed: int,
) -> dict[str, float] | None:
    """{"SOURCE vs TARGET": AUROC} for the spec's domain adaptation: how separable the sites
    it adapts from are from those it adapts to (None without both, or when not computable)."""
    source, target = spec.domain_adaptation.source, spec.domain_adaptation.target
    if not (source and target) or separability.get("auroc") is None:
        return None
    name = f"{'+'.join(source)} vs {'+'.join(target)}"
    if len(sites) == 2 and set(source + target) == set(sites):
        return {name: separability["auroc"]}  # the same question
    sample_sites = sample["site"].to_numpy()
    chosen = np.isin(sample_sites, source + target)
    pair = domain_separability(
        features[chosen],
        np.where(np.isin(sample_sites[chosen], source), "source", "target"),
        sample["patient"].to_numpy()[chosen],
        folds=folds,
        seed=seed,
    )
    return None if pair.get("auroc") is None else {name: pair["auroc"]}


def _write(report: SiteReport, out: Path) -> None:
    """sites.json and the two figures a reader opens first (embedding, intensity)."""
    out.mkdir(parents=True, exist_ok=True)
    report.out_dir = out
    atomic.write_json(out / SITES_FILE, report.to_json())
    embedding_figure(report).savefig(out / EMBEDDING_FILE)
    intensity_figure(report).savefig(out / INTENSITY_FILE)
