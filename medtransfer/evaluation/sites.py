"""Before training on several hospitals: how do the sites differ?

``site_report`` (CLI ``medtransfer sites``) describes each site of a spec's data (the
manifest's ``site`` column: ``data.site_column`` or ``data.site_tag``) and writes ``sites.json``
plus two figures:

- image counts per split;
- intensity summaries of the pixels the model sees (decoded, windowed, resized to
  ``image.size``): mean, sd and percentiles, with a histogram per site (``sites_intensity.png``);
- the safe acquisition tags of DICOM files (Manufacturer, ManufacturerModelName, ViewPosition,
  BitsStored, ...: never a patient tag), most common values per site;
- label prevalence per site, with a **warning when the sites differ strongly**: a model can then
  learn "which hospital" as a shortcut for "which label". The rule, per class (binary: the
  positive class): a chi-square test of site x (class / not class) with p < 0.01 **and** an
  absolute prevalence difference above 0.1 between some two sites. Both are needed: with many
  images a clinically trivial difference is "significant", with few a large one is noise.
- **how separable the sites are**: a logistic regression (standardised features, L2, C=1)
  predicting the site from pooled backbone features, scored by 5-fold cross-validated AUROC
  (folds keep each patient's images together; macro one-vs-rest for more than two sites). 0.5:
  the backbone cannot tell the sites apart; near 1: every image carries its site, and
  adaptation (``domain_adaptation`` in the spec) is worth trying. Features come from a
  finished run's backbone (``model=RUN_DIR``), else from the spec's backbone with its weights;
  with ``weights: none`` (or ImageNet weights that cannot be fetched offline) they are
  *random* convolutional features, which still register intensity and texture shifts but not
  what a trained network would attend to; the report says which.
- a PCA of the same features in 2-D, coloured by site (``sites_embedding.png``).

Intensity, tags and features use at most ``max_per_site`` images per site (a seeded sample);
counts and prevalence use every image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import chi2_contingency

from medtransfer import atomic
from medtransfer.data.manifest import SPLITS, build_manifest, read_tags, targets
from medtransfer.data.pipeline import load_spec_images
from medtransfer.errors import SpecError, WeightsUnavailableError
from medtransfer.spec import Spec

SITES_FILE = "sites.json"
EMBEDDING_FILE = "sites_embedding.png"
INTENSITY_FILE = "sites_intensity.png"
PREVALENCE_P = 0.01
PREVALENCE_DIFFERENCE = 0.1
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
SUMMARY_TAGS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "ViewPosition",
    "BodyPartExamined",
    "BitsStored",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
)
_TOP_VALUES = 5
_HISTOGRAM_BINS = 64


@dataclass
class SiteReport:
    """What ``site_report`` found; ``to_json()`` is ``sites.json``."""

    sites: list[str]
    counts: dict[str, dict[str, int]]
    intensity: dict[str, dict[str, Any]]
    tags: dict[str, dict[str, dict[str, int]]]
    prevalence: dict[str, dict[str, float]]
    prevalence_tests: list[dict[str, Any]]
    separability: dict[str, Any]
    warnings: list[str]
    out_dir: Path | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)  # [n, 2] PCA coordinates
    embedding_sites: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "sites": self.sites,
            "counts": self.counts,
            "intensity": self.intensity,
            "dicom_tags": self.tags,
            "prevalence": self.prevalence,
            "prevalence_tests": self.prevalence_tests,
            "prevalence_rule": (
                f"warn when a class's prevalence differs between sites with chi-square "
                f"p < {PREVALENCE_P} and an absolute difference > {PREVALENCE_DIFFERENCE}"
            ),
            "separability": self.separability,
            "warnings": self.warnings,
        }

    def summary(self) -> str:
        total = sum(c["total"] for c in self.counts.values())
        lines = [f"{len(self.sites)} site(s), {total} images (train/val/test):"]
        width = max(len(s) for s in self.sites)
        for site in self.sites:
            c, i = self.counts[site], self.intensity.get(site, {})
            prevalence = ", ".join(f"{k} {v:.2f}" for k, v in self.prevalence[site].items())
            pixels = (
                f"intensity mean {i['mean']:.3f} sd {i['sd']:.3f} "
                f"[p1 {i['p1']:.3f}, p50 {i['p50']:.3f}, p99 {i['p99']:.3f}]"
                if i
                else "no pixels read"
            )
            lines.append(
                f"  {site:<{width}}  {c['total']:6d} ({c['train']}/{c['val']}/{c['test']})  "
                f"{pixels}  prevalence: {prevalence}"
            )
        for site, tags in self.tags.items():
            shown = "; ".join(
                f"{tag} " + ", ".join(f"{v or '-'} ({n})" for v, n in values.items())
                for tag, values in tags.items()
            )
            if shown:
                lines.append(f"  DICOM {site}: {shown}")
        for test in self.prevalence_tests:
            lines.append(
                f"  prevalence of {test['class']}: max difference {test['max_difference']:.3f}, "
                f"chi-square p = {test['p_value']:.2g}"
            )
        s = self.separability
        if s.get("auroc") is not None:
            lines.append(
                f"  site separability: domain-classifier AUROC {s['auroc']:.3f} "
                f"({s['folds']}-fold CV, {s['n_images']} images; features: {s['features']})"
            )
            for name, value in s.get("source_vs_target", {}).items():
                lines.append(f"    {name}: AUROC {value:.3f}")
        else:
            lines.append(f"  site separability: not computed ({s.get('reason')})")
        lines += [f"WARNING: {w}" for w in self.warnings]
        if self.out_dir is not None:
            lines.append(
                f"wrote {self.out_dir / SITES_FILE}, {EMBEDDING_FILE} and {INTENSITY_FILE}"
            )
        return "\n".join(lines)


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
    manifest = build_manifest(spec)
    if not (spec.data.site_column or spec.data.site_tag):
        raise SpecError(
            f"{spec.origin}: data: no sites to compare; set data.site_column (manifest) or "
            "data.site_tag (dicom_folder)"
        )
    manifest["site"] = manifest["site"].astype(str)
    sites = sorted(manifest["site"].unique())
    counts = {
        site: {
            **{split: int((group["split"] == split).sum()) for split in SPLITS},
            "total": len(group),
        }
        for site, group in manifest.groupby("site")
    }
    prevalence, tests, warnings = prevalence_by_site(manifest, spec)
    sample = _sample(manifest, max_per_site, seed)
    images = load_spec_images(spec, sample, workers=workers)
    sample_sites = sample["site"].to_numpy()
    intensity = {site: _intensity(images[sample_sites == site]) for site in sites}
    tags = _tag_summary(sample)
    features, described = _features(spec, images, model)
    separability = domain_separability(
        features, sample_sites, sample["patient"].to_numpy(), folds=folds, seed=seed
    )
    separability["features"] = described
    adaptation = spec.domain_adaptation
    if adaptation.source and adaptation.target and separability.get("auroc") is not None:
        name = f"{'+'.join(adaptation.source)} vs {'+'.join(adaptation.target)}"
        if len(sites) == 2 and set(adaptation.source + adaptation.target) == set(sites):
            separability["source_vs_target"] = {name: separability["auroc"]}  # the same question
        else:
            chosen = np.isin(sample_sites, adaptation.source + adaptation.target)
            pair = domain_separability(
                features[chosen],
                np.where(np.isin(sample_sites[chosen], adaptation.source), "source", "target"),
                sample["patient"].to_numpy()[chosen],
                folds=folds,
                seed=seed,
            )
            if pair.get("auroc") is not None:
                separability["source_vs_target"] = {name: pair["auroc"]}
    embedding = _pca_2d(features)
    report = SiteReport(
        sites=sites,
        counts=counts,
        intensity=intensity,
        tags=tags,
        prevalence=prevalence,
        prevalence_tests=tests,
        separability=separability,
        warnings=warnings,
        embedding=embedding,
        embedding_sites=list(sample_sites),
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report.out_dir = out
        atomic.write_json(out / SITES_FILE, report.to_json())
        embedding_figure(report).savefig(out / EMBEDDING_FILE)
        intensity_figure(report).savefig(out / INTENSITY_FILE)
    return report


# --- labels ------------------------------------------------------------------------------------


def prevalence_by_site(
    manifest: pd.DataFrame, spec: Spec
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]], list[str]]:
    """Per-site share of each class (binary: the positive class; multilabel: among images
    whose label is known), one chi-square test per class, and the warnings the rule raises."""
    y = targets(manifest, spec.classes)
    sites = manifest["site"].astype(str).to_numpy()
    names = sorted(set(sites))
    shown = [spec.positive] if spec.task == "binary" else list(spec.classes)
    prevalence: dict[str, dict[str, float]] = {site: {} for site in names}
    tests, warnings = [], []
    for name in shown:
        column = y[:, spec.classes.index(name)]
        known = ~np.isnan(column)
        table = []
        for site in names:
            values = column[(sites == site) & known]
            positives = int(values.sum())
            table.append([positives, len(values) - positives])
            prevalence[site][name] = positives / len(values) if len(values) else float("nan")
        if len(names) < 2:
            continue
        rates = [prevalence[site][name] for site in names]
        rates = [r for r in rates if not np.isnan(r)]
        table = np.array([row for row in table if sum(row)])
        difference = float(max(rates) - min(rates)) if rates else 0.0
        p_value = 1.0
        if len(table) >= 2 and (table.sum(axis=0) > 0).all():
            p_value = float(chi2_contingency(table)[1])
        flagged = p_value < PREVALENCE_P and difference > PREVALENCE_DIFFERENCE
        tests.append(
            {
                "class": name,
                "p_value": p_value,
                "max_difference": difference,
                "warning": flagged,
            }
        )
        if flagged:
            low = min(names, key=lambda s: prevalence[s][name])
            high = max(names, key=lambda s: prevalence[s][name])
            warnings.append(
                f"the prevalence of {name} differs strongly between sites ({high} "
                f"{prevalence[high][name]:.2f} vs {low} {prevalence[low][name]:.2f}, chi-square "
                f"p = {p_value:.2g}): a model can learn the site as a shortcut for the label; "
                "check per-site AUROC, balance the sites or adapt (domain_adaptation)"
            )
    return prevalence, tests, warnings


# --- pixels and tags ---------------------------------------------------------------------------


def _sample(manifest: pd.DataFrame, max_per_site: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = []
    for _, group in manifest.groupby("site", sort=True):
        if len(group) > max_per_site:
            keep = np.sort(rng.choice(len(group), max_per_site, replace=False))
            group = group.iloc[keep]
        parts.append(group)
    return pd.concat(parts).reset_index(drop=True)


def _intensity(images: np.ndarray) -> dict[str, Any]:
    if len(images) == 0:
        return {}
    pixels = images.reshape(-1)
    per_image = images.reshape(len(images), -1).mean(axis=1)
    histogram, _ = np.histogram(pixels, bins=_HISTOGRAM_BINS, range=(0.0, 1.0))
    percentiles = np.percentile(pixels, PERCENTILES)
    return {
        "images": len(images),
        "mean": float(pixels.mean()),
        "sd": float(pixels.std()),
        **{f"p{q}": float(v) for q, v in zip(PERCENTILES, percentiles, strict=True)},
        "image_mean_sd": float(per_image.std()),
        "histogram": (histogram / histogram.sum()).round(6).tolist(),
    }


def _tag_summary(sample: pd.DataFrame) -> dict[str, dict[str, dict[str, int]]]:
    """Most common safe-tag values per site, for the sample's DICOM files (others: nothing)."""
    tags = read_tags(sample["path"].tolist(), list(SUMMARY_TAGS))
    dicom = (tags != "").any(axis=1).to_numpy()
    out: dict[str, dict[str, dict[str, int]]] = {}
    for site in sorted(sample["site"].unique()):
        rows = tags[(sample["site"] == site).to_numpy() & dicom]
        if rows.empty:
            continue
        out[site] = {
            tag: {
                str(v): int(n) for v, n in rows[f"_{tag}"].value_counts().head(_TOP_VALUES).items()
            }
            for tag in SUMMARY_TAGS
            if (rows[f"_{tag}"] != "").any()
        }
    return out


