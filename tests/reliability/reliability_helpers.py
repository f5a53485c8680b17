"""Shared pieces of the reliability suite: a tiny cohort both bundles train on, their tiny settings, commands."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from brainage_core.datalist import write_datalist
from brainage_core.volumes import save_nifti

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
SIZE = 16
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
# the override keys a user would pass on the command line, making each bundle tiny
SLICE_TINY = {"image_size": [SIZE] * 3, "network_def#sfcn_channels": [4, 8], "min_free_mb": 1}
GAN_TINY = {"image_size": [SIZE] * 3, "network_def#encoder_channels": [4, 8], "network_def#decoder_channels": [8, 4],
            "critic_def#channels": [4, 8], "regressor_def#channels": [2, 4],
            "batch_size": 4, "n_grid_images": 2, "min_free_mb": 1, "warmup_iterations": 0,
            "real_trained_branch": False}  # its own tests (test_tgb_gan_bundle.py) cover the branch's pre-training


def ball(age: float, rng: np.random.Generator, shape=(SIZE,) * 3) -> np.ndarray:
    """A noisy ball whose centre (a "ventricle") grows with age."""
    grid = np.indices(shape).astype(float) - np.array(shape).reshape(3, 1, 1, 1) / 2 + 0.5
    radius = np.sqrt((grid**2).sum(0))
    volume = (radius < 6.5) * 1.0 + 0.05 * rng.random(shape)
    volume[radius < 1.5 + 2.5 * (age - 20) / 70] = 0.1
    return volume.astype(np.float32)


def make_cohort(root: Path, n: int = 12) -> Path:
    """``n`` subjects aged 20..80 on a 16^3 grid: 2/3 training, the rest split between validation and test."""
    rng = np.random.default_rng(0)
    records = []
    for i, age in enumerate(np.linspace(20, 80, n)):
        path = save_nifti(ball(age, rng), AFFINE, root / "images" / f"sub{i:02d}.nii.gz")
        records.append({"image": str(path), "age": float(age), "label": int(age > 50), "subject": f"sub{i:02d}"})
    splits = {"training": [r for i, r in enumerate(records) if i % 3 != 1],
              "validation": records[1::6], "test": records[4::6]}
    write_datalist(root / "datalist.json", splits)
    return root


def bundle_command(bundle: str, configs: list[str], bundle_root: Path, dataset_dir: Path, **override) -> list[str]:
    """``python -m monai.bundle run`` of ``bundle`` with ``override`` as ``--key value`` (run from the bundle folder)."""
    files = "[" + ",".join(f"'configs/{name}.json'" for name in configs) + "]"
    args = [arg for key, value in override.items() for arg in (f"--{key}", json.dumps(value))]
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(bundle_root),
            "--dataset_dir", str(dataset_dir), *args]


def _predicted_subjects(out: Path) -> list[str]:
    with open(out / "inference_predictions.csv", newline="") as handle:
        return [row["subject"] for row in csv.DictReader(handle)]


def _reconstructed_subjects(out: Path) -> list[str]:
    return [p.name.removesuffix("_recon.nii.gz") for p in sorted((out / "reconstructions").iterdir())]


# per bundle: tiny overrides of train.json, of inference.json, the net_override of monai.bundle.load, and
# the subjects inference wrote an output for
TINY_RUNS = {
    "slice_cnn_brainage": ({**SLICE_TINY, "train#dataloader#batch_size": 4},
                           {"image_size": SLICE_TINY["image_size"], "network_def#sfcn_channels": [4, 8], "min_free_mb": 1},
                           {"sfcn_channels": [4, 8], "spatial_shape": SLICE_TINY["image_size"]}, _predicted_subjects),
    "tgb_gan_augment": (GAN_TINY,
                        {"image_size": GAN_TINY["image_size"], "network_def#encoder_channels": [4, 8],
                         "network_def#decoder_channels": [8, 4], "min_free_mb": 1},
                        {"encoder_channels": [4, 8], "decoder_channels": [8, 4]}, _reconstructed_subjects),
}
