"""Reading and writing volumes: checks that name the file and the problem, and atomic writes."""
from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

NORMALISATION_PERCENTILE = 99.0


class InputError(ValueError):
    """A user input (file, row, option) is unusable; the message names it and says why."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (atomic on POSIX).

    A crash inside the block leaves no partial file at ``path``. The temporary name keeps the suffixes so
    that writers which choose a format by extension (nibabel, matplotlib) still do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_nifti(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=np.float32) -> Path:
    """Write ``data`` as NIfTI with ``affine`` (sform and qform set), atomically."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return Path(path)


def load_volume(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a 3D NIfTI volume and check it is usable, else raise InputError naming the file and problem.

    Accepts a 4D image with a single volume (squeezed). Returns an image whose data are float32 in
    memory and finite, with at least two distinct values.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (nib.filebasedimages.ImageFileError, gzip.BadGzipFile, zlib.error, EOFError, OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable NIfTI image ({type(err).__name__}: {err})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise InputError(f"{path}: 4D image with {data.shape[3]} volumes; a single 3D T1 volume is needed")
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputError(f"{path}: image of shape {data.shape} is not a 3D volume")
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: {n_bad} NaN or Inf voxels")
    if data.size == 0 or float(data.max()) == float(data.min()):
        raise InputError(f"{path}: image is empty (all voxels equal {float(data.flat[0]) if data.size else 'n/a'})")
    return nib.Nifti1Image(data, img.affine, img.header)


def normalise_intensity(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The intensity convention of every brain volume here (preprocessed or simulated): ``image`` divided by
    its NORMALISATION_PERCENTILE-th percentile inside ``mask`` (white matter near 1), zero outside."""
    scale = float(np.percentile(image[mask], NORMALISATION_PERCENTILE)) if mask.any() else 0.0
    if scale <= 0:
        raise InputError("no signal inside the brain mask")
    return np.where(mask, image / scale, 0.0).astype(np.float32)
