"""The demo: steps as re-runnable commands, logs per step, a failing step stops with its command, and the
whole pipeline (simulation, TGB-GAN, slice networks real / real + synthetic, AD, IXI, report) at toy size."""
import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brainage_core.datalist import read_datalist
from brainage_core.volumes import InputError
from workflows.demo import (
    DemoLayout,
    DemoSettings,
    Step,
    StepFailed,
    demo_steps,
    ixi_sample_datalist,
    run_demo,
    run_step,
)

REPO = Path(__file__).resolve().parents[2]
TOY_RESOLUTION = 8.0  # 24^3 volumes
# tiny networks through the same override dicts a user passes on the command line
TOY = {
    "n_subjects": 24, "n_ad_subjects": 20, "resolution": TOY_RESOLUTION, "seed": 0, "gan_epochs": 1,
    "target_per_bin": 3, "slice_epochs": 1, "ad_epochs": 1,
    "gan_network": {"network_def#encoder_channels": [4, 8], "network_def#decoder_channels": [8, 4]},
    "gan_training": {"critic_def#channels": [4, 8], "regressor_def#channels": [2, 4],
                     "batch_size": 4, "n_grid_images": 2},
    "slice_network": {"network_def#sfcn_channels": [4, 8]},
}
EXPECTED_STEPS = ["simulate_cohort", "simulate_ad_cohort", "train_gan", "generate_synthetic", "reconstruct_test_gan",
                  "train_slice_real", "evaluate_slice_real", "train_slice_synthetic", "evaluate_slice_synthetic",
                  "train_ad", "evaluate_ad", "write_report"]

@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    run_demo(out=str(out), skip_ixi=True, **TOY)
    return out


@pytest.mark.slow
def test_toy_demo_runs_every_step_and_records_its_command_log_and_time(toy_demo):
    steps = json.loads((toy_demo / "steps.json").read_text())["steps"]
    assert [re.sub(r"^\d\d_", "", s["name"]) for s in steps] == EXPECTED_STEPS
    for s in steps:
        assert s["seconds"] > 0 and not s.get("failed")
        assert Path(s["log"]).stat().st_size > 0
    at = DemoLayout(toy_demo)
    cohort = read_datalist(at.cohort / "datalist.json")
    assert sum(map(len, cohort.values())) == 24
    ad_labels = [r["label"] for r in sum(read_datalist(at.ad_cohort / "datalist.json").values(), [])]
    assert len(ad_labels) == 20 and set(ad_labels) == {0, 1}


@pytest.mark.slow
def test_toy_demo_starts_the_ad_detector_from_the_real_only_brain_age_model(toy_demo):
    steps = {re.sub(r"^\d\d_", "", s["name"]): s for s in json.loads((toy_demo / "steps.json").read_text())["steps"]}
    brain_age_model = DemoLayout(toy_demo).slice_real / "models" / "model.pt"
    assert f"network initialised from {brain_age_model} " in Path(steps["train_ad"]["log"]).read_text()


@pytest.mark.slow
def test_toy_demo_trains_on_real_plus_synthetic_and_evaluates_both(toy_demo):
    at = DemoLayout(toy_demo)
    synthetic = json.loads(at.synthetic_datalist.read_text())
    assert synthetic["n_synthetic"] > 0 and synthetic["synthesis"]["target_per_bin"] == 3
    training = read_datalist(at.synthetic_datalist)["training"]
    assert len(training) == synthetic["n_real"] + synthetic["n_synthetic"]
    test_subjects = sorted(r["subject"] for r in read_datalist(at.cohort / "datalist.json")["test"])
    for root in (at.slice_real, at.slice_synthetic):
        metrics = json.loads((root / "eval" / "test_metrics.json").read_text())
        assert metrics["n"] == len(test_subjects) and np.isfinite(metrics["mae"])
        with open(root / "eval" / "test_predictions.csv") as handle:
            assert sorted(r["subject"] for r in csv.DictReader(handle)) == test_subjects
    curve = list(csv.DictReader(open(at.slice_real / "eval" / "learning_curve.csv")))
    assert [int(r["epoch"]) for r in curve] == [1] and float(curve[0]["val_mae"]) > 0
    region = json.loads((at.region_maps / "region_maps.json").read_text())
    assert 0.0 <= region["auc_group_means"] <= 1.0 and 0.0 <= region["auc_traversal"] <= 1.0


