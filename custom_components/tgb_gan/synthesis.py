"""TGB-GAN synthesis: new training volumes with known ages, made in the trained generator's latent space.

Two modes, both drawing every random choice from ``numpy.random.default_rng(seed)``:

- ``bin_top_up`` (the paper's): codes are grouped by age rounded half up to an integer. Every bin holding
  ``n`` codes with ``2 <= n < target_per_bin`` gets ``target_per_bin - n`` new codes ``w z_a + (1 - w) z_b``
  from two distinct codes of the bin, ``w ~ U(0, 1)``, aged ``w age_a + (1 - w) age_b``. Bins with fewer
  than two codes get none.
- ``traversal`` (beyond the paper): a ridge regression of age on the flattened codes gives the latent
  direction that predicts age; a subject's code moved along it by ``target - age`` years (as the linear
  predictor reads them) is decoded as the same brain at the target age.

``synthesise`` decodes the new codes, writes ``<output_dir>/synthetic/images/syn_XXXX.nii.gz`` with the
affine of the real volumes, and ``<output_dir>/synthetic/datalist.json`` whose ``training`` split holds the
real and the synthetic records (``{"image", "age", "subject", "synthetic"}``: one schema for both, so that
they collate in one batch) and whose other splits are the input datalist's, unchanged.

Synthesis resumes: every file is written atomically, and a re-run of the same plan (same codes and
settings, recognised by a fingerprint in ``images/plan.json``) decodes only the volumes not yet written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from torch import nn
from tqdm import tqdm

from brainage_core.checks import remove_partial_writes
from brainage_core.datalist import read_datalist, write_datalist
from brainage_core.volumes import atomic_path, save_nifti

MODES = ("bin_top_up", "traversal")
SYNTHETIC_PREFIX = "syn_"
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class LatentSet:
    """Latent codes of a dataset: ``codes`` (N, C, d, h, w) on the CPU, ``ages`` (N,) with NaN where
    unknown, the datalist ``records`` in the same order, and the voxel-to-world ``affine`` the images share."""

    codes: torch.Tensor
    ages: np.ndarray
    records: list[dict]
    affine: np.ndarray

    def flat(self) -> np.ndarray:
        """Codes as an (N, features) float64 array, for linear models."""
        return self.codes.flatten(1).double().numpy()


def encode_dataset(generator: nn.Module, records: Sequence[dict], transform: Callable, batch_size: int = 4,
                   device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = True) -> LatentSet:
    """Encode every record's ``image`` with ``generator.encode`` in batches, without gradients.

    ``transform`` must keep the image metadata (a MetaTensor): the affine of the preprocessed volumes is
    what synthetic volumes are written with, and all volumes must share it.
    """
    records = list(records)
    if not records:
        raise ValueError("encode_dataset: no records to encode")
    loader = DataLoader(Dataset(records, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    generator.eval()
    codes, reference = [], None
    with torch.no_grad():
        for start, batch in zip(range(0, len(records), batch_size),
                                tqdm(loader, desc="encode", unit="batch", disable=not progress)):
            image = batch["image"]
            affines = _batch_affines(image, records[start]["image"])
            if reference is None:
                reference = affines[0]
            for offset, affine in enumerate(affines):
                if not torch.allclose(affine, reference, atol=1e-4):
                    raise ValueError(
                        f"{records[start + offset]['image']} lies on another voxel grid than {records[0]['image']} "
                        "after preprocessing; synthesis needs all volumes on one grid"
                    )
            codes.append(generator.encode(image.as_tensor().to(device)).float().cpu())
    ages = np.array([float(rec.get("age", math.nan)) for rec in records])
    return LatentSet(torch.cat(codes), ages, records, reference.numpy())


def _batch_affines(image, first_path: str) -> torch.Tensor:
    if not isinstance(image, MetaTensor) or "affine" not in image.meta:
        raise TypeError(
            f"preprocessing returned {type(image).__name__} without an affine (batch from {first_path}); "
            "keep the image metadata (EnsureTyped with track_meta=true)"
        )
    return torch.as_tensor(image.meta["affine"], dtype=torch.float64).reshape(-1, 4, 4)


# ------------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class InterpolationPlan:
    """New codes ``weight * z[first] + (1 - weight) * z[second]`` aged ``age`` (arrays of one length)."""

    first: np.ndarray
    second: np.ndarray
    weight: np.ndarray
    age: np.ndarray

    def codes(self, latents: LatentSet, index: slice | np.ndarray) -> torch.Tensor:
        w = torch.as_tensor(self.weight[index], dtype=torch.float32).reshape(-1, 1, 1, 1, 1)
        return w * latents.codes[self.first[index]] + (1 - w) * latents.codes[self.second[index]]

    def provenance(self, i: int, latents: LatentSet) -> dict:
        return {"sources": [_subject(latents.records[self.first[i]]), _subject(latents.records[self.second[i]])],
                "weight": float(self.weight[i])}


@dataclass(frozen=True)
class TraversalPlan:
    """New codes ``z[source] + shift * step``: ``step`` moves the linear age prediction by one year."""

    source: np.ndarray
    shift: np.ndarray
    age: np.ndarray
    step: torch.Tensor

    def codes(self, latents: LatentSet, index: slice | np.ndarray) -> torch.Tensor:
        shift = torch.as_tensor(self.shift[index], dtype=torch.float32).reshape(-1, 1, 1, 1, 1)
        return latents.codes[self.source[index]] + shift * self.step

    def provenance(self, i: int, latents: LatentSet) -> dict:
        return {"sources": [_subject(latents.records[self.source[i]])], "shift_years": float(self.shift[i])}


def _take(plan, index: np.ndarray):
    """The plan restricted to the samples ``index`` (every per-sample array indexed alike)."""
    return dataclasses.replace(plan, **{f.name: getattr(plan, f.name)[index] for f in dataclasses.fields(plan)
                                        if isinstance(getattr(plan, f.name), np.ndarray)})


def _capped(plan, max_synthetic: int | None, rng: np.random.Generator):
    """At most ``max_synthetic`` samples, a seeded random subset (in plan order) so the mix of ages is kept."""
    n = len(plan.age)
    if max_synthetic is None or n <= max_synthetic:
        return plan
    if max_synthetic < 0:
        raise ValueError(f"max_synthetic must be >= 0 or None, got {max_synthetic}")
    return _take(plan, np.sort(rng.choice(n, size=int(max_synthetic), replace=False)))


def age_bins(ages) -> np.ndarray:
    """Integer age bins: ages rounded half up (20.5 -> 21)."""
    return np.floor(np.asarray(ages, dtype=np.float64) + 0.5).astype(np.int64)


def _in_range(values, age_range: Sequence[float] | None) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if age_range is None:
        return np.ones(values.shape, dtype=bool)
    low, high = (float(v) for v in age_range)
    if low > high:
        raise ValueError(f"age_range must be [low, high] with low <= high, got {list(age_range)}")
    return (values >= low) & (values <= high)


def _known_ages(ages) -> np.ndarray:
    ages = np.asarray(ages, dtype=np.float64)
    if not np.isfinite(ages).all():
        raise ValueError(f"{int((~np.isfinite(ages)).sum())} records have no finite 'age'; synthesis needs all ages")
    return ages


def bin_top_up_plan(ages, target_per_bin: int, rng: np.random.Generator, age_range: Sequence[float] | None = None,
                    max_synthetic: int | None = None) -> InterpolationPlan:
    """The paper's synthesis plan (see the module docstring).

    ``age_range`` ([low, high], inclusive) limits the integer bins that are topped up; ``max_synthetic``
    caps the total by a seeded random subset.
    """
    if target_per_bin < 0:
        raise ValueError(f"target_per_bin must be >= 0, got {target_per_bin}")
    ages = _known_ages(ages)
    bins = age_bins(ages)
    first, second, weight = [], [], []
    for value in np.unique(bins[_in_range(bins, age_range)]):
        members = np.flatnonzero(bins == value)
        n_new = int(target_per_bin) - members.size
        if members.size < 2 or n_new <= 0:
            continue
        pairs = np.stack([rng.choice(members, size=2, replace=False) for _ in range(n_new)])
        first.append(pairs[:, 0])
        second.append(pairs[:, 1])
        weight.append(rng.random(n_new))
    if not first:
        empty = np.zeros(0, dtype=np.int64)
        return InterpolationPlan(empty, empty, np.zeros(0), np.zeros(0))
    first, second, weight = np.concatenate(first), np.concatenate(second), np.concatenate(weight)
    plan = InterpolationPlan(first, second, weight, weight * ages[first] + (1 - weight) * ages[second])
    return _capped(plan, max_synthetic, rng)


@dataclass(frozen=True)
class AgeDirection:
    """Linear age model on flattened codes: ``age ~ codes @ weights + intercept`` (ridge regression)."""

    weights: np.ndarray
    intercept: float

    def predict(self, flat_codes: np.ndarray) -> np.ndarray:
        return np.asarray(flat_codes, dtype=np.float64) @ self.weights + self.intercept

    def year_step(self) -> np.ndarray:
        """The shortest code displacement that raises the predicted age by one year."""
        return self.weights / float(self.weights @ self.weights)


def fit_age_direction(flat_codes: np.ndarray, ages, ridge_alpha: float = 1.0) -> AgeDirection:
    """Ridge regression of age on codes, solved in its N x N dual form (codes have many more features).

    The penalty is ``ridge_alpha`` times the mean squared norm of the centred codes, so the same alpha
    means the same amount of shrinkage whatever the scale of the codes.
    """
    x = np.asarray(flat_codes, dtype=np.float64)
    y = _known_ages(ages)
    if x.ndim != 2 or x.shape[0] != y.size or y.size < 2:
        raise ValueError(f"need >= 2 codes with one age each, got codes {x.shape} and {y.size} ages")
    if ridge_alpha <= 0:
        raise ValueError(f"ridge_alpha must be > 0, got {ridge_alpha}")
    x_mean, y_mean = x.mean(0), y.mean()
    xc = x - x_mean
    gram = xc @ xc.T
    scale = np.trace(gram) / y.size
    if scale == 0 or np.ptp(y) == 0:
        raise ValueError("the codes (or the ages) are all equal: no direction predicts age")
    dual = np.linalg.solve(gram + ridge_alpha * scale * np.eye(y.size), y - y_mean)
    weights = xc.T @ dual
    return AgeDirection(weights, float(y_mean - x_mean @ weights))


def traversal_plan(latents: LatentSet, target_ages: Sequence[float], rng: np.random.Generator,
                   n_subjects: int | None = None, ridge_alpha: float = 1.0,
                   age_range: Sequence[float] | None = None, max_synthetic: int | None = None) -> TraversalPlan:
    """Every chosen subject (all, or ``n_subjects`` drawn at random) at every target age within ``age_range``."""
    ages = _known_ages(latents.ages)
    targets = np.asarray([float(t) for t in target_ages], dtype=np.float64)
    targets = targets[_in_range(targets, age_range)]
    direction = fit_age_direction(latents.flat(), ages, ridge_alpha)
    step = torch.as_tensor(direction.year_step(), dtype=torch.float32).reshape(latents.codes.shape[1:])
    n = ages.size
    subjects = np.arange(n) if n_subjects is None or n_subjects >= n else np.sort(
        rng.choice(n, size=int(n_subjects), replace=False))
    source = np.repeat(subjects, targets.size)
    age = np.tile(targets, subjects.size)
    plan = TraversalPlan(source, age - ages[source], age, step)
    return _capped(plan, max_synthetic, rng)


# ------------------------------------------------------------------------------------------------ writing


def _subject(record: dict) -> str:
    return str(record.get("subject") or Path(record["image"]).name.split(".nii")[0])


def real_training_record(record: dict) -> dict:
    return {"image": str(record["image"]), "age": float(record["age"]), "subject": _subject(record), "synthetic": False}


def decode_plan(generator: nn.Module, plan, latents: LatentSet, image_dir: Path, batch_size: int = 4,
                device: str | torch.device = "cpu", progress: bool = True) -> tuple[list[dict], dict]:
    """Decode the plan in batches and write one NIfTI per sample; return the records and their provenance.

    Resumable: volumes of this plan already in ``image_dir`` (same ``plan_fingerprint`` in its plan.json)
    are kept and not decoded again. Volumes of another plan and temporary files of a killed write are
    removed first, so the folder matches the datalist.
    """
    image_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_writes(image_dir)
    n = len(plan.age)
    names = [f"{SYNTHETIC_PREFIX}{i:04d}" for i in range(n)]
    manifest, fingerprint = image_dir / PLAN_FILE, plan_fingerprint(plan, latents)
    same_plan = manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint
    keep = set(names) if same_plan else set()
    for stale in image_dir.glob(f"{SYNTHETIC_PREFIX}*.nii.gz"):
        if stale.name.split(".nii")[0] not in keep:
            stale.unlink()
    if not same_plan:
        with atomic_path(manifest) as tmp:
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "n": n}) + "\n")
    todo = np.array([i for i, name in enumerate(names) if not (image_dir / f"{name}.nii.gz").is_file()], dtype=np.int64)
    generator.eval()
    with torch.no_grad():
        for start in tqdm(range(0, todo.size, batch_size), desc="decode", unit="batch", disable=not progress):
            index = todo[start:start + batch_size]
            volumes = generator.decode(plan.codes(latents, index).to(device)).float().cpu().numpy()
            for i, volume in zip(index, volumes):
                save_nifti(volume[0], latents.affine, image_dir / f"{names[i]}.nii.gz")
    records = [{"image": str(image_dir / f"{name}.nii.gz"), "age": float(plan.age[i]), "subject": name,
                "synthetic": True} for i, name in enumerate(names)]
    return records, {name: plan.provenance(i, latents) for i, name in enumerate(names)}


def plan_fingerprint(plan, latents: LatentSet) -> str:
    """SHA-256 of the plan's samples and of the latent codes and affine they are decoded from."""
    digest = hashlib.sha256(type(plan).__name__.encode())
    for value in [*(getattr(plan, f.name) for f in dataclasses.fields(plan)), latents.codes, latents.affine]:
        array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        digest.update(str((array.dtype, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def synthesise(generator: nn.Module, latents: LatentSet, datalist_file: str, output_dir: str,
               mode: str = "bin_top_up", seed: int = 0, target_per_bin: int = 50,
               age_range: Sequence[float] | None = None, max_synthetic: int | None = None,
               traversal_ages: Sequence[float] = (30.0, 50.0, 70.0), traversal_subjects: int | None = None,
               ridge_alpha: float = 1.0, batch_size: int = 4, device: str | torch.device = "cpu",
               progress: bool = True) -> Path:
    """Plan, decode and write the synthetic volumes and the merged datalist; return the datalist's path.

    ``latents`` are the codes of ``datalist_file``'s training split; its other splits are copied unchanged.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rng = np.random.default_rng(seed)
    if mode == "bin_top_up":
        plan = bin_top_up_plan(latents.ages, target_per_bin, rng, age_range, max_synthetic)
    else:
        plan = traversal_plan(latents, traversal_ages, rng, traversal_subjects, ridge_alpha, age_range,
                              max_synthetic)
    out = Path(output_dir) / "synthetic"
    synthetic, provenance = decode_plan(generator, plan, latents, out / "images", batch_size, device, progress)
    real = [real_training_record(rec) for rec in latents.records]
    splits = {name: records for name, records in read_datalist(datalist_file).items() if name != "training"}
    settings = {"mode": mode, "seed": seed, "age_range": None if age_range is None else list(age_range),
                "max_synthetic": max_synthetic}
    settings.update({"target_per_bin": target_per_bin} if mode == "bin_top_up" else
                    {"traversal_ages": [float(t) for t in traversal_ages], "traversal_subjects": traversal_subjects,
                     "ridge_alpha": ridge_alpha})
    return write_datalist(out / "datalist.json", {"training": real + synthetic, **splits},
                          source_datalist=str(Path(datalist_file).resolve()), n_real=len(real),
                          n_synthetic=len(synthetic), synthesis=settings, provenance=provenance)
