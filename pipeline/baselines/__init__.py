"""Direct image-to-image synthesis baselines of MRIS: U-Net, pix2pix, TransUNet-like (radiograph -> FC/TC maps).

* :mod:`.nets`: generators (:func:`make_generator`), the PatchGAN discriminator, :class:`TransUNet2D`.
* :mod:`.data`: MONAI chains (the MRIS radiograph chain + ``maps`` / ``mask`` targets).
* :mod:`.losses`: the masked L1 loss.
* :mod:`.engine`: iteration functions for ``SupervisedTrainer`` / ``GanTrainer`` / ``SupervisedEvaluator``,
  the validation metric, :func:`make_trainer`.
* :mod:`.synthesize`: trained generator -> maps in mm on the atlas grid (NaN outside).
* :mod:`.evaluate`: test-set synthesis error vs the mean-map baseline (the bundle's ``evaluating``).

Bundle: ``bundles/direct_synthesis`` (config key ``method``: ``unet`` | ``pix2pix`` | ``transformer``).
"""

from pipeline.baselines.losses import MaskedL1Loss, masked_l1
from pipeline.baselines.nets import METHODS, TransUNet2D, check_method, make_discriminator, make_generator

__all__ = ["METHODS", "MaskedL1Loss", "TransUNet2D", "check_method", "make_discriminator", "make_generator",
           "masked_l1"]
