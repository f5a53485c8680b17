"""Packaging for sharing: each bundle zipped in the Model Zoo layout runs its inference.json from an empty
folder, in a Python that cannot import this repository's packages, and predicts what the repository does.

The weights are a tiny network built from the bundle's own inference config (no training); the inputs are
three tiny random volumes.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata

from brainage_core.volumes import save_nifti
from custom_components.common.brain_age import BiasCorrection
from custom_components.common.input_reference import InputReference
from workflows.__main__ import main
from workflows.packaging import BUNDLES_DIR, VENDORED, package_bundles

SCHEMA = Path(__file__).resolve().parents[3] / "shared" / "monai" / "meta_schema_20240725.json"
REPOSITORY_PACKAGES = ("brainage_core", "custom_components", "data_prep", "workflows")  # none importable in the test
SUBJECTS = ("a", "b", "c")
METRICS = {"n": 60, "mae": 5.58, "pearson_r": 0.943, "note": "not a number: left out"}  # a run's eval/test_metrics.json


def _predicted_ages(eval_dir: Path) -> dict[str, float]:
    with open(eval_dir / "inference_predictions.csv", newline="") as handle:
        return {row["subject"]: float(row["predicted_age"]) for row in csv.DictReader(handle)}


def _reconstructions(eval_dir: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted((eval_dir / "reconstructions").iterdir())}


def _input_reference(shape) -> dict:
    volumes = [np.random.default_rng(k).random(shape) for k in range(4)]
    return InputReference(shape).fit(lambda: iter(volumes)).state_dict()


# per bundle: tiny sizes (config overrides), the weight files its inference.json loads, its outputs by subject
CASES = {
    "slice_cnn_brainage": dict(
        shape=(16, 20, 16),
        overrides={"image_size": [16, 20, 16], "network_def#sfcn_channels": [4, 8]},
        weights=lambda net: {"model.pt": net.state_dict(), "bias_correction.pt": BiasCorrection().state_dict(),
                             "input_reference.pt": _input_reference((16, 20, 16))},
        outputs=_predicted_ages,
        expected=set(SUBJECTS),
    ),
    "tgb_gan_augment": dict(
        shape=(16, 16, 16),
        overrides={"image_size": [16, 16, 16], "network_def#encoder_channels": [4, 8],
                   "network_def#decoder_channels": [8, 4]},
        weights=lambda net: {"model.pt": net.state_dict(), "input_reference.pt": _input_reference((16, 16, 16))},
        outputs=_reconstructions,
        expected={f"{s}_recon.nii.gz" for s in SUBJECTS},
    ),
}


@pytest.fixture(scope="module")
def isolated_env(tmp_path_factory) -> dict:
    """An environment in which no package of this repository imports (``brainage_core``, ``custom_components``,
    ``data_prep``, ``workflows``): packages of those names that raise, first on PYTHONPATH, shadow the editable
    install of this repository."""
    shadow = tmp_path_factory.mktemp("shadow")
    for name in REPOSITORY_PACKAGES:
        (shadow / name).mkdir()
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    return {**os.environ, "PYTHONPATH": str(shadow), "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", params=sorted(CASES))
def packaged(request, tmp_path_factory) -> dict:
    """A tiny model.pt in a run folder, three input volumes, and the bundle packaged with the CLI."""
    name, case = request.param, CASES[request.param]
    root = tmp_path_factory.mktemp(name)
    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / name / "configs" / "inference.json"))
    parser.update(case["overrides"])
    torch.manual_seed(0)
    (root / "run" / "models").mkdir(parents=True)
    for filename, state in case["weights"](parser.get_parsed_content("network_def")).items():
        torch.save(state, root / "run" / "models" / filename)
    rng = np.random.default_rng(0)
    for subject in SUBJECTS:
        save_nifti(rng.random(case["shape"]), np.diag([4.0, 4.0, 4.0, 1.0]), root / "inputs" / f"{subject}.nii.gz")
    (root / "run" / "eval").mkdir()
    (root / "run" / "eval" / "test_metrics.json").write_text(json.dumps(METRICS))
    args = ["package-bundles", "--bundles", name, "--models_from", str(root / "run"), "--out_dir", str(root / "dist"),
            "--overrides", json.dumps(case["overrides"]), "--eval_metrics", str(root / "run" / "eval" / "test_metrics.json")]
    assert main(args) == 0
    return {"name": name, "root": root, "zip": next((root / "dist").glob(f"{name}_v*.zip")), **case}


def _unzipped(package: dict, folder: str = "unzipped") -> Path:
    """The zip extracted into a new empty folder; returns the bundle folder inside it."""
    target = package["root"] / folder
    target.mkdir()
    assert not any(target.iterdir())
    with zipfile.ZipFile(package["zip"]) as archive:
        archive.extractall(target)
    assert [p.name for p in target.iterdir()] == [package["name"]]
    return target / package["name"]


@pytest.mark.slow
def test_packaged_inference_runs_without_this_repository(packaged, isolated_env):
    bundle = _unzipped(packaged)
    for blocked in REPOSITORY_PACKAGES:  # the packaged run cannot reach the repository's code
        check = subprocess.run([sys.executable, "-c", f"import {blocked}"], cwd=bundle, env=isolated_env,
                               capture_output=True, text=True)
        assert check.returncode != 0 and f"{blocked} is blocked" in check.stderr
    where = subprocess.run([sys.executable, "-c", "import scripts.custom_components.common.data as m; print(m.__file__)"],
                           cwd=bundle, env=isolated_env, capture_output=True, text=True)
    assert Path(where.stdout.strip()).is_relative_to(bundle), where.stderr

    inputs = packaged["root"] / "inputs"  # the training overrides are in the packaged configs: none given here
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
               "--input_dir", str(inputs)]
    result = subprocess.run(command, cwd=bundle, env=isolated_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # the same inference with the repository's bundle and code gives the same outputs
    reference = packaged["root"] / "reference"
    workflow = ConfigWorkflow(config_file=str(BUNDLES_DIR / packaged["name"] / "configs" / "inference.json"),
                              workflow_type=None, bundle_root=str(packaged["root"] / "run"), input_dir=str(inputs),
                              output_dir=str(reference), **packaged["overrides"])
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    got, want = packaged["outputs"](bundle / "eval"), packaged["outputs"](reference)
    assert set(got) == set(want) == packaged["expected"]
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(got[key]))
    # the vendored input check scores like the repository's
    checks = [pd.read_csv(folder / "inference_input_check.csv") for folder in (bundle / "eval", reference)]
    assert np.isfinite(checks[0].ood_score).all()
    pd.testing.assert_frame_equal(*checks)


def test_package_holds_model_zoo_layout_and_only_rewritten_code(packaged):
    name = packaged["name"]
    with zipfile.ZipFile(packaged["zip"]) as archive:
        files = {n.removeprefix(f"{name}/"): archive.read(n) for n in archive.namelist()}
    source = BUNDLES_DIR / name
    for required in ("configs/metadata.json", "configs/inference.json", "docs/README.md", "LICENSE",
                     "large_files.yml", "models/model.pt", "scripts/__init__.py"):
        assert required in files
    meta = json.loads(files["configs/metadata.json"])
    assert packaged["zip"].name == f"{name}_v{meta['version']}.zip"
    again = package_bundles(str(packaged["root"] / "again"), name, models_from=str(packaged["root"] / "run"),
                            overrides=packaged["overrides"], eval_metrics=str(packaged["root"] / "run" / "eval" / "test_metrics.json"))
    assert Path(again[0]).read_bytes() == packaged["zip"].read_bytes()  # reproducible: fixed entry times, sorted
    image = meta["network_data_format"]["inputs"]["image"]  # the trained image_size, the rest as in the repository
    assert image.pop("spatial_shape") == list(packaged["shape"])
    source_meta = json.loads((source / "configs" / "metadata.json").read_text())
    del source_meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    assert meta["network_data_format"]["inputs"]["image"] == source_meta["network_data_format"]["inputs"]["image"]
    assert SCHEMA.is_file(), f"schema copy missing at {SCHEMA}"
    meta_copy = packaged["root"] / "metadata.json"
    meta_copy.write_bytes(files["configs/metadata.json"])
    verify_metadata(meta_file=str(meta_copy), filepath=str(SCHEMA))
    assert files["models/model.pt"] == (packaged["root"] / "run" / "models" / "model.pt").read_bytes()
    assert meta["eval_metrics"] == {"test_n": 60, "test_mae": 5.58, "test_pearson_r": 0.943}
    listed = {entry["path"]: entry for entry in yaml.safe_load(files["large_files.yml"])["large_files"]}
    for path in (p for p in files if p.startswith("models/")):  # every packaged weight file carries its hash
        assert listed[path]["hash_type"] == "sha256" and listed[path]["hash_val"] == hashlib.sha256(files[path]).hexdigest()
    assert listed["models/model.ts"]["hash_val"] == ""  # not packaged: as listed

    # vendored: the modules the bundle needs, none other, importing each other only as scripts.<package>
    assert VENDORED == ("brainage_core", "custom_components")
    modules = {path for path in files if path.startswith("scripts/") and path.endswith(".py")}
    assert {path.split("/")[1] for path in modules if path != "scripts/__init__.py"} == set(VENDORED)
    assert not [path for path in files if {"data_prep", "workflows"} & set(Path(path).parts)]  # nor their files
    needs = {"slice_cnn_brainage": "slice_cnn/networks/slice_set.py", "tgb_gan_augment": "tgb_gan/networks.py"}
    for bundle, module in needs.items():
        assert (f"scripts/custom_components/{module}" in modules) == (bundle == name)
    other = {"slice_cnn_brainage": "tgb_gan", "tgb_gan_augment": "slice_cnn"}[name]  # the other bundle's own code
    assert not [path for path in modules if path.startswith(f"scripts/custom_components/{other}/")]
    assert "scripts/brainage_core/volumes.py" in modules and "scripts/brainage_core/cli.py" not in modules
    for path in modules:
        for node in ast.walk(ast.parse(files[path])):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not [m for m in imported if m.split(".")[0] in REPOSITORY_PACKAGES], f"{path} imports {imported}"
    for path in (p for p in files if p.startswith("configs/") and p.endswith(".json")):
        text = files[path].decode()
        for package in REPOSITORY_PACKAGES:  # every reference to this repository's code is to scripts.<package>
            assert not [ref for ref in (f'"{package}.', f"import {package}", f"from {package}") if ref in text], path


# The Model Zoo's ci/verify_bundle.py checks, with its default arguments, run in the unzipped bundle's folder;
# then the exported TorchScript against the eager network with the same weights.
ZOO_CI = """
import json, torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
meta, config = "configs/metadata.json", "configs/inference.json"
verify_metadata(meta_file=meta, filepath={schema!r})
verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=".")
ckpt_export(net_id="network_def", filepath="models/verify_model.ts", ckpt_file="models/model.pt",
            meta_file=meta, config_file=config, bundle_root=".")
