"""Domain-adaptation method registry: each method is data (what it needs, when it acts).

The spec's ``domain_adaptation.method`` names, the training run's choices (wrap the classifier
for feature alignment, add a domain classifier and its gradient-reversal schedule, re-normalise
BatchNorm after training) and ``DomainAdaptationModel``'s checks all read these entries, so
adding a method is adding an entry here plus its loss or layer, not a branch in each of them.

Pure data, no TensorFlow: the spec validates method names against this module, and a spec must
load without importing Keras. An entry's ``alignment_loss`` names its implementation in
``medtransfer.models.adaptation.ALIGNMENT_LOSSES`` for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdaptationMethod:
    """One registered way to use unlabelled target-site images.

    ``alignment_loss``: the loss that pulls source and target features together inside ``fit``
    (a key of ``ALIGNMENT_LOSSES``); None when ``fit`` trains the task alone.
    ``needs_domain_classifier``: the alignment is adversarial, through a domain classifier
    behind a ``GradientReversal`` layer whose strength follows a schedule.
    ``renormalises_batchnorm``: BatchNormalization statistics are re-estimated on the target
    images after training (AdaBN).
    """

    name: str
    description: str
    alignment_loss: str | None = None
    needs_domain_classifier: bool = False
    renormalises_batchnorm: bool = False

    @property
    def aligns_features(self) -> bool:
        """Whether training runs a ``DomainAdaptationModel`` on zipped source/target batches."""
        return self.alignment_loss is not None

    @property
    def uses_target_images(self) -> bool:
        """Whether the run loads the target sites' (unlabelled) training images."""
        return self.aligns_features or self.renormalises_batchnorm


_REGISTRY = (
    AdaptationMethod("none", "no adaptation: train on the source sites as a plain run does"),
    AdaptationMethod(
        "dann",
        "adversarial features: a domain classifier behind gradient reversal (Ganin et al. 2016)",
        alignment_loss="domain",
        needs_domain_classifier=True,
    ),
    AdaptationMethod(
        "coral",
        "match the feature covariances of source and target batches (Sun & Saenko 2016)",
        alignment_loss="coral",
    ),
    AdaptationMethod(
        "mmd",
        "multi-kernel Gaussian MMD between source and target features (Long et al. 2015)",
        alignment_loss="mmd",
    ),
    AdaptationMethod(
        "adabn",
        "train on source, then re-estimate BatchNorm statistics on target (Li et al. 2016)",
        renormalises_batchnorm=True,
    ),
)
ADAPTATION_METHODS: dict[str, AdaptationMethod] = {method.name: method for method in _REGISTRY}
# The methods that train a DomainAdaptationModel, in registry order.
ALIGNMENT_METHODS: tuple[str, ...] = tuple(m.name for m in _REGISTRY if m.aligns_features)
