"""Unsupervised domain adaptation: train on one hospital's labelled images, work at another's.

A model trained on one scanner, protocol or population often loses accuracy at another site
because its features shift, not because the task changed. The tools here use *unlabelled*
images from the target site:

- ``DomainAdaptationModel`` trains the task on labelled source images while aligning the pooled
  features of source and target batches, all inside ``model.fit``: ``"coral"`` (second-order
  statistics, Sun & Saenko 2016), ``"mmd"`` (multi-kernel Gaussian MMD, Long et al. 2015) or
  ``"dann"`` (a domain classifier behind a ``GradientReversal`` layer, Ganin et al. 2016).
- ``adapt_batchnorm`` (AdaBN, Li et al. 2016) needs no training at all: it re-estimates every
  BatchNormalization layer's moving statistics on target images.

Inference and export only use the feature extractor and the task head; the domain classifier is
a training-time device and never reaches a SavedModel.

The methods themselves are registered in ``medtransfer.models.adaptation_methods``. Modules:
``reversal`` (the GradientReversal layer, the domain classifier), ``schedule`` (its strength
over training), ``losses`` (CORAL, MMD), ``alignment`` (each registered loss as the model
calls it), ``batches`` (the zipped source/target batches, class weights), ``model``
(``DomainAdaptationModel``), ``adabn`` and ``moments`` (AdaBN), ``nested`` (finding nested
layers). Importing this package registers the Keras classes saved models refer to.
"""

from medtransfer.models.adaptation.adabn import adapt_batchnorm
from medtransfer.models.adaptation.alignment import ALIGNMENT_LOSSES
from medtransfer.models.adaptation.batches import with_class_weights
from medtransfer.models.adaptation.losses import MMD_MULTIPLIERS, coral_loss, mmd_loss
from medtransfer.models.adaptation.model import DomainAdaptationModel
from medtransfer.models.adaptation.reversal import GradientReversal, domain_classifier
from medtransfer.models.adaptation.schedule import GradientReversalSchedule, dann_strength
from medtransfer.models.adaptation_methods import ALIGNMENT_METHODS

__all__ = [
    "ALIGNMENT_LOSSES",
    "ALIGNMENT_METHODS",
    "MMD_MULTIPLIERS",
    "DomainAdaptationModel",
    "GradientReversal",
    "GradientReversalSchedule",
    "adapt_batchnorm",
    "coral_loss",
    "dann_strength",
    "domain_classifier",
    "mmd_loss",
    "with_class_weights",
]
