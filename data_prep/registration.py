"""The ITK part of preprocessing: N4 bias-field correction and affine registration to MNI152 2009.

World coordinates are RAS mm throughout, as nibabel gives them. ITK images are built from the RAS
affine directly (ITK reads the numbers as its own physical space); both the template and the subject
go through the same conversion, so the transform elastix finds is a RAS-to-RAS transform.

Why the steps are the way they are (measured on the two raw IXI heads of the shared sample):

* Bias correction comes first and matters: without it, Mattes mutual information between the raw
  3T head and the template found a wrong optimum on both heads.
* The fixed image is the skull-stripped nilearn template; its dilated brain mask restricts the metric
  to the brain and the dark ring around it, so skull, neck and face in the subject do not pull.
* Initialisation by centre of gravity fails on heads with a neck in the field of view (the centre sits
  far below the brain). Instead the top of the head is aligned with the template brain's top plus a
  scalp margin, and left-right / front-back with the centroid of the cranial slab below it. The height
  of the brain under the top of the head varies with brain size more than one run can recover, so
  registration starts from three heights and keeps the best metric (good fits scored about -0.26 on
  the IXI heads, failed ones about -0.10).
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import itk
import numpy as np
from scipy import ndimage as ndi

from brainage_core.grid import rotation_matrix
from brainage_core.volumes import InputError

# Threads per process. Parallelism comes from worker processes instead: on the shared 2-core test machine
# a registration that takes 5 s on one thread took over 4 minutes on two (thread synchronisation in every
# optimiser iteration stalls when the cores are busy); N4 was not measurably faster on two.
ITK_THREADS = 1
N4_SHRINK_MM = 6.0
N4_ITERATIONS = (50, 40, 30)
FIXED_MASK_MARGIN_MM = 6.0
# Distance (mm) from the top of the template brain to the top of the scalp in an adult head.
SCALP_MARGIN_MM = 12.0
# Vertical offsets (mm) added to that initial alignment, one registration each: a brain smaller than
# the template sits lower under the top of the head; the capture range of one run is about +-10 mm.
START_OFFSETS_MM = (0.0, -10.0, -20.0)
# Head turns (degrees about x, y, z) tried when the registration from the upright starts fails QC: a head
# tilted by 20-30 degrees can lead every upright start to a shrunken fit (benchmarks/registration_robustness.py).
RETRY_TURNS_DEG = ((20.0, 0.0, 0.0), (-20.0, 0.0, 0.0), (0.0, 20.0, 0.0), (0.0, -20.0, 0.0), (0.0, 0.0, 20.0),
                   (0.0, 0.0, -20.0))
# Cranial slab used for the left-right / front-back initialisation: this far below the top of the head.
SLAB_MM = (20.0, 100.0)
ELASTIX_SETTINGS = {
    "Transform": "AffineTransform",
    "Metric": "AdvancedMattesMutualInformation",
    "NumberOfResolutions": "4",
    "MaximumNumberOfIterations": "150",
    "NumberOfSpatialSamples": "2000",
    "AutomaticTransformInitialization": "false",
    "RandomSeed": "20240601",
    "WriteResultImage": "false",
}

# The QC re-registration (``rigid_misalignment_mm``): rigid, normalised correlation (the output and the
# template share a grid and a contrast), from the identity, on the coarse QC grid.
RIGID_CHECK_SETTINGS = {
    "Metric": "AdvancedNormalizedCorrelation",
    "NumberOfResolutions": "2",
    "MaximumNumberOfIterations": "200",
    "NumberOfSpatialSamples": "3000",
    "AutomaticTransformInitialization": "false",
    "RandomSeed": "20240601",
    "WriteResultImage": "false",
}


class RegistrationError(InputError):
    """The scan could not be aligned with the template."""


@dataclass(frozen=True)
class RegistrationTemplate:
    """The fixed image of the registration: nilearn's 2 mm MNI152 2009 brain and where it lies."""

    image: np.ndarray
    affine: np.ndarray
    mask: np.ndarray  # brain mask dilated by FIXED_MASK_MARGIN_MM, uint8
    brain_top_mm: float  # highest z (RAS mm) of the brain mask
    brain_centre_mm: np.ndarray  # centroid of the brain mask
    slab_centre_mm: np.ndarray  # (x, y) centroid of the brain mask in the cranial slab


@dataclass(frozen=True)
class Registration:
    """``matrix``: 4x4 map from template world (RAS mm) to subject world; ``metric``: elastix's final
    Mattes mutual information value (negative; lower is better)."""

    matrix: np.ndarray
    metric: float


def use_itk_threads(n: int = ITK_THREADS) -> None:
    """Limit ITK (and so elastix and N4) to ``n`` threads in this process."""
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(max(1, int(n)))


