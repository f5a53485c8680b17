"""The simulated effects: ageing, Alzheimer's disease and scanner/subject nuisance, as pure functions.

Every effect is a smooth function of age through the subject's *ageing stage*
``(age + brain_age_offset - 20) / 70`` (0 at 20, 1 at 90 for a typical subject), scaled by a subject's
own rate for that effect, so two subjects of the same age differ and no single voxel gives the age away.
Each site also has its own mix of ageing rates (``Site.effect_mix``): ageing looks somewhat different in
every cohort, as it does between real studies.

Sizes follow published adult ageing curves (typical subject, all rates 1):

- lateral and third ventricles: the volume grows exponentially, by ``VENTRICLE_LOG_GROWTH`` per year
  (about 10 ml at 20, 17 ml at 45, 29 ml at 70, 45 ml at 90, as in cross-sectional MRI studies), with
  a subject's own size at any age (log-normal, ``VENTRICLE_SIZE_LOG_SD``). The template's ventricles are
  those of a ``TEMPLATE_VENTRICLE_AGE``-year-old; the walls move in or out along the template's
  ventricle push field by the distance that gives the target volume (``VENTRICLE_VOLUME_BY_SHIFT``); AD
  adds ``AD_VENTRICLE_EXPANSION_MM * severity``.
- cortical grey matter: ``GM_LOSS * stage`` of the grey matter bordering sulcal CSF turns to CSF,
  weighted towards the frontal lobe (about 20 % of all GM by 90); AD removes
  ``AD_MTL_GM_LOSS * severity`` of the medial temporal grey matter. Every subject also has its own
  pattern of open sulci (``SULCAL_CSF``), whatever its age: real cortices are not the template's average.
- grey/white contrast: GM intensity rises by ``CONTRAST_LOSS * stage`` of the GM-WM gap, WM falls by
  ``WM_DARKENING * stage``.
- white-matter hypo-intensities: periventricular, load ``LESION_LOAD * stage**3``, patchy.

Tissue intensities (CSF, GM, WM) = 0.33, 0.73, 1 are those of the MNI152 2009 T1 template itself (a
least-squares fit of the template on its own tissue maps); sites vary them (power law, GM and CSF
shifts). Nuisance: head size (global scale), smooth random anatomical displacement, small rigid
misregistration, and per site an intensity scale, bias field strength and noise level.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from brainage_core.grid import CENTRE_MM, Grid, rotation_matrix

from .anatomy import Anatomy

AGE_REFERENCE = 20.0
AGE_SPAN = 70.0
BRAIN_AGE_OFFSET_SD = 5.0
RATE_LOG_SD = 0.2

TEMPLATE_VENTRICLE_AGE = 45.0
VENTRICLE_LOG_GROWTH = 0.022  # per year: x1.7 per 25 years
VENTRICLE_SIZE_LOG_SD = 0.25
# Ventricle volume relative to the template's against the wall shift (mm, negative = inwards), measured
# on the 2 mm grid with ``ventricle_pullback``; one table for every resolution, so a subject's geometry
# does not depend on the grid.
VENTRICLE_VOLUME_BY_SHIFT = ((-4.0, 0.452), (-3.0, 0.556), (-2.0, 0.690), (-1.0, 0.837), (0.0, 1.0),
                             (2.0, 1.438), (4.0, 1.919), (7.0, 2.751), (10.0, 3.582), (14.0, 4.634))
MIN_VENTRICLE_EXPANSION_MM = -4.0
MAX_VENTRICLE_EXPANSION_MM = 14.0
VENTRICLE_STEP_MM = 2.5
GM_LOSS = 0.5
CONTRAST_LOSS = 0.25
WM_DARKENING = 0.04
LESION_LOAD = 0.6
LESION_DEPTH = 0.4
LESION_PATCHINESS = 1.0
SULCAL_CSF = 0.35
SITE_EFFECT_LOG_SD = 0.15
# Residual bias field (log sd) and noise (sigma / WM) of bias-corrected 2 mm scans: on the ten IXI heads
# preprocessed at 2 mm, deep white matter varies by 5-8 % (sd / median) and its voxel-scale noise is
# 1.2-2 %; these ranges cover that and noisier scanners.
SITE_BIAS_RANGE = (0.02, 0.08)
SITE_NOISE_RANGE = (0.005, 0.02)
AD_SEVERITY_RANGE = (0.5, 1.0)
AD_VENTRICLE_EXPANSION_MM = 2.5
AD_MTL_GM_LOSS = 0.5

# young-adult tissue intensities (white matter = 1), fitted on the MNI152 2009 T1 template
CSF_INTENSITY, GM_INTENSITY, WM_INTENSITY = 0.33, 0.73, 1.0

HEAD_SCALE_SD = 0.03
HEAD_SCALE_SEX = 0.02  # males +2 %, females -2 % in linear size
ROTATION_SD_DEG = 1.5
TRANSLATION_SD_MM = 1.5
DISPLACEMENT_SD_MM = 2.0
DISPLACEMENT_CORRELATION_MM = 16.0
BIAS_CORRELATION_MM = 60.0
LESION_CORRELATION_MM = 6.0
SULCAL_CORRELATION_MM = 5.0
COARSE_SPACING_MM = 4.0


@dataclass(frozen=True)
class Site:
    """A simulated scanner and population: tissue intensities are raised to ``gamma`` (contrast), GM moves
    by ``gm_shift`` of the GM-WM gap and CSF by ``csf_shift``, white matter reads ``scale`` units, the log
    bias field has standard deviation ``bias`` and the Rician noise sigma is ``noise`` times the
    white-matter signal. ``effect_mix`` multiplies its subjects' ageing rates (ventricles, cortical
    atrophy, contrast loss, lesions)."""

    name: str
    gamma: float
    gm_shift: float
    scale: float
    bias: float
    noise: float
    csf_shift: float = 0.0
    effect_mix: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class SubjectParams:
    """Everything that makes one simulated subject, apart from its random smooth fields."""

    age: float
    sex: str
    ad: bool
    brain_age_offset: float = 0.0
    ventricle_rate: float = 1.0
    ventricle_size: float = 0.0
    atrophy_rate: float = 1.0
    contrast_rate: float = 1.0
    lesion_rate: float = 1.0
    ad_severity: float = 0.0
    head_scale: float = 1.0
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def stage(self) -> float:
        """Ageing stage: 0 at 20 years, 1 at 90, shifted by the subject's brain-age offset; >= 0."""
        return max((self.age + self.brain_age_offset - AGE_REFERENCE) / AGE_SPAN, 0.0)


