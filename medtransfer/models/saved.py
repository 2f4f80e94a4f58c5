"""Loading the Keras models medtransfer saves, with its own layers, losses and metrics known.

Every custom object is a registered, serialisable Keras class, so a model loads with
``safe_mode=True`` (no Lambda layers, no pickled code).
"""

from __future__ import annotations

from pathlib import Path

import keras

# importing these registers medtransfer's layers, losses and metrics, ensembles and
# adaptation models with Keras
import medtransfer.models.adaptation
import medtransfer.models.ensemble
import medtransfer.models.layers
import medtransfer.models.losses  # noqa: F401
from medtransfer.errors import RunError
from medtransfer.rundir import Run, open_run


def load_keras_model(path: str | Path) -> keras.Model:
    """A ``.keras`` file medtransfer wrote (a run's model, a domain-adaptation source model)."""
    return keras.saving.load_model(Path(path), safe_mode=True)


def load_run_model(run: Run | str | Path, *, encoder: bool = False) -> keras.Model:
    """The classifier a run keeps (``model.keras``: its best epoch, after AdaBN where used).

    A ``pretrain`` run keeps an encoder (images -> features), whose outputs are not
    probabilities: it is refused unless ``encoder`` (a ``run:`` weight source takes its
    backbone), so evaluating, exporting or scoring it fails clearly instead of reading
    features as class probabilities."""
    found = run if isinstance(run, Run) else open_run(run)
    if found.info.kind != "train" and not encoder:
        raise RunError(
            f"{found.path} is a {found.info.kind} run: its model maps images to features, not "
            f"class probabilities; use it as a weight source (model.weights: run:{found.path}) "
            "and train a classifier from it"
        )
    return load_keras_model(found.model_file)