@lru_cache(maxsize=1)
def registration_template() -> RegistrationTemplate:
    """The registration template, loaded once per process."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=2).dataobj) > 0.5
    spacing = voxel_sizes(template.affine)
    outside_mm = ndi.distance_transform_edt(~brain, sampling=spacing)
    points = mask_points_mm(brain, template.affine)
    top = float(points[:, 2].max())
    return RegistrationTemplate(
        image=np.asarray(template.dataobj, dtype=np.float32),
        affine=template.affine,
        mask=(outside_mm <= FIXED_MASK_MARGIN_MM).astype(np.uint8),
        brain_top_mm=top,
        brain_centre_mm=points.mean(axis=0),
        slab_centre_mm=slab_centre(points, top + SCALP_MARGIN_MM),
    )


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def mask_points_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World (mm) coordinates of the voxels of ``mask``, shape (n, 3)."""
    return np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]


def slab_centre(points: np.ndarray, head_top_mm: float) -> np.ndarray:
    """(x, y) centroid of the points lying SLAB_MM below ``head_top_mm``."""
    z = points[:, 2]
    in_slab = (z <= head_top_mm - SLAB_MM[0]) & (z >= head_top_mm - SLAB_MM[1])
    return points[in_slab, :2].mean(axis=0)


def to_itk(data: np.ndarray, affine: np.ndarray, dtype=np.float32):
    """An ITK image of ``data`` (x, y, z order) placed in space by the RAS ``affine``."""
    image = itk.image_from_array(np.ascontiguousarray(data.transpose(2, 1, 0), dtype=dtype))
    spacing = voxel_sizes(affine)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(affine[:3, :3] / spacing)))
    return image


def correct_bias(data: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """N4 bias-field correction; returns the corrected image and a rough head mask, both full size.

    N4 runs on a copy shrunk (block means) to about N4_SHRINK_MM voxels within an Otsu head mask; the
    smooth log bias field it fits is evaluated on that shrunk grid, interpolated to full resolution
    and divided out.
    """
    spacing = np.asarray(spacing, dtype=float)
    factors = np.maximum(1, np.round(N4_SHRINK_MM / spacing)).astype(int)
    image = itk.image_from_array(np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32))
    image.SetSpacing(spacing.tolist())
    shrunk = itk.bin_shrink_image_filter(image, shrink_factors=factors.tolist())
    head = _head_mask(shrunk)
    n4 = itk.N4BiasFieldCorrectionImageFilter[type(shrunk), type(head), type(shrunk)].New()
    n4.SetInput(shrunk)
    n4.SetMaskImage(head)
    n4.SetNumberOfFittingLevels(len(N4_ITERATIONS))
    n4.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
    n4.Update()
    log_field = itk.array_from_image(n4.ReconstructBiasField(n4.GetLogBiasFieldControlPointLattice()))
    log_bias = _upsample(log_field, shrunk, spacing, data.shape, order=1)
    head_full = _upsample(itk.array_from_image(head), shrunk, spacing, data.shape, order=0)
    return (data / np.exp(log_bias)).astype(np.float32), head_full.astype(bool)


def _head_mask(shrunk):
    """Otsu foreground of the shrunk image, largest connected part, holes filled; ITK uint8 image."""
    otsu = itk.OtsuThresholdImageFilter[type(shrunk), itk.Image[itk.UC, 3]].New(
        shrunk, inside_value=0, outside_value=1)
    otsu.Update()
    foreground = itk.array_from_image(otsu.GetOutput()).astype(bool)
    foreground &= itk.array_from_image(shrunk) > 0  # N4 takes logs inside the mask
    labels, n = ndi.label(foreground)
    if n == 0:
        raise InputError("no head found (Otsu threshold leaves no foreground)")
    largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    mask = itk.image_from_array(ndi.binary_fill_holes(largest).astype(np.uint8))
    mask.CopyInformation(shrunk)
    return mask


def _upsample(array: np.ndarray, shrunk, spacing: np.ndarray, shape, order: int) -> np.ndarray:
    """Interpolate ``array`` (ITK z, y, x order, on the grid of ``shrunk``) at every full-size voxel."""
    shrunk_spacing = np.asarray(shrunk.GetSpacing())
    origin = np.asarray(shrunk.GetOrigin())
    return ndi.affine_transform(array.transpose(2, 1, 0), spacing / shrunk_spacing, offset=-origin / shrunk_spacing,
                                output_shape=tuple(shape), order=order, mode="nearest")


def initial_shift(points: np.ndarray, template: RegistrationTemplate) -> np.ndarray:
    """4x4 translation (RAS mm) that moves the subject's head (its voxels' world ``points``, (n, 3)) roughly
    onto the template brain."""
    top = float(points[:, 2].max())
    shift = np.eye(4)
    shift[:2, 3] = template.slab_centre_mm - slab_centre(points, top)
    shift[2, 3] = template.brain_top_mm + SCALP_MARGIN_MM - top
    return shift


