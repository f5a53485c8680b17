"""The tgb_gan_augment bundle end to end on a tiny 16^3 cohort: metadata, network I/O, training (and its
ablation), synthesis, region maps, inference, TorchScript export and 2-process DDP on CPU."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out
from monai.data import load_net_with_metadata

from brainage_core.datalist import read_datalist, write_datalist
from brainage_core.grid import canonical_grid
from brainage_core.volumes import save_nifti
from custom_components.tgb_gan.augmentation_study import reconstruction_records
from custom_components.tgb_gan.branch_regressor import train_branch_regressor
from custom_components.tgb_gan.networks import TGBGenerator

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "tgb_gan_augment"
CONFIGS = BUNDLE / "configs"
SCHEMA = Path(__file__).resolve().parents[3] / "shared" / "monai" / "meta_schema_20240725.json"
SIZE = 16
AFFINE = canonical_grid(12.0).affine
GENERATOR = {"image_size": [SIZE] * 3, "network_def#encoder_channels": [4, 8], "network_def#decoder_channels": [8, 4]}
TINY = {**GENERATOR, "critic_def#channels": [4, 8], "regressor_def#channels": [2, 4],
        "batch_size": 4, "n_grid_images": 2, "warmup_iterations": 0, "branch_regressor_epochs": 1}
# training ages: integer bins 30, 45 and 60 hold two or three subjects each; the rest one
TRAIN_AGES = [20.0, 25.0, 29.8, 30.1, 30.4, 35.0, 45.2, 44.6, 50.0, 55.0, 60.0, 60.3, 70.0, 80.0]
VAL_AGES, TEST_AGES = [33.0, 58.0, 77.0], [40.0, 65.0, 85.0]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A ball whose rim darkens and whose centre (a "ventricle") grows with age, plus the ground-truth map."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    grid = np.indices((SIZE,) * 3).astype(float) - SIZE / 2 + 0.5
    radius = np.sqrt((grid**2).sum(0))
    splits = {}
    for split, ages in (("training", TRAIN_AGES), ("validation", VAL_AGES), ("test", TEST_AGES)):
        splits[split] = []
        for age in ages:
            subject = f"sub-{len(sum(splits.values(), [])):02d}"
            volume = (radius < 6.5) * (1.0 - 0.005 * (age - 20)) + 0.05 * rng.random(radius.shape)
            volume[radius < 1.5 + 2.5 * (age - 20) / 70] = 0.1
            path = save_nifti(volume, AFFINE, root / subject / f"{subject}_T1w.nii.gz")
            splits[split].append({"image": str(path), "age": age, "sex": "F", "site": "a", "subject": subject})
    truth = ((radius < 4.0) | ((radius > 5.5) & (radius < 6.5))).astype(np.float32)
    save_nifti(truth, AFFINE, root / "derivatives" / "ground_truth" / "ageing_effect.nii.gz")
    write_datalist(root / "datalist.json", splits)
    return root


def run_workflow(configs, run_id="run", **override) -> ConfigWorkflow:
    files = [str(CONFIGS / name) for name in configs]
    workflow = ConfigWorkflow(config_file=files, meta_file=str(CONFIGS / "metadata.json"), run_id=run_id,
                              workflow_type=None, **override)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    workflow = run_workflow(["train.json"], bundle_root=str(root), dataset_dir=str(cohort),
                            **{**TINY, "train#trainer#max_epochs": 2})
    return root, workflow


def test_metadata_and_network_io():
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))
    verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                      config_file=str(CONFIGS / "inference.json"))


def test_train_writes_checkpoints_figures_and_metrics(trained):
    root, workflow = trained
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2
    losses = trainer.state.output[0]["losses"]
    assert {"g_loss", "adv", "l1", "age_mse", "d_loss", "wasserstein", "gp"} == set(losses)
    assert all(np.isfinite(v) for v in losses.values())
    metrics = workflow.parser.get_parsed_content("validate#evaluator").state.metrics
    assert set(metrics) >= {"val_l1", "val_ssim"} and all(np.isfinite(v) for v in metrics.values())
    age_metrics = workflow.parser.get_parsed_content("validate#age_evaluator").state.metrics
    assert np.isfinite(age_metrics["val_branch_age_mae"])

    last = torch.load(root / "models" / "checkpoint_last.pt", weights_only=True)
    assert set(last) == {"generator", "critic", "regressor", "g_optimizer", "d_optimizer", "warmup_optimizer",
                         "branch_optimizer", "g_lr_scheduler", "d_lr_scheduler", "branch_lr_scheduler", "trainer"}
    assert last["trainer"]["iteration"] == 2 * last["trainer"]["epoch_length"]
    assert last["g_lr_scheduler"]["last_epoch"] == last["trainer"]["iteration"]  # stepped per adversarial iteration
    model = torch.load(root / "models" / "model.pt", weights_only=True)  # the generator's plain state dict
    assert model.keys() == last["generator"].keys()
    for epoch in (1, 2):
        assert (root / "eval" / "reconstructions" / f"reconstructions_epoch_{epoch:04d}.png").stat().st_size > 0
    assert list((root / "eval").glob("events.out.tfevents.*"))


def test_default_branch_is_a_regressor_trained_on_the_real_volumes_first(trained, cohort, tmp_path):
    root, _ = trained
    branch = root / "branch_regressor"
    args = json.loads((branch / "branch_regressor_args.json").read_text())
    assert args["seed"] == 0 and args["dataset_dir"] == str(cohort) and args["augment_blur_prob"] == 0.5
    assert args["input_smoothing_sigma"] == 0  # the slice recipe this bundle's figures were measured with
    assert args["network_def#channels"] == [2, 4] and args["train#trainer#max_epochs"] == 1
    assert (branch / "eval" / "learning_curve.csv").is_file()  # a whole bundle run, its validation included
    regressor = torch.load(branch / "models" / "model.pt", weights_only=True)
    last = torch.load(root / "models" / "checkpoint_last.pt", weights_only=True)
    assert "branch_optimizer" in last and last["branch_optimizer"]["state"] == {}  # no warm-up branch training
    for name, value in regressor.items():  # the fixed branch kept the real-trained weights
        torch.testing.assert_close(last["regressor"][name], value, rtol=0, atol=0)
    stamp = (branch / "models" / "checkpoint_last.pt").stat().st_mtime_ns
    again = train_branch_regressor(branch, str(cohort), str(cohort / "datalist.json"), 0)
    assert again == str(branch / "models" / "model.pt")
    assert (branch / "models" / "checkpoint_last.pt").stat().st_mtime_ns == stamp  # reused, not retrained
    with pytest.raises(FileNotFoundError, match=r"nope\.json.*--real_trained_branch false"):
        train_branch_regressor(tmp_path / "other", str(cohort), str(cohort / "datalist.json"), 0,
                               config_files=[tmp_path / "nope.json"])


def test_ablation_override_removes_the_age_term(cohort, tmp_path):
    override = {**TINY, "train#trainer#max_epochs": 1, "loss#age_weight": 0}
    files = [str(CONFIGS / "train.json")]
    workflow = ConfigWorkflow(config_file=files, workflow_type=None, bundle_root=str(tmp_path),
                              dataset_dir=str(cohort), **override)
    workflow.initialize()
    regressor = workflow.parser.get_parsed_content("regressor")
    before = [p.detach().clone() for p in regressor.parameters()]
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert "age_mse" not in trainer.state.output[0]["losses"] and "l1" in trainer.state.output[0]["losses"]
    assert all(torch.equal(b, p) for b, p in zip(before, regressor.parameters()))
    validators = [h.validator for h in workflow.parser.get_parsed_content("train#handlers") if hasattr(h, "validator")]
    assert validators == [workflow.parser.get_parsed_content("validate#evaluator")]


def test_generate_writes_synthetic_volumes_merged_datalist_and_region_maps(trained, cohort):
    root, _ = trained
    run_workflow(["inference.json", "generate.json"], bundle_root=str(root), dataset_dir=str(cohort),
                 **{**GENERATOR, "synthesis#target_per_bin": 4, "seed": 3})
    datalist_path = root / "eval" / "synthetic" / "datalist.json"
    datalist = json.loads(datalist_path.read_text())
    splits = read_datalist(datalist_path)
    synthetic = [r for r in splits["training"] if r["synthetic"]]
    # bins 30 (3 subjects), 45 and 60 (2 each) are topped up to 4; single-subject bins get nothing
    assert len(synthetic) == 1 + 2 + 2 == datalist["n_synthetic"]
    assert sorted(int(np.floor(r["age"] + 0.5)) for r in synthetic) == [30, 45, 45, 60, 60]
    assert [r["age"] for r in splits["training"] if not r["synthetic"]] == TRAIN_AGES
    source = read_datalist(cohort / "datalist.json")
    assert splits["validation"] == source["validation"] and splits["test"] == source["test"]
    for record in synthetic:
        image = nib.load(record["image"])
        assert image.shape == (SIZE,) * 3 and np.isfinite(image.get_fdata()).all()
        np.testing.assert_allclose(image.affine, AFFINE, atol=1e-4)

    summary = json.loads((root / "eval" / "region_maps" / "region_maps.json").read_text())
    assert 0.0 <= summary["auc_group_means"] <= 1.0 and 0.0 <= summary["auc_traversal"] <= 1.0
    assert (root / "eval" / "region_maps" / "age_map_group_means.png").is_file()


def test_inference_reconstructs_and_encodes(trained, cohort, tmp_path):
    root, _ = trained
    common = {**GENERATOR, "bundle_root": str(root), "dataset_dir": str(cohort), "output_dir": str(tmp_path)}
    run_workflow(["inference.json"], **common)
    written = sorted(p.name for p in (tmp_path / "reconstructions").iterdir())
    assert written == [f"sub-{i}_T1w_recon.nii.gz" for i in (17, 18, 19)]
    named = reconstruction_records(root, read_datalist(cohort / "datalist.json")["test"])  # where the studies look
    assert sorted(Path(r["image"]).name for r in named) == written
    assert all(Path(r["image"]).parent == root / "eval" / "reconstructions" for r in named)
    run_workflow(["inference.json"], run_id="encode", **common)
    codes = torch.load(tmp_path / "latent_codes.pt", weights_only=True)
    assert codes["codes"].shape == (3, 8, 4, 4, 4)
    assert codes["ages"].tolist() == TEST_AGES


def test_ckpt_export_matches_the_eager_generator(trained, tmp_path):
    root, _ = trained
    exported = tmp_path / "model.ts"
    ckpt_export("network_def", filepath=str(exported), ckpt_file=str(root / "models" / "model.pt"),
                meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"),
                **GENERATOR)
    scripted, meta, _ = load_net_with_metadata(str(exported))
    assert meta["version"] == json.loads((CONFIGS / "metadata.json").read_text())["version"]
    upsampling = json.loads((CONFIGS / "inference.json").read_text())["network_def"]["upsampling"]
    eager = TGBGenerator(encoder_channels=(4, 8), decoder_channels=(8, 4), upsampling=upsampling)
    eager.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    eager.eval()
    x = torch.rand(2, 1, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x))


def test_two_process_gloo_ddp_trains_one_epoch(cohort, tmp_path):
    overrides = [arg for key, value in {**TINY, "batch_size": 2, "train#trainer#max_epochs": 1}.items()
                 for arg in (f"--{key}", json.dumps(value))]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "monai.bundle", "run",
               "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']",
               "--bundle_root", str(tmp_path), "--dataset_dir", str(cohort), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = torch.load(tmp_path / "models" / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 4  # 14 subjects split over 2 ranks, batches of 2 -> 4 per rank
    assert (tmp_path / "models" / "model.pt").is_file()
    # rank 0 alone writes logs and figures
    assert len({p.name.split(".")[-2] for p in (tmp_path / "eval").glob("events.out.tfevents.*")}) == 1


def test_augmentation_study_compares_three_training_sets_over_seeds_and_resumes(cohort, tmp_path, capsys):
    """evaluate.json end to end at toy size: both GAN variants, both downstream models, two seeds."""
    tiny = {"image_size": [SIZE] * 3, "gan_epochs": 1, "downstream_iterations": 2, "seeds": [0, 1], "n_train_real": 10,
            "gan_encoder_channels": [4, 8], "gan_decoder_channels": [8, 4],
            "gan_overrides#regressor_def": {"channels": [2, 4]},
            "downstream_models#regressor3d#overrides": {"network_def": {"channels": [2, 4]}},
            "gan_overrides#batch_size": 4, "gan_warmup_iterations": 0,
            "synthesis_overrides#synthesis#target_per_bin": 3}
    overrides = {"bundle_root": str(tmp_path), "dataset_dir": str(cohort), "config_dir": str(CONFIGS),
                 "downstream_config_dir": str(REPO / "bundles" / "slice_cnn_brainage" / "configs"), **tiny}
    run_workflow(["evaluate.json"], **overrides, jobs=2)  # trainings two at a time, in worker processes
    out = tmp_path / "eval" / "augmentation_study"
    # each job's output went to its own log: a training's progress and a GAN's synthesis
    assert "Epoch" in (out / "logs" / "slice_cnn_real_seed1.log").read_text()
    assert (out / "logs" / "gan_tgb_gan.log").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["model"], r["condition"]) for r in rows] == [
        (m, c) for m in ("regressor3d", "slice_cnn") for c in ("real", "tgb_gan", "gan_no_branch")]
    n_real = 10  # drawn from the 14 training subjects
    assert {r["condition"]: int(r["n_train"]) for r in rows}["real"] == n_real
    assert all(int(r["n_train"]) > n_real for r in rows if r["condition"] != "real")
    for row in rows:  # two seeds, two different models: a real spread, finite errors
        per_seed = [float(v) for v in row["mae_per_seed"].split()]
        assert len(per_seed) == 2 and all(np.isfinite(per_seed))
        assert float(row["mae_mean"]) == pytest.approx(np.mean(per_seed), abs=0.01)
    tests = list(csv.DictReader(open(out / "paired_tests.csv")))
    assert len(tests) == 6 and all(0.0 <= float(t["wilcoxon_p"]) <= 1.0 for t in tests)
    checks = {q["variant"]: q for q in csv.DictReader(open(out / "gan_checks.csv"))}
    assert set(checks) == {"tgb_gan", "gan_no_branch"}
    for check in checks.values():
        assert 0.0 < float(check["ms_ssim_real"]) <= 1.0 and float(check["mae_synthetic"]) >= 0
        assert float(check["retention_ratio"]) == pytest.approx(
            float(check["mae_reconstructed_test"]) / float(check["mae_real_test"]), rel=1e-6)
        assert all(0.0 <= float(check[k]) <= 1.0 for k in ("auc_group_means", "auc_traversal", "auc_real_group_means"))
    # the judge is the second seed's real-only 3D regressor; the TGB-GAN branch started from the first seed's
    branch_init = out / "downstream" / "regressor3d" / "real" / "seed0" / "models" / "model.pt"
    gan_model = torch.load(out / "gan" / "tgb_gan" / "models" / "checkpoint_last.pt", weights_only=True)
    assert branch_init.is_file() and gan_model["regressor"].keys() == torch.load(branch_init, weights_only=True).keys()
    report = (out / "results.md").read_text()
    assert "Wilcoxon" in report and "results.png" in report and (out / "results.png").stat().st_size > 0
    # a second run finds every step done and only rewrites the report
    capsys.readouterr()
    run_workflow(["evaluate.json"], **overrides)
    assert "train GAN tgb_gan: done before" in capsys.readouterr().out
