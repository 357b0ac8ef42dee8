"""Segmentation-guided multimodal registration of knee DXA and radiographs (issue 14; Demir & Niethammer 2024).

Transforms are maps ``B x 2 x H x W`` on [0, 1] (row, column; ICON convention), from fixed-frame points to
moving-frame points; label maps are warped by nearest neighbour or one-hot + argmax, never bilinear + rounding.

GradICON core (our own MONAI-native implementation; the authors' ``icon-registration`` is not a dependency):

* :mod:`~pipeline.registration.maps`: identity map, ``warp``, ``compose``, ``warp_labels``, pixel units.
* :mod:`~pipeline.registration.losses`: signed LNCC (sigma 3 px), mutual information (MONAI), soft Dice,
  the GradICON penalty.
* :mod:`~pipeline.registration.metrics`: per-bone Dice, Jacobian determinant and % folds.
* :mod:`~pipeline.registration.network`: U-Net cascade at 1/4, 1/2, full resolution composed two-step
  (``make_registration_network``, self-describing checkpoints).
* :mod:`~pipeline.registration.step`: ``gradicon_loss``, the ``SupervisedTrainer`` iteration function,
  ``register``.

Stages, baselines and tools:

* :mod:`~pipeline.registration.data`: pair-ready crops, the few-label split, pair datasets.
* :mod:`~pipeline.registration.segmenters`: the DXA segmenter (stage 2);
  :mod:`~pipeline.registration.cyclegan`: the radiograph segmenter by CycleGAN domain adaptation (stage 2).
* :mod:`~pipeline.registration.classical`: the classical iterative B-spline baseline (SimpleITK).
* :mod:`~pipeline.registration.train`: the training stages as the bundle's configs call them.
* :mod:`~pipeline.registration.evaluate`: every method on the same held-out pairs; Dice and folds.
* :mod:`~pipeline.registration.infer`: inference on DXA + radiograph pairs.
* :mod:`~pipeline.registration.overlay`: overlay PNGs (fixed, moving, warped, deformed grid).

Submodules are imported on use (``from pipeline.registration.maps import warp``); this package imports nothing.
"""