@dataclass(frozen=True)
class Lattice:
    """A regular lattice of points in world mm (axis-aligned): ``first`` point, ``spacing``, ``shape``."""

    first: np.ndarray
    spacing: np.ndarray
    shape: tuple[int, int, int]

    def points(self) -> np.ndarray:
        """World coordinates of the lattice points, shape (3, N)."""
        axes = [f + s * np.arange(n) for f, s, n in zip(self.first, self.spacing, self.shape)]
        return np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)

    def sample(self, field: np.ndarray, world: np.ndarray) -> np.ndarray:
        """Trilinear value of ``field`` (lattice-shaped) at world points (3, N); edge values beyond."""
        index = (world - self.first[:, None]) / self.spacing[:, None]
        return ndi.map_coordinates(field, index, order=1, mode="nearest")


@dataclass(frozen=True)
class SubjectFields:
    """Unit-variance smooth random fields of one subject: a 3-component anatomical displacement and a
    log bias field on the coarse lattice (``coarse_lattice``), and the patchiness of white-matter lesions
    and the pattern of open sulci on the grid itself (both too fine for the coarse lattice)."""

    displacement: np.ndarray
    log_bias: np.ndarray
    lesion: np.ndarray
    sulci: np.ndarray


# ------------------------------------------------------------------------------------------ drawing


