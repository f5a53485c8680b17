"""The demo runner: steps as re-runnable commands, logs per step, a failing step stops with its command."""
import sys

import pytest

from data_prep.datalist import read_datalist
from data_prep.demo import Step, StepFailed, ixi_sample_datalist, run_demo, run_step


def test_demo_simulates_a_toy_cohort_and_logs_each_step(tmp_path, capsys):
    run_demo(out=str(tmp_path), n_subjects=8, resolution=4.0, seed=1, ixi_sample=str(tmp_path / "no_ixi_here"))
    splits = read_datalist(tmp_path / "cohort" / "datalist.json")
    assert sum(len(v) for v in splits.values()) == 8
    log = (tmp_path / "logs" / "01_simulate_cohort.log").read_text()
    assert "simulate-cohort" in capsys.readouterr().out and log
    assert not (tmp_path / "logs" / "02_preprocess_ixi.log").exists()


def test_failing_step_names_its_command_and_log(tmp_path):
    step = Step("99_broken", [sys.executable, "-c", "print('partial output'); raise SystemExit(3)"], str(tmp_path))
    with pytest.raises(StepFailed, match="exit 3") as err:
        run_step(step, tmp_path / "logs")
    assert "raise SystemExit(3)" in str(err.value) and str(tmp_path / "logs" / "99_broken.log") in str(err.value)
    assert "partial output" in (tmp_path / "logs" / "99_broken.log").read_text()


def test_ixi_sample_datalist_lists_both_real_scans(ixi_sample, tmp_path):
    splits = read_datalist(ixi_sample_datalist(ixi_sample, tmp_path / "ixi.json"))
    assert {r["subject"]: r["age"] for r in splits["test"]} == {"IXI012-HH-1211": 38.78, "IXI015-HH-1258": 24.28}
    assert all(r["image"].endswith("_T1.nii.gz") for r in splits["test"])
