"""The anatomy simulated subjects start from: MNI152 2009 tissue maps and regions on the canonical grid.

Tissue maps come from the templates nilearn ships (no download): grey matter, white matter and the
brain mask; CSF is the rest of the brain mask. They are resampled to the canonical grid once per
resolution and cached for the process.

Regions are defined in MNI coordinates (mm): the lateral ventricles (CSF connected inside a box around
them) and the medial temporal lobe (ellipsoids over hippocampus and entorhinal cortex, both hemispheres).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from brainage_core.grid import Grid, canonical_grid, resample_to_grid


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid in MNI mm."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]

    def normalised_radius(self, world: np.ndarray) -> np.ndarray:
        """|q| with q = (x - centre) / radii for world points of shape (3, ...); 1 on the surface."""
        shape = (3,) + (1,) * (world.ndim - 1)
        q = (world - np.reshape(self.centre, shape)) / np.reshape(self.radii, shape)
        return np.sqrt((q * q).sum(axis=0))

    def mirrored(self) -> Ellipsoid:
        """The same ellipsoid in the other hemisphere (x -> -x)."""
        x, y, z = self.centre
        return Ellipsoid((-x, y, z), self.radii)


# Hippocampus (head/body and body/tail) and entorhinal cortex, right hemisphere; mirrored for the left.
MEDIAL_TEMPORAL_RIGHT = (
    Ellipsoid((26.0, -16.0, -17.0), (7.0, 10.0, 7.0)),
    Ellipsoid((29.0, -31.0, -7.0), (6.0, 9.0, 7.0)),
    Ellipsoid((24.0, -6.0, -30.0), (7.0, 9.0, 6.0)),
)
MEDIAL_TEMPORAL = MEDIAL_TEMPORAL_RIGHT + tuple(e.mirrored() for e in MEDIAL_TEMPORAL_RIGHT)
# Box holding both lateral ventricles and the third ventricle in the template (MNI mm, lower, upper).
VENTRICLE_BOX = ((-36.0, -52.0, -6.0), (36.0, 34.0, 32.0))
# Smoothing (Gaussian sigma, mm) of the ventricle map whose gradient pushes the ventricle walls outwards.
VENTRICLE_PUSH_SIGMA_MM = 6.0
PUSH_NEGLIGIBLE = 1e-3
# How far (mm) beyond the template ventricles the ventricle region reaches, to hold enlarged ventricles.
VENTRICLE_MARGIN_MM = 8.0
CSF_THRESHOLD = 0.5
SULCAL_CSF_SIGMA_MM = 3.0
PERIVENTRICULAR_SIGMA_MM = 8.0
# Cortical thinning weight: OCCIPITAL_THINNING at the back of the brain rising to 1 at the front,
# centred on y = ANTERIOR_GRADIENT_MM[0] with a logistic width of ANTERIOR_GRADIENT_MM[1].
OCCIPITAL_THINNING = 0.5
ANTERIOR_GRADIENT_MM = (-20.0, 15.0)


@dataclass(frozen=True)
class Anatomy:
    """Template tissue maps and region weights on ``grid``, all float32 arrays of ``grid.shape``.

    ``gm``, ``wm``, ``csf``: tissue probabilities summing to ``brain`` (the soft brain mask).
    ``ventricles``: CSF probability of the lateral and third ventricles in the template.
    ``ventricle_region``: 0/1 region that holds the ventricles also when enlarged (for measuring them).
    ``medial_temporal``: soft 0..1 weight of the medial temporal lobe ellipsoids.
    ``cortical_thinning``: 0..1 weight of where cortical thinning acts: grey matter bordering sulcal CSF,
    frontal cortex more than occipital.
    ``periventricular``: 0..1 weight of white matter near the ventricles, where hypo-intensities gather.
    ``ventricle_push``: (3, *shape) direction field towards the ventricles (the gradient of the smoothed
    ventricle map, largest length 1): a subject point displaced along it by D mm takes its tissue from
    nearer the ventricles, so the ventricle walls move out by up to D mm.
    ``push_support``: (lower, upper) world corners (mm) of the box outside which the push is negligible.
    """

    grid: Grid
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    ventricles: np.ndarray
    ventricle_region: np.ndarray
    medial_temporal: np.ndarray
    cortical_thinning: np.ndarray
    periventricular: np.ndarray
    ventricle_push: np.ndarray
    push_support: tuple[np.ndarray, np.ndarray]


@lru_cache(maxsize=4)
def template_anatomy(resolution: float = 2.0) -> Anatomy:
    """The template anatomy on the canonical grid at ``resolution`` mm (cached per resolution)."""
    grid = canonical_grid(resolution)
    maps = {name: resample_to_grid(data, affine, grid) for name, (data, affine) in _template_maps().items()}
    brain = np.clip(maps["brain"], 0.0, 1.0)
    gm = np.minimum(maps["gm"], brain)
    wm = np.minimum(maps["wm"], brain - gm)
    csf = brain - gm - wm
    world = grid.world_coordinates()
    ventricles = _ventricular_csf(csf, world)
    sulcal_csf = ndi.gaussian_filter(csf - ventricles, SULCAL_CSF_SIGMA_MM / grid.resolution)
    periventricular = ndi.gaussian_filter(ventricles, PERIVENTRICULAR_SIGMA_MM / grid.resolution)
    push = _push_field(ventricles, VENTRICLE_PUSH_SIGMA_MM / grid.resolution, grid.resolution)
    return Anatomy(
        grid=grid, gm=gm, wm=wm, csf=csf, brain=brain, ventricles=ventricles,
        ventricle_region=_dilate_mm(ventricles > CSF_THRESHOLD, VENTRICLE_MARGIN_MM, grid.resolution),
        medial_temporal=region_weight(MEDIAL_TEMPORAL, world),
        cortical_thinning=_unit_scaled(sulcal_csf, gm > 0.5, 75) * (gm > 0.05) * _anterior_gradient(world),
        periventricular=_unit_scaled(periventricular, periventricular > 0, 99) * wm,
        ventricle_push=push,
        push_support=_support_box(np.sqrt((push**2).sum(axis=0)) > PUSH_NEGLIGIBLE, grid),
    )


def region_weight(ellipsoids, world: np.ndarray, edge: float = 0.15) -> np.ndarray:
    """Soft union of ellipsoids: ~1 inside, 0.5 on the surface, ~0 beyond; ``edge`` is the logistic
    width in units of the normalised radius."""
    radius = np.min([e.normalised_radius(world) for e in ellipsoids], axis=0)
    return (1.0 / (1.0 + np.exp((radius - 1.0) / edge))).astype(np.float32)


def _template_maps() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 1 mm nilearn MNI152 2009 maps as (data, affine): grey matter, white matter, brain mask."""
    from nilearn import datasets

    loaders = {"gm": datasets.load_mni152_gm_template, "wm": datasets.load_mni152_wm_template,
               "brain": datasets.load_mni152_brain_mask}
    maps = {}
    for name, load in loaders.items():
        img = load(resolution=1)
        maps[name] = (np.asarray(img.dataobj, dtype=np.float32), img.affine)
    return maps