def draw_site(rng: np.random.Generator, name: str, effect_log_sd: float = SITE_EFFECT_LOG_SD) -> Site:
    """A scanner with random contrast, scale, bias-field strength and noise level, and a population whose
    ageing rates differ from the cohort's typical ones by log-normal factors of sd ``effect_log_sd``."""
    return Site(name=name, gamma=float(rng.uniform(0.85, 1.2)), gm_shift=float(rng.normal(0.0, 0.08)),
                scale=float(rng.uniform(300.0, 1200.0)), bias=float(rng.uniform(*SITE_BIAS_RANGE)),
                noise=float(rng.uniform(*SITE_NOISE_RANGE)), csf_shift=float(rng.normal(0.0, 0.05)),
                effect_mix=tuple(float(v) for v in np.exp(rng.normal(0.0, effect_log_sd, 4))))


def draw_subject(rng: np.random.Generator, age: float, sex: str, ad: bool) -> SubjectParams:
    """A subject's effect rates, brain-age offset, AD severity, head size and misregistration."""
    rates = np.exp(rng.normal(0.0, RATE_LOG_SD, size=4))
    sex_shift = HEAD_SCALE_SEX if sex == "M" else -HEAD_SCALE_SEX
    return SubjectParams(
        age=float(age), sex=sex, ad=bool(ad),
        brain_age_offset=float(rng.normal(0.0, BRAIN_AGE_OFFSET_SD)),
        ventricle_rate=float(rates[0]), ventricle_size=float(rng.normal(0.0, VENTRICLE_SIZE_LOG_SD)),
        atrophy_rate=float(rates[1]), contrast_rate=float(rates[2]), lesion_rate=float(rates[3]),
        ad_severity=float(rng.uniform(*AD_SEVERITY_RANGE)) if ad else 0.0,
        head_scale=float(1.0 + sex_shift + rng.normal(0.0, HEAD_SCALE_SD)),
        rotation_deg=tuple(float(v) for v in rng.normal(0.0, ROTATION_SD_DEG, 3)),
        translation_mm=tuple(float(v) for v in rng.normal(0.0, TRANSLATION_SD_MM, 3)),
    )


def draw_fields(rng: np.random.Generator, grid: Grid) -> SubjectFields:
    """The subject's smooth random fields for ``grid``."""
    coarse = coarse_lattice(grid)
    return SubjectFields(
        displacement=np.stack([smooth_random_field(rng, coarse, DISPLACEMENT_CORRELATION_MM) for _ in range(3)]),
        log_bias=smooth_random_field(rng, coarse, BIAS_CORRELATION_MM),
        lesion=smooth_random_field(rng, grid_lattice(grid), LESION_CORRELATION_MM),
        sulci=smooth_random_field(rng, grid_lattice(grid), SULCAL_CORRELATION_MM),
    )


def smooth_random_field(rng: np.random.Generator, lattice: Lattice, correlation_mm: float) -> np.ndarray:
    """A unit-variance random field on ``lattice`` with Gaussian correlation length ``correlation_mm``.

    White noise is drawn on a lattice with half the correlation length as spacing (never finer than
    ``lattice``), smoothed there, and upsampled: the cost does not grow with the correlation length.
    """
    span = lattice.spacing * (np.asarray(lattice.shape) - 1)
    spacing = np.maximum(lattice.spacing, correlation_mm / 2.0)
    shape = tuple(int(v) for v in np.minimum(np.ceil(span / spacing) + 1, lattice.shape))
    sigma = correlation_mm * (np.asarray(shape) - 1) / span
    noise = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    field = upsample(noise, lattice.shape)
    return field / field.std()


