"""The MONAI Deploy application (``apps/brain_age_deploy/app.py``), run by the SDK's runner in its own process
on a packaged tiny slice bundle: its JSON holds the bundle's own predictions and gaps. Runs where the SDK is
installed (``pip install -e ".[deploy]"``), skipped elsewhere: the SDK pulls holoscan and a CUDA runtime
(about 1.5 GB), so the default test environment leaves it out."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from test_packaging import CASES

from brainage_core.volumes import save_nifti
from custom_components.common.brain_age import BiasCorrection
from workflows.packaging import BUNDLES_DIR, REPO, package_bundles

pytest.importorskip("holoscan")
pytest.importorskip("monai.deploy.core")

APP = REPO / "apps" / "brain_age_deploy" / "app.py"
AGES = {"a": 30.0, "b": 55.0, "c": 80.0}


@pytest.fixture(scope="module")
def bundle_and_inputs(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A tiny slice bundle (its bias correction fitted, so the corrected gap differs from the raw one)
    packaged and unzipped, and a folder of three volumes with ``ages.csv``."""
    root, case = tmp_path_factory.mktemp("deploy"), CASES["slice_cnn_brainage"]
    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / "slice_cnn_brainage" / "configs" / "inference.json"))
    parser.update(case["overrides"])
    torch.manual_seed(0)
    weights = case["weights"](parser.get_parsed_content("network_def"))
    weights["bias_correction.pt"] = BiasCorrection().fit([40.0, 50.0, 60.0], [20.0, 50.0, 80.0]).state_dict()
    (root / "run" / "models").mkdir(parents=True)
    for name, state in weights.items():
        torch.save(state, root / "run" / "models" / name)
    [zipped] = package_bundles(str(root / "dist"), "slice_cnn_brainage", models_from=str(root / "run"),
                               overrides=case["overrides"])
    with zipfile.ZipFile(zipped) as archive:
        archive.extractall(root / "unzipped")
    rng = np.random.default_rng(0)
    for subject in AGES:
        save_nifti(rng.random(case["shape"]), np.diag([4.0, 4.0, 4.0, 1.0]), root / "inputs" / f"{subject}.nii.gz")
    with open(root / "inputs" / "ages.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("subject", "age"), *AGES.items()])
    return root / "unzipped" / "slice_cnn_brainage", root / "inputs", case["overrides"]


def _app(inputs: Path, bundle: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(APP), "-i", str(inputs), "-m", str(bundle), "-o", str(out)]
    return subprocess.run(command, cwd=out.parent, capture_output=True, text=True, timeout=300)


def test_deploy_app_serves_the_bundles_predictions_and_gaps_as_json(bundle_and_inputs, tmp_path):
    bundle, inputs, overrides = bundle_and_inputs
    result = _app(inputs, bundle, tmp_path / "out")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    served = json.loads((tmp_path / "out" / "brain_age.json").read_text())

    reference = tmp_path / "reference"  # the repository's bundle and code on the same volumes
    workflow = ConfigWorkflow(config_file=str(BUNDLES_DIR / "slice_cnn_brainage" / "configs" / "inference.json"),
                              workflow_type=None, bundle_root=str(bundle), input_dir=str(inputs),
                              output_dir=str(reference), **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    with open(reference / "inference_predictions.csv", newline="") as handle:
        predicted = {row["subject"]: float(row["predicted_age"]) for row in csv.DictReader(handle)}
    correction = BiasCorrection()
    correction.load_state_dict(torch.load(bundle / "models" / "bias_correction.pt", weights_only=True))

    assert set(served) == set(predicted) == set(AGES)
    for subject, age in AGES.items():
        entry = served[subject]
        assert entry["predicted_age"] == pytest.approx(predicted[subject], abs=1e-3)
        assert entry["brain_age_gap"] == pytest.approx(entry["predicted_age"] - age, abs=1e-4)
        assert entry["corrected_gap"] == pytest.approx(float(correction.corrected_gap(entry["predicted_age"], age)), abs=1e-4)
        assert abs(entry["corrected_gap"] - entry["brain_age_gap"]) > 1  # the fitted correction was applied


def test_deploy_app_without_ages_serves_ages_only_and_refuses_a_partial_ages_file(bundle_and_inputs, tmp_path):
    bundle, inputs, _ = bundle_and_inputs
    no_ages = tmp_path / "no_ages"
    no_ages.mkdir()
    for volume in inputs.glob("*.nii.gz"):
        (no_ages / volume.name).write_bytes(volume.read_bytes())
    result = _app(no_ages, bundle, tmp_path / "out")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    served = json.loads((tmp_path / "out" / "brain_age.json").read_text())
    assert set(served) == set(AGES)
    assert all(e["predicted_age"] > 0 and e["brain_age_gap"] is None and e["corrected_gap"] is None for e in served.values())

    (no_ages / "ages.csv").write_text("subject,age\na,30\n")
    result = _app(no_ages, bundle, tmp_path / "out2")
    assert result.returncode != 0 and "no age for b, c" in result.stdout + result.stderr
