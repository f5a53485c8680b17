"""Speed and memory of the cohort simulator. Prints, never asserts.

- seconds per subject (median over SUBJECTS_TIMED), making and writing one subject as
  ``simulate-cohort`` does, at 2 mm and 4 mm; the one-off template loading is reported apart;
- peak resident memory of whole ``simulate_cohort`` runs of n = 20 and n = 60 at 2 mm, each in a fresh
  process: subjects are written as they are made, so the peak should not grow with n;
- how hard the data are: test-split MAE of a ridge regression on 8 mm block means of the images, and of
  the constant (training mean age) predictor, on a 400-subject 4 mm cohort with its datalist's splits.

Run: ``python benchmarks/bench_simulate.py``.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from brainage_core.datalist import read_datalist
from brainage_core.volumes import save_nifti
from custom_components.slice_cnn.baselines import BLOCK, age_baselines
from data_prep.anatomy import template_anatomy
from data_prep.simulate import CohortConfig, simulate_cohort, simulate_subjects

SUBJECTS_TIMED = 10
MEMORY_SIZES = (20, 60)
MEMORY_RESOLUTION = 2.0
BASELINE_N, BASELINE_RESOLUTION = 400, 4.0
PEAK_RSS_CODE = """
import resource, sys, tempfile
from data_prep.simulate import simulate_cohort
with tempfile.TemporaryDirectory() as out:
    simulate_cohort(n=int(sys.argv[1]), out=out, resolution=float(sys.argv[2]), seed=0, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def seconds_per_subject(resolution: float, n: int = SUBJECTS_TIMED) -> tuple[float, list[float]]:
    """Template loading time, and the time to make and write each of ``n`` subjects."""
    start = time.perf_counter()
    template_anatomy.cache_clear()
    anatomy = template_anatomy(resolution)
    loading = time.perf_counter() - start
    times = []
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        for subject in simulate_subjects(CohortConfig(n=n, resolution=resolution, ad_fraction=0.3), anatomy):
            save_nifti(subject.image, anatomy.grid.affine, Path(out) / f"{subject.participant_id}.nii.gz")
            now = time.perf_counter()
            times.append(now - start)
            start = now
    return loading, times


def peak_rss_mib(n: int, resolution: float) -> float:
    """Peak resident memory (MiB) of a fresh process simulating a cohort of ``n``."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_CODE, str(n), str(resolution)],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def baseline_mae(n: int = BASELINE_N, resolution: float = BASELINE_RESOLUTION) -> dict:
    """Test MAE (years) of ridge on block-averaged voxels and of the constant predictor (baselines.py)."""
    with tempfile.TemporaryDirectory() as out:
        splits = read_datalist(simulate_cohort(n=n, out=out, resolution=resolution, seed=0, progress=False))
        return age_baselines(splits["training"], splits["validation"], splits["test"])


def main() -> None:
    for resolution in (2.0, 4.0):
        loading, times = seconds_per_subject(resolution)
        print(f"{resolution:g} mm: {np.median(times):.3f} s per subject (median of {len(times)}; "
              f"min {min(times):.3f}, max {max(times):.3f}); template loading {loading:.1f} s once")
    for n in MEMORY_SIZES:
        print(f"peak RSS, n = {n} at {MEMORY_RESOLUTION:g} mm: {peak_rss_mib(n, MEMORY_RESOLUTION):.0f} MiB")
    baselines = baseline_mae()
    print(f"test MAE, {BASELINE_N} subjects at {BASELINE_RESOLUTION:g} mm, ridge on "
          f"{BASELINE_RESOLUTION * BLOCK:g} mm voxels: {baselines['ridge_mae']:.2f} y; "
          f"constant predictor: {baselines['constant_mae']:.2f} y")


if __name__ == "__main__":
    main()