def upsample(field: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear upsampling of a lattice field (or a stack of them, first axis) whose corner points
    coincide with the corner points of ``shape``; returned as is when the shape already matches.

    Separable, one axis at a time with plain array arithmetic: several times faster than
    ``scipy.ndimage.zoom``, and unlike a matrix product it does not hand work to a BLAS thread pool,
    which stalls badly on a busy machine.
    """
    for axis, n_out in zip(range(-3, 0), shape):
        field = _upsample_axis(field, n_out, axis)
    return field


def _upsample_axis(field: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    n_in = field.shape[axis]
    if n_in == n_out:
        return field
    position = np.linspace(0.0, n_in - 1, n_out)
    lower = np.minimum(np.floor(position).astype(int), n_in - 2)
    frac = (position - lower).astype(np.float32).reshape((-1,) + (1,) * (-axis - 1))
    return np.take(field, lower, axis=axis) * (1 - frac) + np.take(field, lower + 1, axis=axis) * frac


def coarse_lattice(grid: Grid) -> Lattice:
    """A lattice spanning the grid's voxel centres with about COARSE_SPACING_MM between points (the
    grid itself when it is that coarse already): smooth geometry and bias live on it and are upsampled."""
    n = grid.shape[0]
    span = (n - 1) * grid.resolution
    m = min(n, int(np.ceil(span / COARSE_SPACING_MM)) + 1)
    return Lattice(first=grid.affine[:3, 3].copy(), spacing=np.full(3, span / (m - 1)), shape=(m, m, m))


def grid_lattice(grid: Grid) -> Lattice:
    """The grid's voxel centres as a lattice."""
    return Lattice(first=grid.affine[:3, 3].copy(), spacing=np.full(3, grid.resolution), shape=grid.shape)


# ---------------------------------------------------------------------------------- tissue and contrast


def tissue_intensities(params: SubjectParams, site: Site) -> tuple[float, float, float]:
    """(CSF, GM, WM) intensities of the subject at the site, before scale and bias."""
    gap = WM_INTENSITY - GM_INTENSITY
    wm = WM_INTENSITY * (1.0 - WM_DARKENING * params.stage)
    gm = GM_INTENSITY + gap * (CONTRAST_LOSS * params.stage * params.contrast_rate + site.gm_shift)
    csf = CSF_INTENSITY + site.csf_shift
    return tuple(float(max(v, 0.0) ** site.gamma) for v in (csf, gm, wm))


def grey_matter_loss(anatomy: Anatomy, params: SubjectParams, sulci: np.ndarray | None = None) -> np.ndarray:
    """Fraction of grey matter turned to CSF at each voxel: cortical thinning, the subject's open sulci
    (``sulci``: a unit-variance field on the grid, None for none) and AD's medial temporal atrophy
    (bounded by 1)."""
    loss = (GM_LOSS * params.stage * params.atrophy_rate) * anatomy.cortical_thinning
    if sulci is not None:
        loss = loss + SULCAL_CSF * np.clip(sulci, 0.0, None) * anatomy.cortical_thinning
    if params.ad_severity:
        loss = loss + (AD_MTL_GM_LOSS * params.ad_severity) * anatomy.medial_temporal
    return np.minimum(loss, 1.0)


def lesion_load(params: SubjectParams) -> float:
    """White-matter hypo-intensity load: grows with the cube of the ageing stage."""
    return LESION_LOAD * params.stage**3 * params.lesion_rate


def lesions(anatomy: Anatomy, params: SubjectParams, patchiness: np.ndarray) -> np.ndarray:
    """0..1 lesion fraction of each voxel's white matter; ``patchiness`` is a unit-variance field on the
    grid (zero gives the expected lesion map)."""
    return np.clip(lesion_load(params) * anatomy.periventricular * (1.0 + LESION_PATCHINESS * patchiness), 0, 1)


def tissue_image(anatomy: Anatomy, params: SubjectParams, site: Site, fields: SubjectFields) -> np.ndarray:
    """Noise-free T1 intensity of the subject's tissues in template space (partial-volume mixing)."""
    csf_i, gm_i, wm_i = tissue_intensities(params, site)
    lost = anatomy.gm * grey_matter_loss(anatomy, params, fields.sulci)
    gm = anatomy.gm - lost
    csf = anatomy.csf + lost
    wm_signal = wm_i * (1.0 - LESION_DEPTH * lesions(anatomy, params, fields.lesion))
    return (gm * gm_i + csf * csf_i + anatomy.wm * wm_signal).astype(np.float32)


