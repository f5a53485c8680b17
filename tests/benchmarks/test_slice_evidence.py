"""The slice evidence script's bookkeeping: trainings side by side, and the variant table's committed store
(a new checkout reuses the runs it holds and trains only the rest)."""
import argparse
import json
import os
import sys
from pathlib import Path

import pytest

import benchmarks.slice_evidence as evidence


@pytest.fixture
def two_jobs(monkeypatch):
    monkeypatch.setattr(evidence, "JOBS", 2)


def test_side_by_side_runs_share_the_cores_and_report_their_own_cpu_time(two_jobs, tmp_path):
    log = tmp_path / "child.log"
    burn = "import os; print(os.environ['OMP_NUM_THREADS']); sum(i * i for i in range(3_000_000))"
    timing = evidence.run([sys.executable, "-c", burn], log)
    assert log.read_text().strip() == str(max(1, os.cpu_count() // 2))
    assert 0.05 < timing["cpu_seconds"] <= timing["seconds"] * 1.1


def test_a_failed_run_names_its_log(tmp_path):
    with pytest.raises(RuntimeError, match="exit 3.*failed.log"):
        evidence.run([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "failed.log")


def fake_metrics(folder: Path, datalist, overrides: dict) -> dict:
    """A run's result whose MAE orders the rows: mean < attention < transformer < max, then by axis."""
    rank = evidence.AGGREGATIONS.index(overrides.get("network_def#aggregation", "mean"))
    axis = evidence.AXES.index(overrides.get("network_def#slice_axis", "sagittal"))
    mae = 5.0 + {0: 0, 1: 3, 2: 1, 3: 2}[rank] + axis * 0.1 + overrides["network_def#position_embedding"] * 0.05 \
        if "network_def#aggregation" in overrides else 9.0
    curve = {"epoch": [1, 2], "val_mae": [15.0, mae], "train_loss": [1.0, 0.5], "val_pearson_r": [0.2, 0.9]}
    return {"mae": mae + overrides["seed"] / 100, "pearson_r": 0.9, "train_seconds": 60.0, "train_cpu_seconds": 80.0,
            "curve": curve, "folder": folder.name}


def test_the_variant_table_reuses_stored_runs_and_reruns_the_best_four(two_jobs, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(evidence, "train_and_test",
                        lambda folder, datalist, overrides: trained.append(folder.name) or fake_metrics(folder, datalist, overrides))
    store = tmp_path / "docs" / "variants.json"
    grid = evidence.variant_grid(20)
    store.parent.mkdir()
    stored = {"mean_nope_sagittal": {"overrides": grid["mean_nope_sagittal"],
                                     "runs": {"0": {"mae": 4.0, "pearson_r": 0.95, "source": "an earlier session"}}}}
    store.write_text(json.dumps({"epochs": 20, "rows": stored}))

    part = evidence.part_variants(tmp_path / "out", [0, 1, 2], Path("datalist.json"), 20, store)

    assert "mean_nope_sagittal" not in trained  # reused, seed 0
    assert len(trained) == len(grid) - 1 + 8 and len(set(trained)) == len(trained)
    assert part["best"] == ["mean_nope_sagittal", "mean_pe_sagittal", "mean_nope_coronal", "mean_pe_coronal"]
    assert {"mean_nope_sagittal_seed1", "mean_pe_coronal_seed2"} <= set(trained)
    on_disk = json.loads(store.read_text())
    assert on_disk["rows"]["mean_nope_sagittal"]["runs"]["0"]["source"] == "an earlier session"
    assert set(on_disk["rows"]["mean_pe_coronal"]["runs"]) == {"0", "1", "2"}
    assert on_disk["rows"]["resnet18"]["runs"]["0"]["jobs"] == 2

    trained.clear()  # a second call finds every run in the store
    assert evidence.part_variants(tmp_path / "out", [0, 1, 2], Path("datalist.json"), 20, store)["best"] == part["best"]
    assert trained == []

    args = argparse.Namespace(out="runs/x", seeds=[0, 1, 2], jobs=2, overrides="{}")
    page = evidence.variants_markdown(on_disk, args)
    assert "33 of 33 runs done" in page
    assert "| mean | off | 4.68 +/- 0.59 (3 seeds) |" in page  # the stored 4.0 beside the new 5.01 and 5.02
    assert "| mean_nope_sagittal * | 0 | 4.00 | 0.950 | | | | |" in page and "* an earlier session" in page

    with pytest.raises(SystemExit, match="holds runs of 20 epochs, not --variant_epochs 10"):
        evidence.part_variants(tmp_path / "out", [0, 1, 2], Path("datalist.json"), 10, store)


def test_the_variant_page_marks_rows_not_run_yet(tmp_path):
    args = argparse.Namespace(out="runs/x", seeds=[0], jobs=1, overrides="{}")
    page = evidence.variants_markdown({"epochs": 20, "rows": {}}, args)
    assert "0 of 25 runs done" in page and "| transformer | on | not run yet | not run yet | not run yet |" in page
