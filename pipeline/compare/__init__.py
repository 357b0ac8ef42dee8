"""The MRIS paper's comparison for one cohort (``python -m pipeline compare``): retrieval recall, synthesis
error per KLG bucket (MRIS-C, MRIS-S, U-Net, pix2pix, TransUNet-like, mean-map baseline), downstream KLG /
progression classifiers per source, model size, figures.

* :mod:`.config`: :class:`CompareConfig` (shared budget read from the MRIS bundle configs, presets).
* :mod:`.run`: :func:`run_compare` (everything), :func:`run_short_report` (the end of ``make demo``).
* :mod:`.tables`, :mod:`.figures`, :mod:`.model_size`: report pieces.
"""

from pipeline.compare.config import CompareConfig
from pipeline.compare.run import run_compare, run_short_report

__all__ = ["CompareConfig", "run_compare", "run_short_report"]
