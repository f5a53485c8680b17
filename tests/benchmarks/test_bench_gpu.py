"""The GPU benchmark's CPU mode at toy size: every figure it reports is there and is a real measurement.
(Its figures are read in its output, not asserted: timings belong to benchmark runs, not to tests.)"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cpu_mode_times_both_bundles_model_only_and_whole_and_the_per_iteration_overhead(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--toy", "--subjects", "20",
               "--epochs", "2", "--steps", "2", "--repeats", "1", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert len(results["model_only"]) == 6  # three models x fp32, bf16
    assert sorted(results["whole_bundle"]) == [f"{b} | {p}" for b in ("slice_cnn_brainage", "tgb_gan_augment")
                                               for p in ("bf16", "fp32")]
    rates = [row["volumes_per_second"] for table in ("model_only", "whole_bundle") for row in results[table].values()]
    assert all(math.isfinite(rate) and rate > 0 for rate in rates)
    # the whole bundle holds the model's own step and more: validation, reports, checkpoints
    assert all(0 < row["of_model_only"] < 10 for row in results["whole_bundle"].values())
    overhead = results["overhead"]
    assert overhead["fixed_ms_per_iteration"] > 0 and overhead["with_augmentation_ms_per_iteration"] > 0
    assert math.isfinite(overhead["augmentation_ms_per_volume"])
    table = (tmp_path / "bench_gpu.md").read_text()
    assert "| whole bundle" in table and "Per-iteration overhead" in table
