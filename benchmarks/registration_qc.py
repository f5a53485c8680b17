"""Calibration of preprocessing's registration QC on heads with a known error.

Raw heads (the simulator's raw variants: native scanner grid, random head pose, bias field, noise, in
scanner units; and real raw heads given with ``--real``) are registered once as ``preprocess`` registers
them. Each registered head is then moved by a known rigid error in template space (none, or a random
translation of 0-15 mm and/or a rotation of 0-15 degrees about a random axis through the brain's centre),
as if the registration had left it there, and both QC measures of ``preprocess`` are computed on it: the
template correlation of the output brain (``MIN_TEMPLATE_CORRELATION``) and the residual misalignment
(``MAX_MISALIGNMENT_MM``). The table gives, per group, how many scans each measure flags; the figure plots
the measured misalignment against the true mean displacement.

Registrations are cached under ``--out/registered`` (a rerun only computes the QC). Run:
``python benchmarks/registration_qc.py --out runs/registration_qc --real ../shared/data/ixi_hh10``
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from brainage_core.grid import axis_angle_rotation, resample_to_grid  # noqa: E402
from brainage_core.volumes import load_volume, normalise_intensity  # noqa: E402
from data_prep.preprocess import (  # noqa: E402
    MAX_MISALIGNMENT_MM,
    MIN_TEMPLATE_CORRELATION,
    register_scan,
    residual_misalignment_mm,
    template_on_grid,
)
from data_prep.qc import normalised_correlation  # noqa: E402
from data_prep.registration import use_itk_threads  # noqa: E402
from data_prep.simulate import simulate_cohort  # noqa: E402

LIMIT_MM, LIMIT_DEG = 6.0, 6.0  # errors at least this large must be flagged
OUTPUT_RESOLUTION_MM = 4.0


def rigid_move(axis: np.ndarray, degrees: float, shift: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """4x4 rotation by ``degrees`` about ``axis`` through ``centre``, then translation by ``shift`` (mm)."""
    rotation = axis_angle_rotation(axis, degrees)
    move = np.eye(4)
    move[:3, :3] = rotation
    move[:3, 3] = centre - rotation @ centre + shift
    return move


def registered(path: Path, cache: Path) -> dict:
    """``register_scan`` of one raw head, cached as .npz."""
    if not cache.is_file():
        scan = register_scan(nib.as_closest_canonical(load_volume(path)), template_on_grid(OUTPUT_RESOLUTION_MM))
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, corrected=scan.corrected, in_template=scan.in_template, metric=scan.registration.metric)
    return dict(np.load(cache))


def qc_of_moved(head: dict, move: np.ndarray) -> dict:
    """Both QC measures of the head left at ``move`` off its registration."""
    template = template_on_grid(OUTPUT_RESOLUTION_MM)
    in_template = move @ head["in_template"]
    brain = normalise_intensity(resample_to_grid(head["corrected"], in_template, template.grid), template.mask)
    return {"template_correlation": normalised_correlation(brain, template.image, template.brain),
            "misalignment_mm": residual_misalignment_mm(head["corrected"], in_template)}


def cases(heads: dict[str, Path], out: Path, per_head: int, rng: np.random.Generator, group: str) -> list[dict]:
    template = template_on_grid(OUTPUT_RESOLUTION_MM)
    brain_points = template.grid.world_coordinates()[:, template.brain].T
    centre = brain_points.mean(axis=0)
    rows = []
    for name, path in tqdm(heads.items(), desc=group, unit="head"):
        head = registered(path, out / "registered" / f"{name}.npz")
        for k in range(per_head):
            # the first case of each head is the registration itself; then a shift, a rotation, both
            mm = 0.0 if k == 0 or k % 3 == 2 else rng.uniform(0, 15)
            degrees = 0.0 if k == 0 or k % 3 == 1 else rng.uniform(0, 15)
            move = rigid_move(rng.normal(size=3), degrees, mm * _unit(rng.normal(size=3)), centre)
            moved = brain_points @ move[:3, :3].T + move[:3, 3]
            rows.append({"group": group, "head": name, "shift_mm": mm, "rotation_deg": degrees,
                         "true_displacement_mm": float(np.linalg.norm(moved - brain_points, axis=1).mean()),
                         **qc_of_moved(head, move)})
    return rows


def plot(results: pd.DataFrame, path: Path) -> None:
    figure = Figure(figsize=(5.5, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for group, part in results.groupby("group", sort=False):
        axes.scatter(part.true_displacement_mm, part.misalignment_mm, s=12, alpha=0.7, label=group)
    top = float(max(results.true_displacement_mm.max(), results.misalignment_mm.max())) + 1
    axes.plot([0, top], [0, top], color="grey", lw=0.8)
    axes.axhline(MAX_MISALIGNMENT_MM, color="red", lw=0.8, ls="--", label=f"QC warning above {MAX_MISALIGNMENT_MM:g} mm")
    axes.set_xlabel("true mean displacement of the brain (mm)")
    axes.set_ylabel("measured residual misalignment (mm)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def table(results: pd.DataFrame) -> str:
    results = results.assign(
        misregistered=(results.shift_mm >= LIMIT_MM) | (results.rotation_deg >= LIMIT_DEG),
        registered=(results.shift_mm == 0) & (results.rotation_deg == 0),
        flag_misalignment=results.misalignment_mm > MAX_MISALIGNMENT_MM,
        flag_correlation=results.template_correlation < MIN_TEMPLATE_CORRELATION)
    lines = [f"| heads | cases | misalignment > {MAX_MISALIGNMENT_MM:g} mm flags | correlation < "
             f"{MIN_TEMPLATE_CORRELATION} flags | either flags |", "|---|---|---|---|---|"]
    for group, part in results.groupby("group", sort=False):
        for label, rows in (("as registered", part[part.registered]),
                            (f">= {LIMIT_MM:g} mm or >= {LIMIT_DEG:g} deg off", part[part.misregistered]),
                            ("in between", part[~part.registered & ~part.misregistered])):
            if len(rows):
                either = rows.flag_misalignment | rows.flag_correlation
                lines.append(f"| {group}, {label} | {len(rows)} | {_share(rows.flag_misalignment)} | "
                             f"{_share(rows.flag_correlation)} | {_share(either)} |")
    registered = results[results.registered]
    lines += ["", f"Measured misalignment of heads as registered: median {registered.misalignment_mm.median():.2f} mm, "
              f"max {registered.misalignment_mm.max():.2f} mm; |measured - true| over moved heads within "
              f"15 mm: median {_error(results):.2f} mm."]
    return "\n".join(lines)


def _share(flags: pd.Series) -> str:
    return f"{int(flags.sum())}/{len(flags)} ({100 * flags.mean():.0f} %)"


def _error(results: pd.DataFrame) -> float:
    moved = results[(results.true_displacement_mm > 0) & (results.true_displacement_mm <= 15)]
    return float((moved.misalignment_mm - moved.true_displacement_mm).abs().median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/registration_qc")
    parser.add_argument("--n", type=int, default=30, help="simulated raw heads")
    parser.add_argument("--per_head", type=int, default=7, help="cases per head (the first as registered)")
    parser.add_argument("--real", default=None, help="folder of real raw T1 heads (*.nii.gz)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    out = Path(args.out)
    use_itk_threads()
    cohort = out / "simulated"
    if not (cohort / "raw" / "participants.tsv").is_file():
        simulate_cohort(n=args.n, out=str(cohort), resolution=2.0, seed=args.seed, raw_variants=args.n, progress=False)
    rng = np.random.default_rng(args.seed)
    simulated = {p.name.split(".")[0]: p for p in sorted((cohort / "raw").glob("sub-*/anat/*.nii.gz"))}
    rows = cases(simulated, out, args.per_head, rng, "simulated raw heads")
    if args.real:
        real = {p.name.split(".")[0]: p for p in sorted(Path(args.real).glob("*.nii.gz"))}
        rows += cases(real, out, args.per_head, rng, f"real raw heads ({Path(args.real).name})")
    results = pd.DataFrame(rows)
    results.to_csv(out / "registration_qc.csv", index=False)
    plot(results, out / "registration_qc.png")
    text = table(results)
    (out / "registration_qc.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
