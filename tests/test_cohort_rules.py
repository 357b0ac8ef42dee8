from __future__ import annotations

import pytest

from pipeline.cohort.disease import jsn_grade, klg_rule, osteophyte_grade, progression_labels


@pytest.mark.parametrize("jsn,ost,klg", [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1), (0, 2, 2), (1, 3, 2),
                                         (2, 0, 3), (2, 3, 3), (3, 0, 4), (3, 3, 4)])
def test_klg_rule_table(jsn, ost, klg):
    assert klg_rule(jsn, ost) == klg


def test_grades_thresholds():
    assert [jsn_grade(x) for x in (0.0, 0.149, 0.15, 0.34, 0.35, 0.69, 0.7, 1.0)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [osteophyte_grade(x) for x in (0.0, 0.99, 1.0, 2.49, 2.5, 4.49, 4.5)] == [0, 0, 1, 1, 2, 2, 3]


def test_progression_labels():
    months = (0, 12, 24, 36, 48, 72, 96)
    flat = dict(zip(months, [2] * 7))
    assert progression_labels(flat) == (0, 0)
    fast = dict(zip(months, [2, 2, 3, 3, 3, 3, 3]))
    assert progression_labels(fast) == (1, 1)
    slow = dict(zip(months, [1, 1, 1, 1, 1, 1, 2]))
    assert progression_labels(slow) == (0, 2)  # increase only at 96 months: not within 72
    kl01 = dict(zip(months, [0, 1, 1, 1, 1, 2, 2]))
    assert progression_labels(kl01) == (1, 2)  # 0->1 is not progression for the 3-class label
    kl4 = dict(zip(months, [4] * 7))
    assert progression_labels(kl4) == (0, -1)


def test_side_from_name_tokens():
    from pipeline.conventions import side_from_name

    assert side_from_name("9001/00_MONTH/RIGHT_KNEE/labels.nii.gz") == "R"
    assert side_from_name("left_knee-then-RIGHT.nii") == "R"  # last token wins
    assert side_from_name("BRIGHT_scan.nii") is None  # not a token
    assert side_from_name("9001_R_00.nii.gz") is None  # short tokens only on request
    assert side_from_name("9001_R_00.nii.gz", short_tokens=True) == "R"
    assert side_from_name("L_knee.nii.gz", short_tokens=True) == "L"
    assert side_from_name("knee.nii.gz", short_tokens=True) is None
