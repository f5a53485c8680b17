"""Seconds per scan of ``preprocess_volume`` in one process (one ITK thread), median of several runs.

Cases: a raw 2 mm IXI head to the 2 mm grid (target < 20 s) and the same head upsampled to 1 mm to
the 1 mm grid (target < 60 s). One untimed warm-up call per case pays the one-off costs (ITK/elastix
module loading, template resampling). Prints, never asserts: timings depend on the machine and its load.

    .venv/bin/python benchmarks/bench_preprocess.py [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from data_prep.preprocess import preprocess_volume
from data_prep.registration import ITK_THREADS

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi_sample" / "IXI012-HH-1211_T1.nii.gz"
TARGETS_S = {2.0: 20.0, 1.0: 60.0}


def upsampled_copy(path: Path, voxel_mm: float, folder: Path) -> Path:
    """``path`` resampled (trilinear) to ``voxel_mm`` voxels, saved in ``folder``."""
    img = nib.load(str(path))
    zoom = np.asarray(img.header.get_zooms()[:3]) / voxel_mm
    data = ndi.zoom(np.asarray(img.dataobj, dtype=np.float32), zoom, order=1)
    affine = img.affine.copy()
    affine[:3, :3] /= zoom  # ndi.zoom keeps the first voxel centre in place
    out = folder / f"upsampled_{voxel_mm:g}mm.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(out))
    return out


def median_seconds(path: Path, resolution: float, runs: int) -> tuple[float, list[float]]:
    preprocess_volume(path, resolution)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        preprocess_volume(path, resolution)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not SAMPLE.is_file():
        print(f"bench_preprocess: sample scan not found at {SAMPLE}; nothing measured")
        return
    print(f"bench_preprocess: {ITK_THREADS} ITK thread(s) on a {len(os.sched_getaffinity(0))}-core machine, "
          f"median of {args.runs} run(s) after one warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        cases = {2.0: SAMPLE, 1.0: upsampled_copy(SAMPLE, 1.0, Path(tmp))}
        for resolution, path in cases.items():
            median, times = median_seconds(path, resolution, args.runs)
            shape = nib.load(str(path)).shape
            print(f"  {shape} scan -> {resolution:g} mm grid: median {median:.1f} s per scan "
                  f"(target < {TARGETS_S[resolution]:g} s; runs {', '.join(f'{t:.1f}' for t in times)})")


if __name__ == "__main__":
    main()
