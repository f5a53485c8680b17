"""The out-of-distribution check in both bundles: training writes ``models/input_reference.pt``, inference
writes ``inference_input_check.csv`` beside its outputs and flags the inputs unlike the training data
(contrast-inverted, un-normalised, noise) and none of the held-out subjects. The measures themselves are
tested on a simulated cohort and real raw IXI heads in tests/custom_components/common/test_input_reference.py."""
from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import run
from monai.data import load_decathlon_datalist
from reliability_helpers import AFFINE, BUNDLES, TINY_RUNS

from brainage_core.volumes import save_nifti


def _bad_inputs(good: dict, folder) -> list[dict]:
    """Records of volumes no model should be trusted on, made from one good subject's volume."""
    volume = np.asarray(nib.load(good["image"]).dataobj, dtype=np.float32)
    made = {"inverted": volume.max() - volume, "unnormalised": volume * 800.0,
            "noise": np.random.default_rng(0).random(volume.shape)}
    return [{**good, "image": str(save_nifti(data.astype(np.float32), AFFINE, folder / f"{name}.nii.gz")), "subject": name}
            for name, data in made.items()]


@pytest.mark.parametrize("bundle", TINY_RUNS)
def test_inference_flags_inputs_unlike_the_training_data_and_passes_held_out_ones(bundle, cohort, tmp_path):
    train_tiny, inference_tiny, _, outputs = TINY_RUNS[bundle]
    configs, root = BUNDLES / bundle / "configs", tmp_path / "run"
    run(config_file=str(configs / "train.json"), bundle_root=str(root), dataset_dir=str(cohort),
        **{**train_tiny, "train#trainer#max_epochs": 1})
    assert (root / "models" / "input_reference.pt").is_file()

    held_out = load_decathlon_datalist(str(cohort / "datalist.json"), True, "test")
    records = held_out + _bad_inputs(held_out[0], tmp_path)
    out = tmp_path / "out"
    run(config_file=str(configs / "inference.json"), bundle_root=str(root), output_dir=str(out),
        **{**inference_tiny, "dataset#data": records})
    assert sorted(outputs(out)) == sorted(record["subject"] for record in records)  # flagged ones get one too
    with open(out / "inference_input_check.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    flags = {row["subject"]: int(row["ood_flag"]) for row in rows}
    assert flags == {record["subject"]: int(record["subject"] in ("inverted", "unnormalised", "noise"))
                     for record in records}
    assert all(np.isfinite(float(row["ood_score"])) for row in rows)
