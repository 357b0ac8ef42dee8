"""Landmark rows are matched to files by path, by a UNIQUE file name, or (one input file) by a one-file
table; never another file's landmarks."""

from __future__ import annotations

import pandas as pd

from pipeline.knee_inference import _finite_or_none, _match


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


def test_same_name_in_two_folders_does_not_borrow_landmarks(tmp_path):
    a, b = _touch(tmp_path / "a" / "IM1.dcm"), _touch(tmp_path / "b" / "IM1.dcm")
    lm = pd.DataFrame([{"file": str(a), "side": "R", "x": 1.0, "y": 2.0},
                       {"file": str(a), "side": "L", "x": 3.0, "y": 4.0}])
    jobs = dict(_match([a, b], lm))
    assert len(jobs[a]) == 2 and jobs[b] == []


def test_unique_name_and_single_file_rules(tmp_path):
    f = _touch(tmp_path / "in" / "IM2.dcm")
    by_name = pd.DataFrame([{"file": "elsewhere/IM2.dcm", "side": "R", "x": 1.0, "y": 2.0}])
    assert len(dict(_match([f], by_name))[f]) == 1  # the only IM2.dcm of the table
    two_files = pd.DataFrame([{"file": "x/A.dcm", "side": "R", "x": 1.0, "y": 2.0},
                              {"file": "x/B.dcm", "side": "R", "x": 5.0, "y": 6.0}])
    assert dict(_match([f], two_files))[f] == []  # a single input does not take every row of a longer table
    one_file = pd.DataFrame([{"file": "x/A.dcm", "side": "R", "x": 1.0, "y": 2.0},
                             {"file": "x/A.dcm", "side": "L", "x": 5.0, "y": 6.0}])
    assert len(dict(_match([f], one_file))[f]) == 2


def test_mean_thickness_is_none_for_an_all_nan_map():
    import numpy as np

    assert _finite_or_none(np.full((2, 2), np.nan)) is None
    assert _finite_or_none(np.array([[1.0, np.nan], [3.0, np.nan]])) == 2.0


def test_missing_landmarks_file_and_input_are_user_errors(tmp_path):
    import pytest

    from pipeline.knee_inference import find_knees, read_landmarks
    from pipeline.user_errors import MissingInputError

    with pytest.raises(MissingInputError, match="landmarks file not found.*--landmarks"):
        read_landmarks(tmp_path / "typo.csv", tmp_path)
    with pytest.raises(MissingInputError, match="input not found.*--input"):
        find_knees(tmp_path / "nowhere", landmarks=tmp_path / "typo.csv")


def test_outputs_manifest_lists_only_what_this_run_wrote(tmp_path):
    import numpy as np

    from pipeline.knee_inference import KneeMapWriter, write_knee_manifest

    kdir = tmp_path / "knee_R"
    kdir.mkdir()
    (kdir / "fc.dcm").write_bytes(b"left by an earlier --dicom run")
    writer = KneeMapWriter(png=False)
    maps = {"fc": np.ones((4, 4), np.float32), "tc": np.full((4, 4), np.nan, np.float32)}
    writer(tmp_path, "knee_R", maps)
    knees = [{"knee": "knee_R", "file": "a.dcm", "side": "R", "folder": str(kdir), "landmark_status": "ok"}]
    df = write_knee_manifest(tmp_path, tmp_path, knees, [], writer.notes, writer.written)
    listed = str(df.loc[0, "outputs"])
    assert "fc.npy" in listed and "tc.npy" in listed and "fc.dcm" not in listed
