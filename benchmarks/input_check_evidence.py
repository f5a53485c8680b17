"""How the bundles' out-of-distribution check (``custom_components.common.input_reference``) scores real and broken
inputs: the reference is fitted on a cohort's training split exactly as ``train.json`` fits it, then every
group below is scored as ``inference.json`` scores it, and a Markdown table of flagged counts and score
ranges is printed (and written to ``--out``).

Groups: the cohort's held-out test split; whole cohorts simulated with other settings (``--other``); real
heads preprocessed with ``python -m data_prep preprocess`` (``--real``); raw heads before preprocessing,
resized onto the grid as ``on_shape_mismatch resample`` does (``--raw``); and, made from the first
``--n_made`` test subjects, a contrast-inverted (T2-like) brain, the brain in scanner units (x800), noise,
noise inside the brain mask, and the brain shifted by 2 voxels (a misregistration, which this check is
not meant to catch: registration QC is).

Run: ``python benchmarks/input_check_evidence.py --datalist runs/evidence/data/cohort400/datalist.json
--other runs/evidence/data/other_sites_all.json runs/evidence/data/shifted_all.json
--real runs/evidence/data/ixi_prep/datalist.json --raw runs/evidence/data/ixi_raw.json``
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist
from monai.transforms import Compose, LoadImaged, Orientationd, Resized

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from custom_components.common.input_reference import InputReference  # noqa: E402


def records(datalist: str, splits=("training", "validation", "test")) -> list[dict]:
    found = []
    for split in splits:
        try:
            found += load_decathlon_datalist(datalist, True, split)
        except ValueError:  # a split the datalist does not have
            pass
    return found


def scores(reference: InputReference, volumes) -> np.ndarray:
    return np.array([float(reference.score(reference.features(v))) for v in volumes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", required=True, help="the training cohort's datalist")
    parser.add_argument("--other", nargs="*", default=[], help="datalists of cohorts simulated with other settings")
    parser.add_argument("--real", nargs="*", default=[], help="datalists of preprocessed real heads")
    parser.add_argument("--raw", nargs="*", default=[], help="datalists of raw heads (before preprocessing)")
    parser.add_argument("--n_made", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=None, help="ood_threshold (default: the bundles')")
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()

    training = load_decathlon_datalist(args.datalist, True, "training")
    load = Compose([LoadImaged("image", image_only=True, ensure_channel_first=True), Orientationd("image", axcodes="RAS")])
    shape = tuple(load(dict(training[0]))["image"].shape[1:])
    reference = InputReference(shape, **({"threshold": args.threshold} if args.threshold is not None else {}))
    reference.fit(lambda: (load(dict(r))["image"] for r in training))
    resized = Compose([load, Resized("image", spatial_size=shape, mode="trilinear")])
    test = [load(dict(r))["image"][0].numpy() for r in load_decathlon_datalist(args.datalist, True, "test")]

    groups = {f"training split (n={len(training)}): fitted on": reference.training_scores.numpy(),
              "held-out test split": scores(reference, test)}
    for name in args.other:
        groups[f"other simulator settings: {Path(name).stem}"] = scores(reference, (load(dict(r))["image"] for r in records(name)))
    for name in args.real:
        groups[f"real, preprocessed: {Path(name).parent.name}"] = scores(reference, (load(dict(r))["image"] for r in records(name)))
    for name in args.raw:
        groups[f"real raw heads, resized to the grid: {Path(name).stem}"] = scores(
            reference, (resized(dict(r))["image"] for r in records(name)))
    rng = np.random.default_rng(0)
    made = test[: args.n_made]
    groups["made: contrast inverted (T2-like)"] = scores(reference, (np.where(v > 0, np.clip(1.2 - v, 0, None), 0) for v in made))
    groups["made: not normalised (x800)"] = scores(reference, (v * 800.0 for v in made))
    groups["made: uniform noise"] = scores(reference, (rng.random(v.shape) for v in made))
    groups["made: noise inside the brain"] = scores(reference, (np.where(v > 0, rng.random(v.shape), 0) for v in made))
    groups["made: shifted 2 voxels (not this check's job)"] = scores(reference, (np.roll(v, 2, axis=1) for v in made))

    lines = [f"Reference fitted on `{args.datalist}` ({shape[0]}x{shape[1]}x{shape[2]}); flagged: ood_score > "
             f"{reference.threshold:g}.", "", "| inputs | n | flagged | ood_score median (min-max) |", "|---|---|---|---|"]
    for name, values in groups.items():
        flagged = int((values > reference.threshold).sum())
        lines.append(f"| {name} | {values.size} | {flagged} | {np.median(values):.1f} ({values.min():.1f}-{values.max():.1f}) |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
