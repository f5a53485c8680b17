"""How well can any map computed from real images find the simulator's ageing regions? The bar for the
TGB-GAN's latent-space maps (issue 13 asks for ROC AUC >= 0.85 against ``ageing_effect.nii.gz``).

For random subsets of n subjects of a simulated cohort (all splits pooled; ``--repeats`` draws per n),
two network-free maps are scored with the bundle's own scorer (``region_maps.map_auc``, brain = mean
image above 5 % of its maximum, as ``generate.json``):

- group means: mean image of the oldest quarter minus that of the youngest (the bundle's baseline);
- slope: the voxel-wise least-squares slope of intensity on age over all n subjects (uses every subject,
  so less noisy than the quarters).

Both on the volumes as stored and after the bundles' ``NormalizeIntensity`` (z-score per volume), at the
ground-truth thresholds given (a voxel is an "ageing region" where its true effect exceeds that fraction
of the maximum). A GAN trained on n subjects sees no more than these n images, so these maps at the same
n say what a latent-space map can be expected to reach.

    python benchmarks/region_map_ceiling.py --cohort runs/exp/cohort400 --out runs/region_map_ceiling
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from brainage_core.datalist import read_datalist
from custom_components.tgb_gan.region_maps import age_groups, map_auc
from data_prep.simulate import GROUND_TRUTH


def load_cohort(cohort: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every subject's volume (N, D, H, W) and age, all splits of ``datalist.json`` pooled."""
    records = [r for split in read_datalist(cohort / "datalist.json").values() for r in split]
    volumes = np.stack([nib.load(r["image"]).get_fdata(dtype=np.float32) for r in records])
    return volumes, np.array([float(r["age"]) for r in records])


def z_scored(volumes: np.ndarray) -> np.ndarray:
    """Per-volume z-score over the whole grid: MONAI's NormalizeIntensityd as the bundles run it."""
    axes = tuple(range(1, volumes.ndim))
    return (volumes - volumes.mean(axes, keepdims=True)) / volumes.std(axes, keepdims=True)


def group_means_map(volumes: np.ndarray, ages: np.ndarray) -> np.ndarray:
    young, old = age_groups(ages)
    return volumes[old].mean(0) - volumes[young].mean(0)


def slope_map(volumes: np.ndarray, ages: np.ndarray) -> np.ndarray:
    centred = ages - ages.mean()
    return np.tensordot(centred, volumes - volumes.mean(0), axes=(0, 0)) / (centred @ centred)


MAPS = {"group means": group_means_map, "slope": slope_map}


def scores(volumes: np.ndarray, ages: np.ndarray, truth: np.ndarray, thresholds) -> dict[str, float]:
    """AUC of each map, on stored and z-scored intensities, at each truth threshold."""
    out = {}
    for intensities, data in (("stored", volumes), ("z-scored", z_scored(volumes))):
        mean = data.mean(0)
        brain = mean > 0.05 * mean.max()
        for name, make in MAPS.items():
            effect = make(data, ages)
            for threshold in thresholds:
                out[f"{name}, {intensities}, truth > {threshold:g} max"] = map_auc(effect, truth, threshold, brain)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True, help="a simulate-cohort output folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 280, 400])
    parser.add_argument("--repeats", type=int, default=5, help="random subsets per size (one when n is everyone)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    volumes, ages = load_cohort(args.cohort)
    truth = nib.load(args.cohort / GROUND_TRUTH / "ageing_effect.nii.gz").get_fdata()
    rng = np.random.default_rng(args.seed)
    table = {}
    for n in args.sizes:
        if n > len(ages):
            raise SystemExit(f"--sizes {n}: the cohort has {len(ages)} subjects")
        draws = 1 if n == len(ages) else args.repeats
        runs = [scores(volumes[idx], ages[idx], truth, args.thresholds)
                for idx in (rng.choice(len(ages), n, replace=False) for _ in range(draws))]
        table[n] = {key: [run[key] for run in runs] for key in runs[0]}
        print(f"n={n}: " + "; ".join(f"{k} {np.mean(v):.3f}" for k, v in table[n].items()), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "region_map_ceiling.json").write_text(json.dumps(table, indent=1) + "\n")
    keys = list(next(iter(table.values())))
    lines = [f"Real-image age maps against `{args.cohort}`'s ageing_effect: ROC AUC, mean +/- SD over random "
             f"subsets ({args.repeats} per n, seed {args.seed}).", "",
             "| map | " + " | ".join(f"n={n}" for n in table) + " |", "|---|" + "---|" * len(table)]
    for key in keys:
        cells = [f"{np.mean(table[n][key]):.3f} +/- {np.std(table[n][key]):.3f}" if len(table[n][key]) > 1
                 else f"{table[n][key][0]:.3f}" for n in table]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    (args.out / "region_map_ceiling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