# --- features and separability -----------------------------------------------------------------


def feature_extractor(model):
    """images -> pooled backbone features, from a model ``build_model`` made (or a run's): the
    model's own resize, channel and normalisation layers, then its backbone (tabular inputs, if
    any, are not needed)."""
    import keras

    image = keras.Input(tuple(model.get_layer("image").output.shape[1:]), name="image")
    x = image
    for name in ("resize", "to_rgb", "backbone_preprocessing", "backbone"):
        x = model.get_layer(name)(x)
    return keras.Model(image, x, name="features")


def _features(spec: Spec, images: np.ndarray, model: str | Path | None) -> tuple[np.ndarray, str]:
    """Pooled backbone features of ``images`` and a sentence saying where they came from."""
    from medtransfer.models.build import build_model

    if model is not None:
        from medtransfer.training.run import open_run

        run = open_run(model)
        network, described = run.load_model(), f"the trained backbone of run {run.path}"
    else:
        plain = spec.model_copy(update={"tabular": []})
        weights, note = spec.model.weights, ""
        try:
            network = build_model(plain)
        except WeightsUnavailableError as error:
            weights, note = "none", f" (weights {spec.model.weights} unavailable: {error})"
            random = plain.model.model_copy(update={"weights": "none"})
            network = build_model(plain.model_copy(update={"model": random}))
        if weights.lower() == "none":
            described = (
                f"{spec.model.backbone} with RANDOM weights{note}: random features register "
                "intensity and texture differences, not what a trained network attends to"
            )
        else:
            described = f"{spec.model.backbone} with weights {weights} (the spec's)"
    extractor = feature_extractor(network)
    chunks = [
        np.asarray(extractor(images[i : i + 64], training=False)) for i in range(0, len(images), 64)
    ]
    features = np.concatenate(chunks).astype(np.float64).reshape(len(images), -1)
    return features, described


