"""The canonical grid: the one place that defines where preprocessed and simulated volumes live.

A 192 mm cube in MNI152 2009 space, centred on the template brain's bounding box (x -72..72,
y -107..73, z -72..82 mm), RAS+ voxel axes. The resolution sets the shape: 4 mm -> 48^3 (``DEFAULT_RESOLUTION_MM``: the
bundles' ``image_size`` and the simulator's default), 2 mm -> 96^3, 1 mm -> 192^3.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

FIELD_OF_VIEW_MM = 192.0
CENTRE_MM = (0.0, -17.0, 5.0)
DEFAULT_RESOLUTION_MM = 4.0  # the grid of every bundle config (image_size [48, 48, 48])
FWHM_TO_SIGMA = 1.0 / np.sqrt(8.0 * np.log(2.0))


@dataclass(frozen=True)
class Grid:
    """A cubic RAS+ voxel grid: ``shape`` voxels of ``resolution`` mm, voxel-to-world ``affine``."""

    resolution: float
    shape: tuple[int, int, int]
    affine: np.ndarray

    def world_coordinates(self) -> np.ndarray:
        """World (MNI mm) coordinates of every voxel centre, shape (3, *shape)."""
        idx = np.indices(self.shape, dtype=np.float64).reshape(3, -1)
        return (self.affine[:3, :3] @ idx + self.affine[:3, 3:]).reshape(3, *self.shape)

    def voxel_of(self, world_mm) -> np.ndarray:
        """Continuous voxel index of world points given as (..., 3) in mm."""
        inv = np.linalg.inv(self.affine)
        pts = np.asarray(world_mm, dtype=np.float64)
        return pts @ inv[:3, :3].T + inv[:3, 3]


def canonical_grid(resolution: float = DEFAULT_RESOLUTION_MM) -> Grid:
    """The canonical grid at ``resolution`` mm; the field of view must hold a whole number of voxels."""
    resolution = float(resolution)
    n = FIELD_OF_VIEW_MM / resolution
    if resolution <= 0 or abs(n - round(n)) > 1e-6:
        raise ValueError(
            f"resolution {resolution} mm does not divide the {FIELD_OF_VIEW_MM:g} mm field of view "
            "into whole voxels; use e.g. 1, 1.5, 2, 3 or 4"
        )
    n = int(round(n))
    affine = np.eye(4)
    affine[:3, :3] *= resolution
    affine[:3, 3] = np.asarray(CENTRE_MM) - (n / 2 - 0.5) * resolution
    return Grid(resolution=resolution, shape=(n, n, n), affine=affine)


def resample_to_grid(data: np.ndarray, affine: np.ndarray, grid: Grid) -> np.ndarray:
    """Resample a volume (voxel-to-world ``affine``) onto ``grid``: Gaussian anti-aliasing to the target
    resolution (FWHM = the coarser voxel size), then trilinear interpolation; zero outside."""
    source_voxel = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    sigma = np.sqrt(np.maximum(grid.resolution**2 - source_voxel**2, 0.0)) * FWHM_TO_SIGMA / source_voxel
    smooth = ndi.gaussian_filter(data.astype(np.float32), sigma) if np.any(sigma > 0) else data
    world = grid.world_coordinates().reshape(3, -1)
    inverse = np.linalg.inv(affine)
    index = inverse[:3, :3] @ world + inverse[:3, 3:]
    return ndi.map_coordinates(smooth, index, order=1, cval=0.0).reshape(grid.shape).astype(np.float32)


def rotation_matrix(degrees) -> np.ndarray:
    """Rotation about x, then y, then z by the given angles in degrees."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def axis_angle_rotation(axis, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about ``axis`` (any length), as a 3x3 matrix (Rodrigues' formula)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(degrees)
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
