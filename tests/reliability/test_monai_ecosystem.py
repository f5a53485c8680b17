"""The bundles driven as MONAI's own tools drive them: experiment tracking with ``--tracking mlflow``."""
from __future__ import annotations

import pytest
from monai.bundle import run

from reliability_helpers import BUNDLES, GAN_TINY, SLICE_TINY

mlflow = pytest.importorskip("mlflow", reason="mlflow is the optional 'tracking' extra")

# every training config: (bundle, configs, overrides, the validation key metric the run must log)
TRAINING = {
    "slice": ("slice_cnn_brainage", ["train"], {**SLICE_TINY, "train#dataloader#batch_size": 4}, "val_mae"),
    "slice_ad": ("slice_cnn_brainage", ["train", "train_ad"], {**SLICE_TINY, "train#dataloader#batch_size": 4}, "val_auc"),
    "tgb_gan": ("tgb_gan_augment", ["train"], GAN_TINY, "val_l1"),
}


@pytest.mark.parametrize("case", TRAINING)
def test_tracking_mlflow_logs_training_loss_and_validation_metrics(case, cohort, tmp_path, monkeypatch):
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
