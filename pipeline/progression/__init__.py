"""Knee OA progression from baseline DESS MRI (Panfilov et al., ISBI 2022): predict whether a knee's KLG
increases fast (by 36 months), slowly (48-96 months) or not at all.

* :mod:`~pipeline.progression.labels`: the 3-class target (the rule's one home is
  :func:`pipeline.cohort.disease.progression_labels`; re-exported here with class names and masks);
* :mod:`~pipeline.progression.losses`: multi-class softmax focal loss;
* :mod:`~pipeline.progression.metrics`: P(any) = P(fast) + P(slow), average precision, ROC AUC, balanced
  accuracy and a subject-level (group) bootstrap interval;
* :mod:`~pipeline.progression.ensemble`: fold ensembles that average probabilities once;
* :mod:`~pipeline.progression.network`: "2D + TRF" and the baselines (2D + FC, 2D + BiLSTM, 3D CNN,
  radiograph CNN) behind one self-describing factory :func:`~pipeline.progression.network.make_progression_network`;
* :mod:`~pipeline.progression.data`: baseline items, subject-grouped folds, the MR and radiograph input chains;
* :mod:`~pipeline.progression.engine`: MONAI engines (focal loss, class-balanced sampler, warm-up, validation AP
  over every sample, best snapshot);
* :mod:`~pipeline.progression.train`: one fold, cross-validation, out-of-fold metrics with intervals, reports;
* :mod:`~pipeline.progression.infer`: DESS folders / manifests -> per-knee probabilities (fold ensembles);
* :mod:`~pipeline.progression.demo`: the synthetic-cohort demo of every model on the same folds.

Volumes enter the MR networks as ``B x 1 x S x H x W``: S sagittal slices (the first spatial axis after the
channel, medial <-> lateral), each slice an H x W sagittal image in pixels; right knees are flipped to the
left-knee convention upstream (DESIGN.md "Sides"), intensities min-max scaled to [0, 1] per volume.
"""