parser = ConfigParser()
parser.read_config(config)
eager = parser.get_parsed_content("network_def")
eager.load_state_dict(torch.load("models/model.pt", weights_only=True))
scripted = torch.jit.load("models/verify_model.ts")
shape = json.load(open(meta))["network_data_format"]["inputs"]["image"]["spatial_shape"]
x = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.testing.assert_close(scripted.eval()(x), eager.eval()(x), rtol=1e-5, atol=1e-5)
print("model zoo checks passed")
"""


def test_model_zoo_ci_checks_pass_on_the_unzipped_bundle_with_default_arguments(packaged, isolated_env):
    bundle = _unzipped(packaged, "zoo_ci")
    result = subprocess.run([sys.executable, "-c", ZOO_CI.format(schema=str(SCHEMA))], cwd=bundle, env=isolated_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "model zoo checks passed" in result.stdout


def test_packaging_refuses_when_a_config_needs_absent_weights(tmp_path, capsys):
    (tmp_path / "run" / "models").mkdir(parents=True)
    code = main(["package-bundles", "--bundles", "slice_cnn_brainage", "--models_from", str(tmp_path / "run"),
                 "--out_dir", str(tmp_path / "dist")])
    err = capsys.readouterr().err
    assert code == 2
    assert "configs/inference.json" in err and "models/model.pt" in err and str(tmp_path / "run") in err
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


@pytest.mark.parametrize("content", ["{not json", '["a", "list"]', '{"note": "no numbers"}'])
def test_packaging_refuses_eval_metrics_without_numbers(tmp_path, capsys, content):
    metrics = tmp_path / "test_metrics.json"
    metrics.write_text(content)
    code = main(["package-bundles", "--bundles", "slice_cnn_brainage", "--eval_metrics", str(metrics),
                 "--out_dir", str(tmp_path / "dist")])
    assert code == 2 and str(metrics) in capsys.readouterr().err
    assert not (tmp_path / "dist").exists()