def domain_separability(
    features: np.ndarray,
    sites: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validated AUROC of a logistic regression telling the sites apart from features.

    Folds are stratified by site and keep each group (patient) in one fold; with more than two
    sites the AUROC is the macro one-vs-rest average. Returns ``auroc`` (None when there are
    fewer than two sites or too few images), ``folds`` and ``n_images``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sites = np.asarray(sites).astype(str)
    names, counts = np.unique(sites, return_counts=True)
    out: dict[str, Any] = {
        "method": "logistic regression (standardised features, C=1), site from pooled backbone "
        "features",
        "n_images": len(sites),
    }
    if len(names) < 2:
        return {**out, "auroc": None, "reason": "fewer than two sites"}
    groups = np.arange(len(sites)) if groups is None else np.asarray(groups)
    group_counts = [len(np.unique(groups[sites == name])) for name in names]
    k = min(folds, *group_counts)
    if k < 2:
        return {**out, "auroc": None, "reason": "too few images (patients) per site for CV"}
    classifier = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    )
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    probabilities = cross_val_predict(
        classifier, features, sites, groups=groups, cv=splitter, method="predict_proba"
    )
    if len(names) == 2:
        auroc = roc_auc_score(sites == names[1], probabilities[:, 1])
    else:
        auroc = roc_auc_score(sites, probabilities, multi_class="ovr", labels=names)
    return {
        **out,
        "auroc": float(auroc),
        "folds": int(k),
        "site_counts": dict(zip(names.tolist(), counts.tolist(), strict=True)),
    }


def _pca_2d(features: np.ndarray) -> np.ndarray:
    centred = features - features.mean(axis=0)
    scale = centred.std(axis=0)
    centred = centred / np.where(scale > 0, scale, 1.0)
    if len(centred) < 2:
        return np.zeros((len(centred), 2))
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    coordinates = centred @ components[:2].T
    return np.pad(coordinates, ((0, 0), (0, 2 - coordinates.shape[1])))


# --- figures ---------------------------------------------------------------------------------


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
    edges = np.linspace(0.0, 1.0, _HISTOGRAM_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for site in report.sites:
        summary = report.intensity.get(site)
        if summary:
            density = np.asarray(summary["histogram"]) * _HISTOGRAM_BINS
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
