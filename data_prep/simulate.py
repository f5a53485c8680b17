"""A simulated brain-ageing cohort on the MNI152 2009 anatomy, with known ground truth.

``python -m data_prep simulate-cohort --n 400 --out DIR --resolution 4 --seed 0 [--ad-fraction 0.3]``

Each subject starts from the template tissue maps (``anatomy.py``), gets the ageing and AD effects and
the nuisance of ``effects.py``, and is written as it is made (memory does not grow with ``n``) as a
skull-stripped T1 on the canonical grid, the way preprocessing leaves real scans:

- ``sub-XXXX/anat/sub-XXXX_T1w.nii.gz``: float32; intensities divided by the 99th percentile inside
  the brain (``normalise_intensity``), so white matter reads about 1; zero outside the brain.
- ``participants.tsv`` (participant_id, age, sex, site, diagnosis CN/AD) and ``dataset_description.json``.
- ``datalist.json``: written by ``ingest.ingest_bids``, the path real BIDS data take (seeded splits
  stratified by age and diagnosis).
- ``derivatives/ground_truth/``: ``ageing_effect.nii.gz`` and, with AD subjects, ``ad_effect.nii.gz``
  (absolute change of the expected normalised image between the youngest and oldest age, and between AD
  and CN at the same age: where the effects act and how strongly), the region masks, and
  ``subject_parameters.tsv`` with every subject's hidden parameters.
- ``raw/`` (with ``raw_variants`` > 0): the first subjects again as a scanner would give them (sagittal
  P-S-R voxel axes, anisotropic voxels, head rotated and shifted, bias field, noise in the background,
  int16 scanner units, not in MNI space) as a small BIDS dataset, to exercise preprocessing.

Every random choice comes from ``numpy.random.default_rng([seed, stream, index])``: a subject depends on
the seed and its index only, not on ``n``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from tqdm import tqdm

from brainage_core.checks import check_output_dir
from brainage_core.grid import CENTRE_MM, DEFAULT_RESOLUTION_MM, Grid
from brainage_core.volumes import InputError, atomic_path, normalise_intensity, save_nifti

from .anatomy import Anatomy, template_anatomy
from .effects import (
    AD_SEVERITY_RANGE,
    DISPLACEMENT_SD_MM,
    SITE_EFFECT_LOG_SD,
    Lattice,
    Site,
    SubjectFields,
    SubjectParams,
    coarse_lattice,
    draw_fields,
    draw_site,
    draw_subject,
    lesion_load,
    rician,
    template_points,
    tissue_image,
    undo_pose,
    upsample,
    ventricle_expansion,
    world_to_voxel,
)
from .ingest import ingest_bids

SUBJECT_STREAM, SITE_STREAM, RAW_STREAM, PICTURE_STREAM = 0, 1, 2, 3
AGE_DISTRIBUTIONS = ("uniform", "normal")
AD_MIN_AGE = 55.0
MAX_AGE = 120.0
BRAIN_THRESHOLD = 0.5
NEUTRAL_SITE = Site(name="neutral", gamma=1.0, gm_shift=0.0, scale=1.0, bias=0.0, noise=0.0)
EFFECT_RATES = ("ventricle_rate", "atrophy_rate", "contrast_rate", "lesion_rate")
# Raw variants: voxel axes posterior, superior, right (like IXI); voxel size = resolution x these factors;
# field of view in mm along those axes; head pose spread.
RAW_VOXEL_FACTORS = (1.2, 1.0, 1.0)
RAW_FIELD_OF_VIEW_MM = (240.0, 216.0, 180.0)
RAW_ROTATION_SD_DEG = 5.0
RAW_TRANSLATION_SD_MM = 6.0
GROUND_TRUTH = Path("derivatives") / "ground_truth"
PARAMETERS_FILE = GROUND_TRUTH / "subject_parameters.tsv"


@dataclass(frozen=True)
class CohortConfig:
    """What defines a cohort; ``check`` raises InputError on values that cannot make one."""

    n: int = 400
    resolution: float = DEFAULT_RESOLUTION_MM
    seed: int = 0
    ad_fraction: float = 0.0
    age_min: float = 20.0
    age_max: float = 90.0
    age_distribution: str = "uniform"
    n_sites: int = 3
    lesions: bool = True
    site_effect_sd: float = SITE_EFFECT_LOG_SD
    ventricle_scale: float = 1.0
    atrophy_scale: float = 1.0
    contrast_scale: float = 1.0
    lesion_scale: float = 1.0

    def check(self) -> CohortConfig:
        problems = []
        if not isinstance(self.n, int) or self.n < 3:
            problems.append(f"n must be an integer >= 3 (one subject per split), got {self.n!r}")
        if not 0.0 <= self.ad_fraction <= 1.0:
            problems.append(f"ad_fraction must lie in [0, 1], got {self.ad_fraction}")
        if not 0.0 < self.age_min < self.age_max <= MAX_AGE:
            problems.append(f"need 0 < age_min < age_max <= {MAX_AGE:g}, got {self.age_min}, {self.age_max}")
        if self.ad_fraction > 0 and self.age_max <= AD_MIN_AGE:
            problems.append(f"AD subjects are {AD_MIN_AGE:g} or older; age_max {self.age_max} is too low")
        if self.age_distribution not in AGE_DISTRIBUTIONS:
            problems.append(f"age_distribution must be one of {AGE_DISTRIBUTIONS}, got {self.age_distribution!r}")
        if not isinstance(self.n_sites, int) or self.n_sites < 1:
            problems.append(f"n_sites must be an integer >= 1, got {self.n_sites!r}")
        if not 0.0 <= self.site_effect_sd <= 1.0:
            problems.append(f"site_effect_sd must lie in [0, 1], got {self.site_effect_sd}")
        for name, value in zip(EFFECT_RATES, self.effect_scales):
            if not 0.0 <= value <= 5.0:
                problems.append(f"{name.replace('_rate', '_scale')} must lie in [0, 5], got {value}")
        if problems:
            raise InputError("simulate-cohort: " + "; ".join(problems))
        return self

    @property
    def ad_age_range(self) -> tuple[float, float]:
        return max(self.age_min, AD_MIN_AGE), self.age_max

    @property
    def effect_scales(self) -> tuple[float, float, float, float]:
        """Cohort-wide multipliers of the ageing rates, in the order of EFFECT_RATES."""
        return self.ventricle_scale, self.atrophy_scale, self.contrast_scale, self.lesion_scale


@dataclass(frozen=True)
class Subject:
    """One simulated subject: identity, parameters, site, random fields and its canonical-grid image."""

    participant_id: str
    index: int
    params: SubjectParams
    site: Site
    fields: SubjectFields
    image: np.ndarray


# ---------------------------------------------------------------------------------------------- command


def simulate_cohort(n: int = 400, out: str = "runs/cohort", resolution: float = DEFAULT_RESOLUTION_MM, seed: int = 0,
                    ad_fraction: float = 0.0, age_min: float = 20.0, age_max: float = 90.0,
                    age_distribution: str = "uniform", n_sites: int = 3, lesions: bool = True,
                    site_effect_sd: float = SITE_EFFECT_LOG_SD, ventricle_scale: float = 1.0,
                    atrophy_scale: float = 1.0, contrast_scale: float = 1.0, lesion_scale: float = 1.0,
                    raw_variants: int = 0, progress: bool = True) -> Path:
    """Simulate a brain-ageing cohort with known ground truth; return the path of its datalist.

    Args:
        n: number of subjects (at least 3, one per split).
        out: folder to write (created; an earlier simulated cohort there is replaced).
        resolution: canonical grid resolution in mm (4 -> 48^3, the bundles' grid; 2 -> 96^3).
        seed: seed of every random choice (and of the datalist split).
        ad_fraction: share of subjects with Alzheimer's disease (aged AD_MIN_AGE or older).
        age_min: youngest age in years.
        age_max: oldest age in years.
        age_distribution: "uniform" over [age_min, age_max], or "normal" (centred, sd = range / 4,
            truncated to the range).
        n_sites: number of simulated sites, each with its own scanner (contrast, scale, bias, noise) and
            its own mix of ageing rates.
        lesions: simulate white-matter hypo-intensities whose load grows with age.
        site_effect_sd: spread (log sd) of each site's ageing rates about the cohort's.
        ventricle_scale, atrophy_scale, contrast_scale, lesion_scale: multiply every subject's rate of
            ventricle growth, cortical atrophy, grey/white contrast loss and lesion load (1: the
            defaults); a cohort whose ageing looks different, e.g. to test a trained model on.
        raw_variants: how many of the first subjects to write again in native scanner space under raw/.
        progress: show a progress bar.
    """
    config = CohortConfig(n=n, resolution=float(resolution), seed=seed, ad_fraction=float(ad_fraction),
                          age_min=float(age_min), age_max=float(age_max), age_distribution=age_distribution,
                          n_sites=n_sites, lesions=bool(lesions), site_effect_sd=float(site_effect_sd),
                          ventricle_scale=float(ventricle_scale), atrophy_scale=float(atrophy_scale),
                          contrast_scale=float(contrast_scale), lesion_scale=float(lesion_scale)).check()
    if not isinstance(raw_variants, int) or not 0 <= raw_variants <= n:
        raise InputError(f"simulate-cohort: raw_variants must be an integer in [0, n], got {raw_variants!r}")
    out = _prepare_output(check_output_dir(out))
    anatomy = template_anatomy(config.resolution)
    rows, raw_rows = [], []
    for subject in tqdm(simulate_subjects(config, anatomy), total=n, desc="simulate-cohort", unit="subject",
                        disable=not progress):
        save_nifti(subject.image, anatomy.grid.affine, out / _t1_path(subject.participant_id))
        rows.append(_participant_row(subject))
        if subject.index < raw_variants:
            write_raw_variant(out / "raw", subject, anatomy, config.seed)
            raw_rows.append(rows[-1])
    _write_table(out / "participants.tsv", [_public(row) for row in rows])
    _write_table(out / PARAMETERS_FILE, rows)
    if raw_rows:
        _write_table(out / "raw" / "participants.tsv", [_public(row) for row in raw_rows])
    write_ground_truth(out / GROUND_TRUTH, anatomy, config)
    _write_description(out, config)
    return ingest_bids(str(out), str(out / "datalist.json"), seed=seed)


def simulate_subjects(config: CohortConfig, anatomy: Anatomy) -> Iterator[Subject]:
    """The cohort's subjects one at a time, in index order."""
    sites = [draw_site(np.random.default_rng([config.seed, SITE_STREAM, s]), f"site{s + 1}", config.site_effect_sd)
             for s in range(config.n_sites)]
    width = max(4, len(str(config.n)))
    for index in range(config.n):
        rng = np.random.default_rng([config.seed, SUBJECT_STREAM, index])
        age, sex, ad, site = draw_demographics(rng, config)
        params = scale_rates(draw_subject(rng, age, sex, ad), config, sites[site].effect_mix)
        fields = draw_fields(rng, anatomy.grid)
        image = render_subject(anatomy, params, sites[site], fields, rng)
        yield Subject(f"sub-{index + 1:0{width}d}", index, params, sites[site], fields, image)


def scale_rates(params: SubjectParams, config: CohortConfig, mix=(1.0, 1.0, 1.0, 1.0)) -> SubjectParams:
    """The subject's ageing rates times the cohort's scales and its site's mix (no lesions when the
    cohort has none)."""
    factors = [scale * factor for scale, factor in zip(config.effect_scales, mix)]
    if not config.lesions:
        factors[-1] = 0.0
    return dataclasses.replace(params, **{name: getattr(params, name) * factor
                                          for name, factor in zip(EFFECT_RATES, factors)})


def draw_demographics(rng: np.random.Generator, config: CohortConfig) -> tuple[float, str, bool, int]:
    """(age, sex, AD?, site index) of one subject; AD subjects draw their age from the AD age range."""
    ad = bool(rng.random() < config.ad_fraction)
    low, high = config.ad_age_range if ad else (config.age_min, config.age_max)
    age = draw_age(rng, low, high, config.age_distribution)
    sex = "M" if rng.random() < 0.5 else "F"
    return age, sex, ad, int(rng.integers(config.n_sites))


def draw_age(rng: np.random.Generator, low: float, high: float, distribution: str) -> float:
    """An age in [low, high]: uniform, or normal about the middle (sd a quarter of the range) redrawn
    until it falls inside."""
    if distribution == "uniform":
        return float(rng.uniform(low, high))
    while True:
        age = rng.normal((low + high) / 2, (high - low) / 4)
        if low <= age <= high:
            return float(age)


# -------------------------------------------------------------------------------------------- rendering


def render_subject(anatomy: Anatomy, params: SubjectParams, site: Site, fields: SubjectFields,
                   rng: np.random.Generator) -> np.ndarray:
    """The subject's skull-stripped, intensity-normalised T1 on the canonical grid (float32)."""
    signal, brain = render_signal(anatomy, params, site, fields)
    return normalise_intensity(rician(signal, site.noise * site.scale, rng), brain)


def render_signal(anatomy: Anatomy, params: SubjectParams, site: Site,
                  fields: SubjectFields) -> tuple[np.ndarray, np.ndarray]:
    """The subject's noise-free signal (scanner units, with bias field) and brain mask on the grid.

    The geometry is computed on the coarse lattice, where the random displacement is known at the
    points themselves, and upsampled: every deformation is smooth on that scale.
    """
    grid = anatomy.grid
    lattice = coarse_lattice(grid)
    displacement = DISPLACEMENT_SD_MM * fields.displacement.reshape(3, -1)
    source = template_points(anatomy, lattice.points(), params, displacement)
    index = upsample(world_to_voxel(grid, source).reshape(3, *lattice.shape), grid.shape)
    bias = np.exp(site.bias * upsample(fields.log_bias, grid.shape))
    tissues = tissue_image(anatomy, params, site, fields)
    signal = ndi.map_coordinates(tissues, index, order=1) * bias * site.scale
    return signal, ndi.map_coordinates(anatomy.brain, index, order=1) > BRAIN_THRESHOLD


def expected_image(anatomy: Anatomy, params: SubjectParams) -> np.ndarray:
    """The subject without random variation or nuisance (no displacement, lesion patchiness, individual
    sulci, bias, noise or misregistration; neutral site), normalised like the simulated scans: the
    ground-truth reference."""
    params = dataclasses.replace(params, head_scale=1.0, rotation_deg=(0.0, 0.0, 0.0),
                                 translation_mm=(0.0, 0.0, 0.0))
    lattice, shape = coarse_lattice(anatomy.grid), anatomy.grid.shape
    fields = SubjectFields(displacement=np.zeros((3, *lattice.shape), np.float32),
                           log_bias=np.zeros(lattice.shape, np.float32), lesion=np.zeros(shape, np.float32),
                           sulci=np.zeros(shape, np.float32))
    return normalise_intensity(*render_signal(anatomy, params, NEUTRAL_SITE, fields))


def typical_subject(age: float, ad_severity: float = 0.0) -> SubjectParams:
    """A subject with every rate at its typical value (1), no brain-age offset and no misregistration."""
    return SubjectParams(age=age, sex="U", ad=ad_severity > 0, ad_severity=ad_severity)


def displacement_at(lattice: Lattice, fields: SubjectFields, points: np.ndarray) -> np.ndarray:
    """The subject's random anatomical displacement in mm at world points (3, N)."""
    return DISPLACEMENT_SD_MM * np.stack([lattice.sample(c, points) for c in fields.displacement])


# ------------------------------------------------------------------------------------------ raw variants


def raw_geometry(resolution: float, centre_shift_mm=(0.0, 0.0, 0.0),
                 field_of_view_mm=RAW_FIELD_OF_VIEW_MM) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of the native scanner grid: P, S, R voxel axes spanning ``field_of_view_mm`` (in
    that order), centred on the grid centre moved by ``centre_shift_mm`` (RAS)."""
    voxel = np.asarray(RAW_VOXEL_FACTORS) * resolution
    shape = tuple(int(round(f / v)) for f, v in zip(field_of_view_mm, voxel))
    axes = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]).T  # columns: P, S, R in RAS
    affine = np.eye(4)
    affine[:3, :3] = axes * voxel
    affine[:3, 3] = np.asarray(CENTRE_MM) + np.asarray(centre_shift_mm) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine, shape


@dataclass(frozen=True)
class HeadPose:
    """A head's pose in the scanner: scaled by ``scale`` and rotated by ``degrees`` (about x, y, z) about
    the grid centre, then shifted by ``shift_mm``."""

    scale: float = 1.0
    degrees: tuple[float, float, float] = (0.0, 0.0, 0.0)
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


def render_raw(anatomy: Anatomy, subject: Subject, rng: np.random.Generator, pose: HeadPose | None = None,
               centre_shift_mm=(0.0, 0.0, 0.0), field_of_view_mm=RAW_FIELD_OF_VIEW_MM,
               head: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The subject as scanned: (int16 data, affine) on the native grid (``raw_geometry``), the head at
    ``pose`` (default: a random one of RAW_ROTATION_SD_DEG and RAW_TRANSLATION_SD_MM), with bias field and
    Rician noise everywhere, in scanner units. With ``head`` the brain sits in CSF, skull, marrow and scalp,
    over a neck (``head_tissues``); without, there is nothing outside the brain."""
    affine, shape = raw_geometry(anatomy.grid.resolution, centre_shift_mm, field_of_view_mm)
    scanner = affine[:3, :3] @ np.indices(shape).reshape(3, -1) + affine[:3, 3:]
    if pose is None:
        pose = HeadPose(1.0, tuple(rng.normal(0.0, RAW_ROTATION_SD_DEG, 3)), tuple(rng.normal(0.0, RAW_TRANSLATION_SD_MM, 3)))
    head_points = undo_pose(scanner, pose.scale, pose.degrees, pose.shift_mm)
    lattice = coarse_lattice(anatomy.grid)
    source = template_points(anatomy, head_points, subject.params, displacement_at(lattice, subject.fields, head_points))
    index = world_to_voxel(anatomy.grid, source)
    site = subject.site
    tissues = tissue_image(anatomy, subject.params, site, subject.fields)
    bias = np.exp(site.bias * lattice.sample(subject.fields.log_bias, scanner))
    signal = ndi.map_coordinates(tissues, index, order=1)
    if head:
        signal = signal + head_tissues(anatomy, source) * (1.0 - ndi.map_coordinates(anatomy.brain, index, order=1))
    data = rician(signal * bias * site.scale, site.noise * site.scale, rng).reshape(shape)
    return np.round(data).astype(np.int16), affine


# Tissue outside the brain by distance (mm) from the template brain, as T1 intensity (white matter 1):
# CSF, skull's inner table, marrow, outer table, scalp fat, skin and muscle; below NECK_TOP_MM an elliptic
# neck (NECK_RADII_MM about NECK_CENTRE_MM, x and y) of muscle with a fat rim.
HEAD_LAYERS = ((3.0, 0.33), (5.0, 0.05), (8.0, 0.55), (10.0, 0.05), (15.0, 1.1), (17.0, 0.5))
NECK_TOP_MM, NECK_CENTRE_MM, NECK_RADII_MM, NECK_FAT_MM = -45.0, (0.0, -20.0), (55.0, 60.0), 6.0
HEAD_PAD_MM = 30.0


def head_tissues(anatomy: Anatomy, points: np.ndarray) -> np.ndarray:
    """T1 intensity of the head outside the brain at template points (3, N) (see HEAD_LAYERS)."""
    distance, grid = _brain_distance(anatomy.grid.resolution)
    outside = ndi.map_coordinates(distance, world_to_voxel(grid, points).reshape(3, -1), order=1, cval=1e3)
    edges = np.array([edge for edge, _ in HEAD_LAYERS])
    values = np.array([value for _, value in HEAD_LAYERS] + [0.0], dtype=np.float32)
    signal = values[np.searchsorted(edges, outside)] * (outside > 0)
    x, y, z = points.reshape(3, -1)
    radius = np.hypot((x - NECK_CENTRE_MM[0]) / NECK_RADII_MM[0], (y - NECK_CENTRE_MM[1]) / NECK_RADII_MM[1])
    neck = (z < NECK_TOP_MM) & (radius <= 1.0) & (outside > edges[-1])
    rim = radius > 1.0 - NECK_FAT_MM / min(NECK_RADII_MM)
    signal[neck] = np.where(rim[neck], 1.0, 0.45)
    return signal.astype(np.float32)


@lru_cache(maxsize=2)
def _brain_distance(resolution: float) -> tuple[np.ndarray, Grid]:
    """Distance (mm) from the template brain on the canonical grid padded by HEAD_PAD_MM on every side."""
    anatomy = template_anatomy(resolution)
    pad = int(round(HEAD_PAD_MM / resolution))
    brain = np.pad(anatomy.brain > BRAIN_THRESHOLD, pad)
    affine = anatomy.grid.affine.copy()
    affine[:3, 3] -= pad * resolution
    grid = Grid(resolution=resolution, shape=brain.shape, affine=affine)
    return ndi.distance_transform_edt(~brain, sampling=resolution).astype(np.float32), grid


def write_raw_variant(raw_root: Path, subject: Subject, anatomy: Anatomy, seed: int) -> Path:
    rng = np.random.default_rng([seed, RAW_STREAM, subject.index])
    data, affine = render_raw(anatomy, subject, rng)
    return save_nifti(data, affine, raw_root / _t1_path(subject.participant_id), dtype=np.int16)


# ------------------------------------------------------------------------------------------ ground truth


def write_ground_truth(folder: Path, anatomy: Anatomy, config: CohortConfig) -> list[Path]:
    """Cohort-level maps of where the effects act (see the module docstring) and the region masks."""
    affine = anatomy.grid.affine

    def typical(age: float, ad_severity: float = 0.0) -> SubjectParams:
        return scale_rates(typical_subject(age, ad_severity), config)

    young, old = expected_image(anatomy, typical(config.age_min)), expected_image(anatomy, typical(config.age_max))
    paths = [save_nifti(np.abs(old - young), affine, folder / "ageing_effect.nii.gz"),
             save_nifti(anatomy.ventricle_region, affine, folder / "ventricle_region.nii.gz", dtype=np.uint8),
             save_nifti(anatomy.medial_temporal, affine, folder / "medial_temporal_region.nii.gz")]
    if config.ad_fraction > 0:
        age = float(np.mean(config.ad_age_range))
        cn = expected_image(anatomy, typical(age))
        ad = expected_image(anatomy, typical(age, ad_severity=float(np.mean(AD_SEVERITY_RANGE))))
        paths.append(save_nifti(np.abs(ad - cn), affine, folder / "ad_effect.nii.gz"))
    return paths


# --------------------------------------------------------------------------------------------- writing


def _prepare_output(out: Path) -> Path:
    """Create ``out``; an earlier simulated cohort there is removed, any other non-empty folder refused."""
    if out.is_dir() and any(out.iterdir()):
        if not (out / PARAMETERS_FILE).is_file():
            raise InputError(f"{out}: folder is not empty and holds no simulated cohort; choose another --out")
        for old in [*out.glob("sub-*"), out / "raw", out / GROUND_TRUTH]:
            if old.is_dir():
                shutil.rmtree(old)
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def _t1_path(participant_id: str) -> Path:
    return Path(participant_id) / "anat" / f"{participant_id}_T1w.nii.gz"


def _participant_row(subject: Subject) -> dict:
    """participants.tsv columns first, then the hidden parameters of the ground-truth table."""
    params = subject.params
    row = {"participant_id": subject.participant_id, "age": round(params.age, 2), "sex": params.sex,
           "site": subject.site.name, "diagnosis": "AD" if params.ad else "CN"}
    hidden = {k: v for k, v in dataclasses.asdict(params).items() if k not in ("age", "sex", "ad")}
    for key, value in hidden.items():
        if isinstance(value, tuple):
            row.update({f"{key}_{axis}": round(v, 4) for axis, v in zip("xyz", value)})
        else:
            row[key] = round(value, 4)
    row.update(ageing_stage=round(params.stage, 4), ventricle_expansion=round(ventricle_expansion(params), 4),
               lesion_load=round(lesion_load(params), 4))
    return row


def _public(row: dict) -> dict:
    return {key: row[key] for key in ("participant_id", "age", "sex", "site", "diagnosis")}


def _write_table(path: Path, rows: list[dict]) -> Path:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False)
    return path


