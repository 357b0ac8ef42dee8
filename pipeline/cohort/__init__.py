"""The synthetic knee cohort: anatomy, disease model, MR / radiograph / DXA simulation and writers
(``python -m pipeline cohort``; entry point :func:`pipeline.cohort.generate.generate_cohort`)."""
