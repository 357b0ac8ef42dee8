"""MRIS: retrieval-based synthesis of cartilage thickness maps from radiographs (Chen & Niethammer 2023).

* :mod:`~pipeline.mris.network` (dual encoder), :mod:`~pipeline.mris.losses` (longitudinal triplet loss),
  :mod:`~pipeline.mris.metrics` (retrieval recall@k), :mod:`~pipeline.mris.data` (manifest -> datasets);
* :mod:`~pipeline.mris.knn` (k-NN synthesis) and :mod:`~pipeline.mris.database` (on-disk embedding database);
* :mod:`~pipeline.mris.engine` (training / validation steps, network factory), :mod:`~pipeline.mris.evaluate`,
  :mod:`~pipeline.mris.synthesize`, :mod:`~pipeline.mris.infer`, wired by ``bundles/mris/configs/*.json``.

Shared pieces come from the layer below: ``pipeline.sampling`` (subject/visit sampler), ``pipeline.metrics``
(synthesis error), ``pipeline.handlers``, ``pipeline.nets``, ``pipeline.io``.
"""
