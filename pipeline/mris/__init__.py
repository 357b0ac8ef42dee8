"""MRIS bundle glue: manifest -> MONAI datasets, training/validation engines, evaluation, inference.

The library pieces (networks, loss, sampler, k-NN synthesis, database, metrics) live in
``pipeline.nets``, ``pipeline.losses``, ``pipeline.sampling``, ``pipeline.retrieval`` and
``pipeline.metrics``; this package wires them for ``bundles/mris/configs/*.json``.
"""
