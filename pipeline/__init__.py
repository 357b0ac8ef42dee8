"""Knee osteoarthritis imaging toolkit (library code).

Subpackages: ``cohort`` (synthetic knee cohort), ``io`` (DICOM helpers, manifests, atomic writes),
``thickness``, ``nets``, ``losses``, ``metrics``, ``retrieval``. Shared conventions live in
:mod:`pipeline.conventions`.
"""

__version__ = "0.1.0"
