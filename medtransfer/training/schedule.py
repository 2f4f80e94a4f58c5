"""Fine-tuning phases: which layers train, for how long, at what learning rate.

A pretrained backbone is first kept frozen while the new head learns (a random head's large
gradients would otherwise wreck the pretrained features), then its top blocks are unfrozen at a
lower learning rate. BatchNormalization layers stay frozen, i.e. in inference mode, in both
phases: small medical batches give noisy statistics that would overwrite ImageNet's (a backbone
from another medtransfer run lets them train by default: see ``FineTuneSpec``). A backbone
trained from random initialisation has nothing to protect and trains whole in one phase.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import keras

from medtransfer.models.backbones import unfreeze_top
from medtransfer.spec import Spec

BACKBONE_LAYER = "backbone"


@dataclass(frozen=True)
class Phase:
    name: str  # "head", "fine_tune" or "full"
    epochs: int
    learning_rate: float

    def apply(self, model: keras.Model, spec: Spec) -> None:
        """Set ``trainable`` on the backbone's layers for this phase (recompile afterwards)."""
        backbone = find_backbone(model)
        if self.name == "full":
            backbone.trainable = True
        elif self.name == "head":
            backbone.trainable = False
        else:
            backbone.trainable = True
            tune = spec.training.fine_tune
            unfreeze_top(
                backbone,
                spec.model.backbone,
                tune.unfreeze,
                train_batchnorm=tune.trains_batchnorm(spec.model.weights),
            )


def find_backbone(model: keras.Model) -> keras.Model:
    """The layer named ``backbone``: a direct layer of a model ``build_model`` made, or nested
    inside a wrapper such as ``DomainAdaptationModel`` (whose feature extractor holds it)."""
    try:
        return model.get_layer(BACKBONE_LAYER)
    except ValueError:
        pass
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if layer.name == BACKBONE_LAYER and isinstance(layer, keras.Model):
            return layer
    raise ValueError(f"model {model.name!r} has no layer named {BACKBONE_LAYER!r}")


def plan_phases(spec: Spec) -> list[Phase]:
    """The phases a spec asks for, their epochs adding up to ``training.epochs``."""
    total, rate = spec.training.epochs, spec.training.learning_rate
    if spec.model.weights.lower() == "none":
        return [Phase("full", total, rate)]
    tune = spec.training.fine_tune
    if 0 < total <= tune.head_epochs:
        warnings.warn(
            f"training.epochs ({total}) <= fine_tune.head_epochs ({tune.head_epochs}): the "
            "pretrained backbone stays frozen throughout (a linear probe); raise epochs above "
            "head_epochs to fine-tune it",
            stacklevel=2,
        )
    head = min(tune.head_epochs, total)
    phases = [Phase("head", head, rate)] if head else []
    if total > head:
        phases.append(Phase("fine_tune", total - head, rate * tune.learning_rate_factor))
    return phases
