"""Age-related region maps from the TGB-GAN latent space, and their score against a ground-truth map.

Two maps of "what changes with age", both decoded images minus decoded images (old minus young):

- group means: the decoded mean code of the oldest subjects minus that of the youngest (ages at or above
  the ``1 - group_quantile`` quantile, at or below the ``group_quantile`` quantile);
- traversal: the mean code moved along the latent age direction (``synthesis.fit_age_direction``) to the
  old and to the young group's mean age, decoded, subtracted.

Beside them, the baseline any latent-space map has to beat: the mean of the old group's real (preprocessed)
images minus that of the young group's, with no network at all.

Scoring (the simulated cohort's ``derivatives/ground_truth/ageing_effect.nii.gz``): ROC AUC of ``|map|``
for telling voxels whose true effect exceeds ``truth_threshold`` times its maximum from the others, over
the brain (voxels of the decoded mean image above ``brain_threshold`` times its maximum).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from brainage_core.volumes import atomic_path, save_nifti
from custom_components.common.plots import map_overlay_figure, save_figure

from .synthesis import LatentSet, fit_age_direction

MAP_NAMES = ("group_means", "traversal", "real_group_means")


def decode_codes(generator: nn.Module, codes: torch.Tensor, device: str | torch.device = "cpu") -> np.ndarray:
    """Decode (N, C, d, h, w) codes to (N, D, H, W) volumes of the first channel, without gradients."""
    generator.eval()
    with torch.no_grad():
        return generator.decode(codes.to(device)).float().cpu().numpy()[:, 0]


def age_groups(ages, group_quantile: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the young and the old group: ages at or below / at or above the age quantiles."""
    ages = np.asarray(ages, dtype=np.float64)
    if not 0 < group_quantile <= 0.5:
        raise ValueError(f"group_quantile must lie in (0, 0.5], got {group_quantile}")
    low, high = np.quantile(ages, [group_quantile, 1 - group_quantile])
    young, old = ages <= low, ages >= high
    if low >= high:
        raise ValueError(f"the young and old groups overlap (ages {low:g} to {high:g}); the ages barely vary")
    return young, old