def _write_description(out: Path, config: CohortConfig) -> Path:
    description = {"Name": "Simulated brain-ageing cohort (MNI152 2009 anatomy)", "BIDSVersion": "1.9.0",
                   "DatasetType": "raw", "GeneratedBy": [{"Name": "data_prep.simulate"}],
                   "SimulationConfig": dataclasses.asdict(config)}
    path = out / "dataset_description.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(description, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- picture


def plot_age_grid(out_png: str = "docs/figures/cohort_ages.png", resolution: float = 2.0, seed: int = 0,
                  ages=(20, 30, 40, 50, 60, 70, 80, 90)) -> Path:
    """A PNG grid of one typical simulated subject at each of ``ages``: the same axial slice through the
    ventricles and coronal slice through the hippocampi, with the same nuisance at every age."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    anatomy = template_anatomy(resolution)
    grid = anatomy.grid
    site = draw_site(np.random.default_rng([seed, PICTURE_STREAM]), "picture")
    fields = draw_fields(np.random.default_rng([seed, PICTURE_STREAM]), grid)
    k_axial = int(round(grid.voxel_of([0.0, 0.0, 16.0])[2]))
    j_coronal = int(round(grid.voxel_of([0.0, -20.0, 0.0])[1]))
    box = _brain_box(anatomy)
    fig, axes = plt.subplots(2, len(ages), figsize=(1.9 * len(ages), 4.6), facecolor="black")
    for column, age in enumerate(ages):
        image = render_subject(anatomy, typical_subject(float(age)), site, fields,
                               np.random.default_rng([seed, PICTURE_STREAM, column]))[box]
        sections = (image[:, :, k_axial - box[2].start], image[:, j_coronal - box[1].start, :])
        for row, section in enumerate(sections):
            axes[row, column].imshow(section.T, origin="lower", cmap="gray", vmin=0.0, vmax=1.1)
            axes[row, column].set_axis_off()
        axes[0, column].set_title(f"{age} y", color="white", fontsize=11)
    fig.suptitle("Simulated ageing: axial z = 16 mm (top), coronal y = -20 mm (bottom); right = R",
                 color="white", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, facecolor="black")
    plt.close(fig)
    return out_png


def _brain_box(anatomy: Anatomy, margin: int = 2) -> tuple[slice, slice, slice]:
    """Index box around the template brain, ``margin`` voxels wider on each side."""
    index = np.argwhere(anatomy.brain > BRAIN_THRESHOLD)
    lower = np.maximum(index.min(axis=0) - margin, 0)
    upper = np.minimum(index.max(axis=0) + margin + 1, anatomy.grid.shape)
    return tuple(slice(int(lo), int(hi)) for lo, hi in zip(lower, upper))