def _ventricular_csf(csf: np.ndarray, world: np.ndarray) -> np.ndarray:
    """CSF probability of the largest connected CSF structure inside VENTRICLE_BOX (the ventricles)."""
    lower, upper = (np.reshape(b, (3, 1, 1, 1)) for b in VENTRICLE_BOX)
    in_box = np.all((world >= lower) & (world <= upper), axis=0)
    labels, n = ndi.label((csf > CSF_THRESHOLD) & in_box)
    if n == 0:
        raise RuntimeError("no ventricular CSF found in the template; VENTRICLE_BOX does not match it")
    sizes = np.bincount(labels.ravel())[1:]
    core = labels == 1 + int(np.argmax(sizes))
    # keep the partial-volume rim around the thresholded core
    return (csf * ndi.binary_dilation(core)).astype(np.float32)


def _push_field(region: np.ndarray, sigma_voxels: float, resolution: float) -> np.ndarray:
    """Gradient (per mm) of the Gaussian-smoothed ``region``, scaled so its longest vector has length 1."""
    smooth = ndi.gaussian_filter(region.astype(np.float32), sigma_voxels)
    gradient = np.stack(np.gradient(smooth)) / resolution
    return (gradient / np.sqrt((gradient**2).sum(axis=0)).max()).astype(np.float32)


def _support_box(mask: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """World corners (lower, upper) of the voxels of ``mask``, widened by one voxel."""
    index = np.argwhere(mask)
    corners = np.stack([index.min(axis=0) - 1, index.max(axis=0) + 1]).astype(float)
    world = corners @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def _dilate_mm(mask: np.ndarray, margin_mm: float, resolution: float) -> np.ndarray:
    """Dilate a boolean mask by a ball of ``margin_mm``; returns float32 0/1."""
    radius = max(1, int(round(margin_mm / resolution)))
    r = np.arange(-radius, radius + 1)
    ball = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2
    return ndi.binary_dilation(mask, structure=ball).astype(np.float32)


def _anterior_gradient(world: np.ndarray) -> np.ndarray:
    centre, width = ANTERIOR_GRADIENT_MM
    rise = 1.0 / (1.0 + np.exp(-(world[1] - centre) / width))
    return (OCCIPITAL_THINNING + (1.0 - OCCIPITAL_THINNING) * rise).astype(np.float32)


def _unit_scaled(field: np.ndarray, where: np.ndarray, percentile: float) -> np.ndarray:
    """``field`` clipped at 0, divided by its ``percentile``-th percentile over ``where``, capped at 1."""
    field = np.clip(field, 0.0, None)
    return np.minimum(field / np.percentile(field[where], percentile), 1.0).astype(np.float32)
