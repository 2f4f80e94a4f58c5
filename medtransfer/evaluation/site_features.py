"""How separable the sites are in a backbone's features: what a network could tell apart.

A logistic regression (standardised features, L2, C=1) predicts the site from pooled backbone
features, scored by cross-validated AUROC with each patient's images in one fold. 0.5: the
backbone cannot tell the sites apart; near 1: every image carries its site, and adaptation
(``domain_adaptation`` in the spec) is worth trying. Features come from a finished run's
backbone, else from the spec's backbone with its weights; with ``weights: none`` (or ImageNet
weights that cannot be fetched offline) they are *random* convolutional features, which still
register intensity and texture shifts but not what a trained network would attend to. A PCA of
the same features in 2-D shows the sites to the eye.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np

from medtransfer.errors import WeightsUnavailableError
from medtransfer.models.build import build_model
from medtransfer.models.saved import load_run_model
from medtransfer.rundir import open_run
from medtransfer.spec import Spec

_BATCH = 64


def feature_extractor(model: keras.Model) -> keras.Model:
    """images -> pooled backbone features, from a model ``build_model`` made (or a run's): the
    model's own resize, channel and normalisation layers, then its backbone (tabular inputs, if
    any, are not needed)."""
    image = keras.Input(tuple(model.get_layer("image").output.shape[1:]), name="image")
    x = image
    for name in ("resize", "to_rgb", "backbone_preprocessing", "backbone"):
        x = model.get_layer(name)(x)
    return keras.Model(image, x, name="features")


def backbone_features(
    spec: Spec, images: np.ndarray, model: str | Path | None
) -> tuple[np.ndarray, str]:
    """Pooled backbone features of ``images`` and a sentence saying where they came from:
    the backbone of the run ``model``, else the spec's."""
    network, described = _network(spec, model)
    extractor = feature_extractor(network)
    chunks = [
        np.asarray(extractor(images[i : i + _BATCH], training=False))
        for i in range(0, len(images), _BATCH)
    ]
    features = np.concatenate(chunks).astype(np.float64).reshape(len(images), -1)
    return features, described


def _network(spec: Spec, model: str | Path | None) -> tuple[keras.Model, str]:
    """The network whose backbone gives the features, and the sentence that says which; the
    spec's backbone falls back to random weights when its own cannot be had, and says so."""
    if model is not None:
        run = open_run(model)
        return load_run_model(run), f"the trained backbone of run {run.path}"
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
    return network, described


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


def pca_2d(features: np.ndarray) -> np.ndarray:
    """The standardised features' first two principal components [n, 2] (zeros for fewer
    than two images, a zero column when there is only one component)."""
    centred = features - features.mean(axis=0)
    scale = centred.std(axis=0)
    centred = centred / np.where(scale > 0, scale, 1.0)
    if len(centred) < 2:
        return np.zeros((len(centred), 2))
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    coordinates = centred @ components[:2].T
    return np.pad(coordinates, ((0, 0), (0, 2 - coordinates.shape[1])))