@pytest.mark.slow
def test_toy_demo_report_holds_every_item_in_markdown_and_self_contained_html(toy_demo):
    at = DemoLayout(toy_demo)
    report = at.report.read_text()
    for section in ("Brain age on the simulated test set", "ridge on 8 mm voxels", "AD detection", "TGB-GAN",
                    "AUC against ground truth", "Real IXI scans", "Steps, commands and times"):
        assert section in report, section
    assert "| slice network, real only |" in report and "| slice network, real + synthetic |" in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    # learning curve, 2 scatter + 2 gap plots, AD ROC and learning curve, GAN grid, 2 region maps and the
    # real-image group-mean baseline map
    assert len(images) == 11
    assert all((toy_demo / image).is_file() for image in images)
    assert "figures/gan_real_reconstructed_synthetic.png" in images
    steps = json.loads(at.steps_file.read_text())["steps"]
    assert steps[-1]["name"] == "12_write_report"  # run while the report was written: its command closes the report
    assert all(f"```bash\n{s['command']}\n```" in report for s in steps[:-1])
    assert report.rstrip().endswith(f"```bash\n{steps[-1]['command']}\n```")
    page = at.report.with_suffix(".html").read_text()
    assert page.count('src="data:image/png;base64,') == len(images) and "<img" in page
    assert not re.search(r'src="(?!data:)', page)  # nothing linked: the file opens anywhere


@pytest.mark.slow
def test_a_step_reruns_alone_from_its_command_in_the_report(toy_demo):
    at = DemoLayout(toy_demo)
    step = next(s for s in json.loads(at.steps_file.read_text())["steps"] if s["name"].endswith("evaluate_slice_real"))
    metrics_file = at.slice_real / "eval" / "test_metrics.json"
    before = json.loads(metrics_file.read_text())
    metrics_file.unlink()
    subprocess.run(shlex.split(step["command"]), cwd=REPO, check=True, capture_output=True, timeout=300)
    assert json.loads(metrics_file.read_text())["mae"] == pytest.approx(before["mae"], abs=1e-6)


@pytest.mark.slow
def test_ixi_steps_preprocess_and_predict_the_real_scans_with_the_plain_warning(toy_demo, ixi_sample):
    """The IXI steps the toy demo skipped, run on its trained model; the report then lists both scans."""
    at = DemoLayout(toy_demo)
    settings = DemoSettings(**TOY)
    ixi_list = ixi_sample_datalist(ixi_sample, toy_demo / "ixi_raw_datalist.json")
    steps = [s for s in demo_steps(toy_demo, settings, ixi_list) if s.name.endswith(("preprocess_ixi", "predict_ixi"))]
    assert len(steps) == 2
    for step in steps:
        run_step(step, at.logs)
    with open(at.ixi_predictions / "inference_predictions.csv") as handle:
        rows = {r["subject"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"IXI012-HH-1211", "IXI015-HH-1258"}
    assert all(float(r["predicted_age"]) > 0 and r["age"] for r in rows.values())
    subprocess.run([sys.executable, "-m", "workflows", "demo-report", "--out", str(toy_demo)], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    report = at.report.read_text()
    assert "IXI012-HH-1211" in report and "pipeline check" in report and "not a clinical" in report


def test_report_on_a_failed_demo_names_the_failed_step(tmp_path):
    (tmp_path / "steps.json").write_text(json.dumps({"repository": str(REPO), "steps": [
        {"name": "03_train_gan", "command": "x", "outputs": "y", "log": str(tmp_path / "logs" / "03_train_gan.log"),
         "failed": True}]}))
    result = subprocess.run([sys.executable, "-m", "workflows", "demo-report", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "03_train_gan" in result.stderr and "03_train_gan.log" in result.stderr


def test_failing_step_names_its_command_and_log(tmp_path):
    step = Step("99_broken", [sys.executable, "-c", "print('partial output'); raise SystemExit(3)"], str(tmp_path))
    with pytest.raises(StepFailed, match="exit 3") as err:
        run_step(step, tmp_path / "logs")
    assert "raise SystemExit(3)" in str(err.value) and str(tmp_path / "logs" / "99_broken.log") in str(err.value)
    assert "partial output" in (tmp_path / "logs" / "99_broken.log").read_text()


def test_a_failing_demo_step_stops_the_demo_and_is_recorded(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # n=2 is below the simulator's minimum of 3 subjects
        run_demo(out=str(tmp_path), n_subjects=2, skip_ixi=True)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "01_simulate_cohort" in err and str(tmp_path / "logs" / "01_simulate_cohort.log") in err
    steps = json.loads((tmp_path / "steps.json").read_text())["steps"]
    assert len(steps) == 1 and steps[0]["failed"]
    assert not (tmp_path / "logs" / "02_simulate_ad_cohort.log").exists()


def test_ixi_sample_datalist_lists_both_real_scans(ixi_sample, tmp_path):
    splits = read_datalist(ixi_sample_datalist(ixi_sample, tmp_path / "ixi.json"))
    assert {r["subject"]: r["age"] for r in splits["test"]} == {"IXI012-HH-1211": 38.78, "IXI015-HH-1258": 24.28}
    assert all(r["image"].endswith("_T1.nii.gz") for r in splits["test"])


def test_switches_and_overrides_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(InputError, match="skip_ixi must be true or false"):
        run_demo(out=str(tmp_path), skip_ixi="maybe")
    with pytest.raises(InputError, match="slice_network must be a dict"):
        run_demo(out=str(tmp_path), skip_ixi="true", slice_network="[4, 8]")
    assert not (tmp_path / "steps.json").exists()
