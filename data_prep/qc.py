"""Quality control of preprocessed volumes: agreement with the template and a picture to look at."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from brainage_core.volumes import atomic_path

VIEWS = ("sagittal", "coronal", "axial")


def normalised_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of ``a`` and ``b`` over the voxels of ``mask``."""
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def save_qc_picture(image: np.ndarray, mask: np.ndarray, path: str | os.PathLike, title: str) -> Path:
    """Write a PNG of three orthogonal slices through the centre of ``mask`` with its outline in red.

    ``image`` and ``mask`` are RAS volumes on the same grid; the picture is written atomically.
    """
    centre = np.round(np.argwhere(mask).mean(axis=0)).astype(int)
    vmax = float(np.percentile(image[mask], 99.5)) if mask.any() else float(image.max())
    figure = Figure(figsize=(9, 3.4))
    FigureCanvasAgg(figure)
    for k, view in enumerate(VIEWS):
        axes = figure.add_subplot(1, 3, k + 1)
        # slice k fixes axis k; transposing puts the remaining second axis vertical, origin at bottom
        plane = np.take(image, centre[k], axis=k).T
        outline = np.take(mask, centre[k], axis=k).T.astype(np.float32)
        axes.imshow(plane, cmap="gray", origin="lower", vmin=0.0, vmax=vmax, interpolation="nearest")
        axes.contour(outline, levels=[0.5], colors="red", linewidths=0.6)
        axes.set_title(view, fontsize=9)
        axes.set_axis_off()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=80)
    return Path(path)
