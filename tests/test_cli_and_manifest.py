from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from pipeline.__main__ import main
from pipeline.io.manifest import ManifestError, load_manifest, split_subjects


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_rejects_bad_arguments_with_one_line(capsys, tmp_path):
    code, _, err = _run(["cohort", "--out", str(tmp_path / "c"), "--subjects", "0"], capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error:") and "n_subjects" in lines[0]
    code, _, err = _run(["cohort", "--out", str(tmp_path / "c"), "--visits", "0,13"], capsys)
    assert code == 2 and "visits" in err and "Traceback" not in err


def test_cli_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["cohort", "--out", "x", "--mr-spacing", "a,b"])
    assert e.value.code == 2
    assert "expected one or three numbers" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; use a file as parent instead")
def test_cli_unwritable_folder(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, _, err = _run(["cohort", "--out", str(ro / "c"), "--tiny", "-n", "1"], capsys)
    assert code == 2 and err.startswith("error:")


def test_cli_output_under_a_file_is_one_error_line(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    code, _, err = _run(["cohort", "--out", str(f / "cohort"), "--tiny", "-n", "1"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: cannot write the cohort") and "--out" in err


def test_cli_module_entry_point_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "cohort", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--subjects" in r.stdout


def _write(tmp_path, df):
    p = tmp_path / "m.csv"
    df.to_csv(p, index=False)
    return p


def test_manifest_errors_name_row_and_column(tmp_path):
    df = pd.DataFrame({"subject_id": ["9001", "9002"], "side": ["R", "X"], "visit_month": [0, 12], "klg": [2, 7],
                       "fc_map": ["a.npy", "b.npy"]})
    (tmp_path / "a.npy").write_bytes(b"")
    with pytest.raises(ManifestError) as e:
        load_manifest(_write(tmp_path, df), check_paths=["fc_map"])
    msg = str(e.value)
    assert "row 3 (subject_id=9002, side=X, visit_month=12): column 'side'" in msg
    assert "column 'klg': 7 is not one of" in msg
    assert "file not found" in msg and "b.npy" in msg and "a.npy" not in msg


def test_manifest_missing_column_and_duplicates(tmp_path):
    with pytest.raises(ManifestError, match="missing required column"):
        load_manifest(_write(tmp_path, pd.DataFrame({"subject_id": ["1"], "side": ["R"]})))
    df = pd.DataFrame({"subject_id": ["1", "1"], "side": ["R", "R"], "visit_month": [0, 0]})
    with pytest.raises(ManifestError, match="duplicate"):
        load_manifest(_write(tmp_path, df))
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.csv")


def test_split_is_by_subject_deterministic_and_complete():
    subjects = [f"{i:04d}" for i in range(50)]
    a = split_subjects(subjects, {"database": 0.45, "downstream": 0.35, "test": 0.2}, seed=3)
    b = split_subjects(list(reversed(subjects)) * 2, {"database": 0.45, "downstream": 0.35, "test": 0.2}, seed=3)
    assert a == b and set(a) == set(subjects)
    counts = pd.Series(a).value_counts()
    assert counts["database"] in (22, 23) and counts["test"] == 10
    assert split_subjects(subjects, {"x": 0.5, "y": 0.5}, seed=4) != split_subjects(subjects, {"x": 0.5, "y": 0.5}, seed=5)
    tiny = split_subjects(["a", "b", "c"], {"database": 0.8, "downstream": 0.1, "test": 0.1})
    assert sorted(tiny.values()) == ["database", "downstream", "test"]


def test_demo_command_without_mris_writes_report(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path), "--tiny", "-n", "1", "--no-mr", "--no-mris", "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "[demo] 4/5 and 5/5 skipped (--no-mris)" in out
    assert (tmp_path / "cohort_report.md").exists() and (tmp_path / "cohort_contact_sheet.png").exists()
    assert "Knees per KLG and visit" in (tmp_path / "cohort_report.md").read_text()


def test_mris_report_summary_keeps_recall_and_overall_rows():
    from pipeline.__main__ import _summary

    report = "\n".join(["# MRIS", "", "| | R@1 | R@5 |", "|---|---|---|", "| MRIS | 10.0 | 40.0 |",
                        "| chance | 5.0 | 25.0 |", "", "## Synthesis", "", "| method | map | group | median |",
                        "|---|---|---|---|", "| MRIS-C | fc | all | 0.2 |", "| MRIS-C | fc | 0-1 | 0.3 |",
                        "| mean database map | fc | all | 0.25 |"])
    lines = _summary(report).splitlines()
    assert "| MRIS | 10.0 | 40.0 |" in lines and "| chance | 5.0 | 25.0 |" in lines
    assert "| MRIS-C | fc | all | 0.2 |" in lines and "| mean database map | fc | all | 0.25 |" in lines
    assert not any("0-1" in ln for ln in lines)


def test_tiny_keeps_explicit_values_and_says_so(capsys):
    from pipeline.__main__ import _config, build_parser
    from pipeline.cohort.generate import TINY

    a = build_parser().parse_args(["cohort", "--out", "x", "--tiny", "--xray-spacing", "0.5", "--visits", "0,12"])
    cfg = _config(a)
    assert cfg.xray_spacing_mm == 0.5 and tuple(cfg.visits) == (0, 12)  # what the user passed wins
    assert cfg.map_size == TINY["map_size"] and tuple(cfg.mr_spacing_mm) == tuple(TINY["mr_spacing_mm"])
    err = capsys.readouterr().err
    assert "--tiny keeps your --xray-spacing 0.5" in err and "--visits" in err and "--map-size" not in err
    plain = _config(build_parser().parse_args(["cohort", "--out", "x"]))
    assert plain.xray_spacing_mm == 0.3 and plain.map_size == 128 and tuple(plain.visits) == (0, 12, 24, 48)
    with pytest.raises(ValueError):  # the final values are validated, --tiny or not
        _config(build_parser().parse_args(["cohort", "--out", "x", "--tiny", "--xray-spacing", "-1"]))
