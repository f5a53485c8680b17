"""The bundles driven as MONAI's own tools drive them: experiment tracking with ``--tracking mlflow``, data
passed in memory, the network loaded with ``monai.bundle.load``."""
from __future__ import annotations

import shutil

import pytest
import torch
from monai.bundle import load, run
from monai.data import load_decathlon_datalist
from reliability_helpers import BUNDLES, GAN_TINY, SLICE_TINY, TINY_RUNS

from brainage_core.checks import user_error_message

# every training config: (bundle, configs, overrides, the validation key metric the run must log)
TRAINING = {
    "slice": ("slice_cnn_brainage", ["train"], {**SLICE_TINY, "train#dataloader#batch_size": 4}, "val_mae"),
    "slice_ad": ("slice_cnn_brainage", ["train", "train_ad"], {**SLICE_TINY, "train#dataloader#batch_size": 4}, "val_auc"),
    "tgb_gan": ("tgb_gan_augment", ["train"], GAN_TINY, "val_l1"),
}


@pytest.mark.parametrize("case", TRAINING)
def test_tracking_mlflow_logs_training_loss_and_validation_metrics(case, cohort, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is the optional 'tracking' extra (installed by 'test')")
    bundle, configs, tiny, key_metric = TRAINING[case]
    monkeypatch.chdir(tmp_path)  # MLflow puts the run's artifacts (the executed config) in ./mlruns
    run(config_file=[str(BUNDLES / bundle / "configs" / f"{name}.json") for name in configs], bundle_root=str(tmp_path),
        dataset_dir=str(cohort), tracking="mlflow", experiment_name=case,
        **{**tiny, "train#trainer#max_epochs": 2, "val_interval": 1})
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")  # MONAI's default store
    runs = client.search_runs([client.get_experiment_by_name(case).experiment_id])
    logged = {key: client.get_metric_history(r.info.run_id, key) for r in runs for key in r.data.metrics}
    iterations = 2 * -(-8 // tiny.get("batch_size", 4))  # 8 training subjects, 2 epochs
    assert [m.step for m in logged["train_loss"]] == list(range(1, iterations + 1))
    assert all(m.value == m.value for m in logged["train_loss"])  # finite numbers, not NaN
    assert [m.step for m in logged[key_metric]] == [1, 2]


@pytest.mark.parametrize("bundle", TINY_RUNS)
def test_run_and_load_with_data_passed_in_memory_and_no_datalist_file(bundle, cohort, tmp_path, monkeypatch):
    """As MONAI Label and MONAI FL drive a bundle: records as config overrides, no datalist file on disk."""
    train_tiny, inference_tiny, net_override, outputs = TINY_RUNS[bundle]
    monkeypatch.chdir(tmp_path)
    records = {split: load_decathlon_datalist(str(cohort / "datalist.json"), True, split)
               for split in ("training", "validation", "test")}
    configs, root, no_file = BUNDLES / bundle / "configs", tmp_path / bundle, str(tmp_path / "no_datalist.json")
    run(config_file=str(configs / "train.json"), bundle_root=str(root), datalist_file=no_file,
        **{**train_tiny, "train#trainer#max_epochs": 1, "train#dataset#data": records["training"],
           "validate#dataset#data": records["validation"]})
    weights = torch.load(root / "models" / "model.pt", weights_only=True)

    out = tmp_path / "out"
    run(config_file=str(configs / "inference.json"), bundle_root=str(root), datalist_file=no_file,
        output_dir=str(out), **{**inference_tiny, "dataset#data": records["test"]})
    assert outputs(out) == [record["subject"] for record in records["test"]]

    shutil.copytree(configs, root / "configs")  # the bundle layout monai.bundle.load reads: <bundle_dir>/<name>/
    network = load(bundle, bundle_dir=str(tmp_path), workflow_type="inference", net_override=net_override)
    assert network.state_dict().keys() == weights.keys()
    assert all(torch.equal(network.state_dict()[key].cpu(), value) for key, value in weights.items())


def test_records_passed_in_memory_are_checked_before_the_run(cohort, tmp_path):
    records = load_decathlon_datalist(str(cohort / "datalist.json"), True, "training")
    broken = [{**records[0], "image": str(tmp_path / "gone.nii.gz")}, {**records[1], "age": "old"}, *records[2:]]
    with pytest.raises(Exception) as err:
        run(config_file=str(BUNDLES / "slice_cnn_brainage" / "configs" / "train.json"), bundle_root=str(tmp_path),
            datalist_file=str(tmp_path / "no_datalist.json"),
            **{**SLICE_TINY, "train#dataset#data": broken, "validate#dataset#data": records[:2]})
    message = user_error_message(err.value)
    assert message.startswith("input images: 4 problem(s) found before the run started")
    assert f"training[0] (subject {records[0]['subject']}): {tmp_path / 'gone.nii.gz'}: file not found" in message
    assert f"training[1] (subject {records[1]['subject']}): age" in message
    assert f"validation[0] (subject {records[0]['subject']}): subject {records[0]['subject']} is in two splits" in message
    assert not list(tmp_path.rglob("*.pt"))  # stopped before any training
