"""Test MAE of the slice network's variants: aggregation x position embedding x slice axis.

Each variant is the slice bundle's own train.json then evaluate.json (in-process ``monai.bundle.run``
with overrides, one folder per variant under ``--out``; a finished variant is not rerun), all with the
same seed and settings. Prints a markdown table with the ridge baseline of the cohort for comparison.

    python benchmarks/slice_variant_table.py --dataset_dir runs/exp/cohort400 --out runs/exp/variants
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from monai.bundle import run as run_bundle

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_simulate import ridge_and_constant_mae  # noqa: E402

from data_prep.datalist import read_datalist  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "slice_cnn_brainage" / "configs"
AGGREGATIONS = ("mean", "attention", "transformer")
AXES = ("sagittal", "coronal", "axial")


def run_variant(out: Path, dataset_dir: str, aggregation: str, position: bool, axis: str, settings: dict) -> dict:
    root = out / f"{aggregation}_{'pe' if position else 'nope'}_{axis}"
    metrics = root / "eval" / "test_metrics.json"
    common = {"bundle_root": str(root), "dataset_dir": dataset_dir, "network_def#aggregation": aggregation,
              "network_def#position_embedding": position, "network_def#slice_axis": axis, **settings}
    seconds = float("nan")
    if not metrics.exists():
        start = time.perf_counter()
        run_bundle(config_file=str(CONFIGS / "train.json"), **common)
        seconds = time.perf_counter() - start
        run_bundle(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], **common)
    with open(metrics) as handle:
        return {"aggregation": aggregation, "position_embedding": position, "axis": axis,
                "train_s": seconds, **json.load(handle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sfcn_channels", default="16,32,64,64,64")
    args = parser.parse_args()
    settings = {"train#trainer#max_epochs": args.epochs, "optimizer#lr": args.lr,
                "network_def#sfcn_channels": [int(c) for c in args.sfcn_channels.split(",")]}
    out = Path(args.out)
    rows = [run_variant(out, args.dataset_dir, agg, pe, axis, settings)
            for agg, pe, axis in itertools.product(AGGREGATIONS, (False, True), AXES)]
    print(f"\nsettings: {settings}\n")
    print("| aggregation | position embedding | " + " | ".join(AXES) + " |")
    print("|---|---|" + "---|" * len(AXES))
    for agg, pe in itertools.product(AGGREGATIONS, (False, True)):
        cells = [next(r for r in rows if (r["aggregation"], r["position_embedding"], r["axis"]) == (agg, pe, axis))
                 for axis in AXES]
        print(f"| {agg} | {'on' if pe else 'off'} | " + " | ".join(f"{c['mae']:.2f}" for c in cells) + " |")
    ridge, constant = ridge_and_constant_mae(read_datalist(Path(args.dataset_dir) / "datalist.json"))
    print(f"\nsame test split: ridge on 8 mm block means {ridge:.2f}; constant predictor {constant:.2f}")


if __name__ == "__main__":
    main()