def register_to_template(image: np.ndarray, affine: np.ndarray, head: np.ndarray,
                         turns_deg=((0.0, 0.0, 0.0),)) -> Registration:
    """Affine registration of a bias-corrected head (``affine``: voxel to RAS mm) to the template.

    Runs from each of START_OFFSETS_MM with the head turned by each of ``turns_deg`` (degrees about x, y, z,
    about the head's estimated brain centre) and keeps the best (lowest) final metric.
    """
    template = registration_template()
    points = mask_points_mm(head, affine)
    shift = initial_shift(points, template)
    centre = brain_centre_estimate(points, template)
    fixed = to_itk(template.image, template.affine)
    fixed_mask = to_itk(template.mask, template.affine, np.uint8)
    results = []
    for degrees in turns_deg:
        turn = np.eye(4)
        turn[:3, :3] = rotation_matrix(degrees)
        turn[:3, 3] = centre - turn[:3, :3] @ centre
        for offset in START_OFFSETS_MM:
            start = shift.copy()
            start[2, 3] += offset
            start = start @ turn
            found = _elastix_affine(fixed, fixed_mask, to_itk(image, start @ affine))
            results.append(Registration(matrix=np.linalg.inv(start) @ found.matrix, metric=found.metric))
    return min(results, key=lambda result: result.metric)


def brain_centre_estimate(points: np.ndarray, template: RegistrationTemplate) -> np.ndarray:
    """Where the brain's centre should lie in subject world (mm), from the head's voxels' world ``points``:
    under the centre of the cranial slab, as far below the top of the head as the template brain's centre
    lies below its top plus the scalp."""
    top = float(points[:, 2].max())
    return np.array([*slab_centre(points, top), top - SCALP_MARGIN_MM - (template.brain_top_mm - template.brain_centre_mm[2])])


def _elastix_affine(fixed, fixed_mask, moving) -> Registration:
    """One affine elastix run; the matrix maps fixed to moving world coordinates."""
    return _elastix(fixed, fixed_mask, moving, "affine", ELASTIX_SETTINGS)


def rigid_misalignment_mm(image: np.ndarray, fixed: np.ndarray, fixed_mask: np.ndarray, affine: np.ndarray,
                          points_mm: np.ndarray) -> float:
    """How far ``image`` lies from where a rigid registration to ``fixed`` would put it: the mean distance
    (mm) that the best rigid transform moves ``points_mm`` (n, 3), found by elastix from the identity.

    ``image``, ``fixed`` and ``fixed_mask`` share one grid (``affine``). A scan registered well gives a
    fraction of a voxel; one left shifted or rotated gives about its displacement (see ``preprocess``).
    """
    found = _elastix(to_itk(fixed, affine), to_itk(fixed_mask, affine, np.uint8), to_itk(image, affine),
                     "rigid", RIGID_CHECK_SETTINGS)
    moved = points_mm @ found.matrix[:3, :3].T + found.matrix[:3, 3]
    return float(np.linalg.norm(moved - points_mm, axis=1).mean())


def _elastix(fixed, fixed_mask, moving, kind: str, settings: dict) -> Registration:
    """One elastix run of the default ``kind`` parameter map with ``settings``; the matrix maps fixed to
    moving world coordinates."""
    parameters = itk.ParameterObject.New()
    parameter_map = parameters.GetDefaultParameterMap(kind, 3)
    for key, value in settings.items():
        parameter_map[key] = [value]
    parameters.AddParameterMap(parameter_map)
    with tempfile.TemporaryDirectory(prefix="elastix-") as log_dir:
        method = itk.ElastixRegistrationMethod[type(fixed), type(moving)].New(
            fixed_image=fixed, moving_image=moving, parameter_object=parameters)
        method.SetFixedMask(fixed_mask)
        method.SetNumberOfThreads(ITK_THREADS)
        method.SetLogToConsole(False)
        method.SetLogToFile(True)
        method.SetOutputDirectory(log_dir)
        try:
            method.Update()
        except RuntimeError as err:
            raise RegistrationError(f"elastix failed: {_last_line(err)}") from None
        metric = _final_metric(Path(log_dir) / "elastix.log")
    return Registration(matrix=_affine_of(method.GetCombinationTransform()), metric=metric)


def _affine_of(transform) -> np.ndarray:
    """The 4x4 matrix of an affine ITK transform, read off the images of four points."""
    points = np.array([[0.0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]])
    images = np.array([list(transform.TransformPoint(itk.Point[itk.D, 3](p.tolist()))) for p in points])
    matrix = np.eye(4)
    matrix[:3, :3] = (images[1:] - images[0]).T / 100.0
    matrix[:3, 3] = images[0]
    return matrix


def _final_metric(log_path: Path) -> float:
    values = re.findall(r"Final metric value\s*=\s*(\S+)", log_path.read_text(errors="replace"))
    if not values:
        raise RegistrationError(f"elastix reported no final metric value (log {log_path.name})")
    return float(values[-1])


def _last_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
