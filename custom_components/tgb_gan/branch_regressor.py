"""The task branch's default start: a 3D age regressor trained on the GAN's real training volumes first.

A branch that learns age only in the GAN's short warm-up stays near the linear baseline, and on one seed in
three the generator then wrote age into the reconstructions in a way only that branch reads (age retention
1.18-1.27x). Started from a regressor trained on real volumes alone (the study's and the judge's recipe:
the slice bundle's ``train.json`` with this bundle's ``downstream_regressor3d.json``, half its volumes
smoothed) every seed kept age (the tgb bundle's docs, Performance). This module runs that training in the
GAN's folder, so ``train.json`` at its defaults does the two steps.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch.distributed as dist

from brainage_core.volumes import atomic_path
from custom_components.tgb_gan.augmentation_study import flatten_overrides

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"
DEFAULT_CONFIGS = (BUNDLES_DIR / "slice_cnn_brainage" / "configs" / "train.json",
                   BUNDLES_DIR / "tgb_gan_augment" / "configs" / "downstream_regressor3d.json")
POLL_SECONDS = 5.0


def train_branch_regressor(root: str | Path, dataset_dir: str, datalist_file: str, seed: int,
                           config_files: Sequence[str | Path] | None = None,
                           overrides: Mapping | None = None) -> str:
    """Train the branch's regressor on the real training split in ``root`` and return its ``models/model.pt``.

    ``config_files`` are layered into one bundle run (None: :data:`DEFAULT_CONFIGS`, the files of this
    repository); ``overrides`` are its config overrides as nested dicts (``{"augment_blur_prob": 0.5,
    "network_def": {"channels": [...]}}``), applied leaf by leaf; a ``device`` (the GAN's) is written as the
    expression that makes it, ``$torch.device('cuda:0')``. The run is its own process
    (``python -m monai.bundle run --args_file ROOT/branch_regressor_args.json``, the file kept beside its
    outputs): the same run as that command typed by hand, and no random, logging or distributed state
    shared with the GAN. A run whose final checkpoint exists is reused, so a resumed or repeated GAN
    training does not retrain it (a killed one resumes from its per-epoch checkpoint). Under DDP rank 0
    trains it while the other ranks wait for its checkpoint (torchrun stops them if rank 0 fails).
    """
    root = Path(root)
    done = root / "models" / "checkpoint_last.pt"
    if done.exists():
        return str(root / "models" / "model.pt")
    files = [Path(f) for f in (DEFAULT_CONFIGS if config_files is None else config_files)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the task branch's real-trained start needs the regressor's configs, not found: {missing}. Pass "
            "--branch_regressor_configs with the slice bundle's train.json and this bundle's "
            "downstream_regressor3d.json, or --branch_init_weights FILE (a trained AgeCNN3d state dict), "
            "or --real_trained_branch false (the branch then learns age in the warm-up)")
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        while not done.exists():
            time.sleep(POLL_SECONDS)
        return str(root / "models" / "model.pt")
    args = {"config_file": [str(f.resolve()) for f in files], "bundle_root": str(root),
            "dataset_dir": str(dataset_dir), "datalist_file": str(datalist_file), "seed": int(seed),
            **{key: f"$torch.device('{value}')" if key == "device" else value
               for key, value in flatten_overrides(overrides or {}).items()}}
    args_file = root / "branch_regressor_args.json"
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(args_file) as tmp:
        Path(tmp).write_text(json.dumps(args, indent=2))
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--args_file", str(args_file)], check=True)
    if not done.exists():
        raise RuntimeError(f"the branch regressor's training finished without writing {done}")
    return str(root / "models" / "model.pt")