def real_group_mean_map(records, transform: Callable, young: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Mean preprocessed real image of the old group minus that of the young group (first channel)."""
    def group_mean(mask: np.ndarray) -> np.ndarray:
        images = [np.asarray(torch.as_tensor(transform({"image": records[i]["image"]})["image"]))[0]
                  for i in np.flatnonzero(mask)]
        return np.mean(images, axis=0)
    return group_mean(old) - group_mean(young)


def region_maps(generator: nn.Module, latents: LatentSet, group_quantile: float = 0.25, ridge_alpha: float = 1.0,
                device: str | torch.device = "cpu", transform: Callable | None = None) -> dict:
    """The group-means and traversal maps, the decoded mean image, and the group sizes and mean ages; with
    ``transform`` (the images' preprocessing) also the real-image group-mean map ``real_group_means``."""
    ages = np.asarray(latents.ages, dtype=np.float64)
    young, old = age_groups(ages, group_quantile)
    codes = latents.codes
    mean_code = codes.mean(0)
    direction = fit_age_direction(latents.flat(), ages, ridge_alpha)
    step = torch.as_tensor(direction.year_step(), dtype=torch.float32).reshape(mean_code.shape)
    young_age, old_age = float(ages[young].mean()), float(ages[old].mean())
    start = float(direction.predict(mean_code.reshape(1, -1).double().numpy())[0])
    stack = torch.stack([codes[young].mean(0), codes[old].mean(0), mean_code,
                         mean_code + (young_age - start) * step, mean_code + (old_age - start) * step])
    young_image, old_image, mean_image, young_traversed, old_traversed = decode_codes(generator, stack, device)
    maps = {"group_means": old_image - young_image, "traversal": old_traversed - young_traversed,
            "mean_image": mean_image, "n_young": int(young.sum()), "n_old": int(old.sum()),
            "young_age": young_age, "old_age": old_age}
    if transform is not None:
        maps["real_group_means"] = real_group_mean_map(latents.records, transform, young, old)
    return maps


def map_auc(effect_map, truth, truth_threshold: float = 0.1, mask=None) -> float:
    """ROC AUC of ``|effect_map|`` for the voxels where ``truth`` exceeds ``truth_threshold * max(truth)``."""
    effect_map, truth = np.asarray(effect_map, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if effect_map.shape != truth.shape:
        raise ValueError(f"map shape {effect_map.shape} differs from ground-truth shape {truth.shape}")
    mask = np.ones(truth.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    positive = truth[mask] > truth_threshold * truth.max()
    if positive.all() or not positive.any():
        raise ValueError("the ground truth marks all or none of the scored voxels; change truth_threshold")
    return float(roc_auc_score(positive, np.abs(effect_map[mask])))


def write_region_maps(generator: nn.Module, latents: LatentSet, output_dir: str, group_quantile: float = 0.25,
                      ridge_alpha: float = 1.0, ground_truth: str | None = None, truth_transform: Callable | None = None,
                      truth_threshold: float = 0.1, brain_threshold: float = 0.05,
                      device: str | torch.device = "cpu") -> dict:
    """Write the maps as NIfTI and overlay PNG under ``<output_dir>/region_maps/`` plus ``region_maps.json``:
    the two latent-space maps and, when ``truth_transform`` (the images' preprocessing) is given, the
    real-image group-mean baseline.

    When ``ground_truth`` names an existing file it is read with ``truth_transform`` (so that it lies on
    the maps' grid) and each map's AUC is reported; otherwise the AUCs are null and the summary says why.
    Returns the summary.
    """
    out = Path(output_dir) / "region_maps"
    maps = region_maps(generator, latents, group_quantile, ridge_alpha, device, truth_transform)
    summary = {key: maps[key] for key in ("n_young", "n_old", "young_age", "old_age")}
    summary.update(group_quantile=group_quantile, ridge_alpha=ridge_alpha, files={})
    for name in MAP_NAMES:
        if name not in maps:
            continue
        nifti = save_nifti(maps[name], latents.affine, out / f"age_map_{name}.nii.gz")
        source = "real images" if name == "real_group_means" else "decoded"
        title = f"{name.replace('_', ' ')}: {source}, age {summary['old_age']:.0f} - {summary['young_age']:.0f} y"
        png = save_figure(map_overlay_figure(maps["mean_image"], maps[name], title), out / f"age_map_{name}.png")
        summary["files"][name] = [nifti.name, png.name]
    summary.update(_scores(maps, ground_truth, truth_transform, truth_threshold, brain_threshold))
    with atomic_path(out / "region_maps.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _scores(maps: dict, ground_truth: str | None, truth_transform: Callable | None, truth_threshold: float,
            brain_threshold: float) -> dict:
    names = [name for name in MAP_NAMES if name in maps]
    scores = {"ground_truth": ground_truth, "truth_threshold": truth_threshold, "brain_threshold": brain_threshold,
              **{f"auc_{name}": None for name in names}}
    if not ground_truth or not Path(ground_truth).is_file():
        scores["note"] = f"no ground-truth map at {ground_truth!r}: maps not scored"
        return scores
    if truth_transform is None:
        raise ValueError("scoring needs truth_transform, the preprocessing that puts the ground truth on the maps' grid")
    truth = np.asarray(torch.as_tensor(truth_transform({"image": ground_truth})["image"]))[0]
    if truth.shape != maps["mean_image"].shape:
        raise ValueError(f"{ground_truth}: shape {truth.shape} after preprocessing, maps have {maps['mean_image'].shape}")
    brain = maps["mean_image"] > brain_threshold * maps["mean_image"].max()
    for name in names:
        scores[f"auc_{name}"] = map_auc(maps[name], truth, truth_threshold, brain)
    return scores