# ------------------------------------------------------------------------------------------- geometry


def ventricle_volume_ratio(params: SubjectParams) -> float:
    """The subject's ventricle volume relative to the template's (before AD): exponential growth with
    the subject's effective age (age + brain-age offset) at its own rate, times its own size."""
    years = params.age + params.brain_age_offset - TEMPLATE_VENTRICLE_AGE
    return float(np.exp(params.ventricle_size + VENTRICLE_LOG_GROWTH * params.ventricle_rate * years))


def ventricle_expansion(params: SubjectParams) -> float:
    """How far (mm) the ventricle walls move outwards (negative: inwards) for the subject's volume ratio,
    plus AD's enlargement, within [MIN_VENTRICLE_EXPANSION_MM, MAX_VENTRICLE_EXPANSION_MM]."""
    shifts, ratios = np.array(VENTRICLE_VOLUME_BY_SHIFT).T
    mm = float(np.interp(np.log(ventricle_volume_ratio(params)), np.log(ratios), shifts))
    mm += AD_VENTRICLE_EXPANSION_MM * params.ad_severity
    return float(np.clip(mm, MIN_VENTRICLE_EXPANSION_MM, MAX_VENTRICLE_EXPANSION_MM))


def ventricle_pullback(anatomy: Anatomy, points: np.ndarray, expansion_mm: float) -> np.ndarray:
    """Displacement (3, N) from template points towards the ventricles that moves the ventricle walls
    out by up to ``expansion_mm``: steps of at most VENTRICLE_STEP_MM along the template's ventricle
    push field. Each step is one-to-one (it is shorter than the push field's folding limit, about 5 mm),
    so their composition is too. Only points in the push field's support box move."""
    lower, upper = (np.reshape(corner, (3, 1)) for corner in anatomy.push_support)
    near = np.all((points >= lower) & (points <= upper), axis=0)
    displacement = np.zeros_like(points)
    steps = int(np.ceil(abs(expansion_mm) / VENTRICLE_STEP_MM))
    start = moved = points[:, near]
    for _ in range(steps):
        index = world_to_voxel(anatomy.grid, moved)
        push = np.stack([ndi.map_coordinates(c, index, order=1) for c in anatomy.ventricle_push])
        moved = moved + (expansion_mm / steps) * push
    displacement[:, near] = moved - start
    return displacement


def world_to_voxel(grid: Grid, world: np.ndarray) -> np.ndarray:
    """Continuous voxel indices of world points given as (3, ...)."""
    inverse = np.linalg.inv(grid.affine)
    flat = world.reshape(3, -1)
    return (inverse[:3, :3] @ flat + inverse[:3, 3:]).reshape(world.shape)


def undo_pose(points: np.ndarray, scale: float, degrees, translation) -> np.ndarray:
    """Template points of subject points (3, N) for a pose that scales by ``scale`` about the grid
    centre, rotates by ``degrees`` about it, then translates by ``translation`` mm."""
    centre = np.reshape(CENTRE_MM, (3, 1))
    shifted = points - centre - np.reshape(translation, (3, 1))
    return centre + rotation_matrix(degrees).T @ shifted / scale


def template_points(anatomy: Anatomy, points: np.ndarray, params: SubjectParams,
                    displacement: np.ndarray | float) -> np.ndarray:
    """Where in the template each subject point (3, N) takes its tissue from: undo head size and
    misregistration, enlarge the ventricles, then add the subject's random displacement (3, N) in mm."""
    template = undo_pose(points, params.head_scale, params.rotation_deg, params.translation_mm)
    return template + ventricle_pullback(anatomy, template, ventricle_expansion(params)) + displacement


# ---------------------------------------------------------------------------------------------- signal


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of standard deviation ``sigma`` per channel."""
    real = signal + rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    imaginary = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    return np.hypot(real, imaginary)
