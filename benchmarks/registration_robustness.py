"""Does preprocessing register raw heads correctly, and does its QC say so? Measured on heads with a known truth.

Simulated raw heads (``--n``): the simulator's subjects (ageing and atrophy as in the cohort) rendered as
scanner images with skull, scalp and neck (``simulate.render_raw(head=True)``), at a random pose (rotation
of up to ``--max_degrees`` about a random axis, shift of up to ``--max_shift_mm``, head scale within
``--max_scale``), with bias field and noise. The field of view follows the head's position, as a scanner
operator places it: for every other head a tall one that takes in the neck (NECK_FIELD_OF_VIEW_MM,
lowered by 20 mm), for the rest the simulator's, raised by 10 mm (no neck). The truth is the pose composed with the subject's own head size and placement.
Real raw heads (``--real``): each registered as it is, then again after a random rigid pose written into
its header; the truth of the posed scan is the pose applied to the first registration.

Registration is preprocessing's, retry from turned starts included (``preprocess.register_scan``).
A registration is correct when the template brain's voxels land within ``--max_error_mm`` (mean) of where
the truth puts them and the brain volume is within 10 % of the truth. The QC verdict is preprocessing's:
template correlation >= MIN_TEMPLATE_CORRELATION and residual misalignment <= MAX_MISALIGNMENT_MM.
Results per head are cached in ``--out/heads/`` (a rerun goes on); the table is written to
``--out/registration_robustness.md`` and the rows to ``.csv``. Run:
``python benchmarks/registration_robustness.py --out runs/registration_robustness --real ../shared/data/ixi_hh10``
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from brainage_core.grid import CENTRE_MM, axis_angle_rotation  # noqa: E402
from brainage_core.volumes import load_volume  # noqa: E402
from data_prep.anatomy import template_anatomy  # noqa: E402
from data_prep.effects import rotation_matrix  # noqa: E402
from data_prep.preprocess import (  # noqa: E402
    MAX_MISALIGNMENT_MM,
    MIN_TEMPLATE_CORRELATION,
    register_scan,
    template_on_grid,
)
from data_prep.registration import use_itk_threads  # noqa: E402
from data_prep.simulate import RAW_FIELD_OF_VIEW_MM, CohortConfig, HeadPose, render_raw, simulate_subjects  # noqa: E402

QC_GRID_MM = 4.0
NECK_FIELD_OF_VIEW_MM = (240.0, 256.0, 180.0)  # P, S, R


def pose_matrix(scale: float, degrees, shift_mm) -> np.ndarray:
    """4x4 head-to-scanner map of a pose as ``effects.undo_pose`` undoes it (about the grid centre)."""
    centre = np.asarray(CENTRE_MM)
    matrix = np.eye(4)
    matrix[:3, :3] = scale * rotation_matrix(degrees)
    matrix[:3, 3] = centre + np.asarray(shift_mm) - matrix[:3, :3] @ centre
    return matrix


def euler_degrees(rotation: np.ndarray) -> tuple[float, float, float]:
    """Angles (x, y, z) of ``effects.rotation_matrix`` (rz @ ry @ rx) giving ``rotation``."""
    ay = -np.arcsin(np.clip(rotation[2, 0], -1, 1))
    return tuple(np.rad2deg([np.arctan2(rotation[2, 1], rotation[2, 2]), ay, np.arctan2(rotation[1, 0], rotation[0, 0])]))


def random_pose(rng: np.random.Generator, max_degrees: float, max_shift: float, max_scale: float) -> HeadPose:
    rotation = axis_angle_rotation(rng.normal(size=3), rng.uniform(0, max_degrees))
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(0, max_shift)
    return HeadPose(float(rng.uniform(1 - max_scale, 1 + max_scale)), euler_degrees(rotation), tuple(shift))


def judge(found: np.ndarray, truth: np.ndarray, qc: dict, max_error_mm: float) -> dict:
    """Landmark error, volume ratio and both verdicts of a registration (template-to-subject matrices)."""
    template = template_on_grid(QC_GRID_MM)
    points = template.grid.world_coordinates()[:, template.brain].T
    error = np.linalg.norm((points @ found[:3, :3].T + found[:3, 3]) - (points @ truth[:3, :3].T + truth[:3, 3]), axis=1)
    volume_ratio = abs(np.linalg.det(found[:3, :3]) / np.linalg.det(truth[:3, :3]))
    return {"landmark_error_mm": float(error.mean()), "volume_ratio": float(volume_ratio),
            "correct": bool(error.mean() <= max_error_mm and abs(volume_ratio - 1) <= 0.1),
            "qc_passed": bool(qc["template_correlation"] >= MIN_TEMPLATE_CORRELATION
                              and qc["misalignment_mm"] <= MAX_MISALIGNMENT_MM),
            "template_correlation": qc["template_correlation"], "misalignment_mm": qc["misalignment_mm"]}


def register(image: nib.Nifti1Image) -> tuple[np.ndarray, dict]:
    """Preprocessing's registration of a scan: (template-to-scanner matrix, QC record)."""
    scan = register_scan(nib.as_closest_canonical(image), template_on_grid(QC_GRID_MM))
    return scan.registration.matrix, scan.qc


def cached(path: Path, compute) -> dict:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(compute()))
    return json.loads(path.read_text())


def simulated_heads(args, out: Path) -> list[dict]:
    anatomy = template_anatomy(2.0)
    # ages up to 96 and a fifth with AD: the old, atrophied brains where registration failed on real data
    config = CohortConfig(n=args.n, resolution=2.0, seed=args.seed, age_max=96.0, ad_fraction=0.2).check()
    subjects = simulate_subjects(config, anatomy)
    rows = []
    for index, subject in enumerate(tqdm(subjects, total=args.n, desc="simulated heads", unit="head")):
        def compute(subject=subject, index=index):
            rng = np.random.default_rng([args.seed, 7, index])
            pose = random_pose(rng, args.max_degrees, args.max_shift_mm, args.max_scale)
            neck = index % 2 == 0
            place = np.asarray(pose.shift_mm) + (0.0, 0.0, -20.0 if neck else 10.0)
            data, affine = render_raw(anatomy, subject, rng, pose, place, NECK_FIELD_OF_VIEW_MM if neck else RAW_FIELD_OF_VIEW_MM,
                                      head=True)
            p = subject.params
            truth = pose_matrix(pose.scale, pose.degrees, pose.shift_mm) @ pose_matrix(p.head_scale, p.rotation_deg, p.translation_mm)
            found, qc = register(nib.Nifti1Image(data, affine))
            return {"group": "simulated raw heads", "head": subject.participant_id, "age": p.age, "neck": neck,
                    "pose_scale": pose.scale, "pose_degrees": list(pose.degrees), "pose_shift_mm": list(pose.shift_mm),
                    **judge(found, truth, qc, args.max_error_mm)}
        rows.append(cached(out / "heads" / f"simulated_{index:03d}.json", compute))
    return rows


def real_heads(args, out: Path) -> list[dict]:
    rows = []
    for index, path in enumerate(tqdm(sorted(Path(args.real).glob("*.nii.gz")), desc="real heads", unit="head")):
        name = path.name.split(".")[0]

        def compute(path=path, name=name, index=index):
            image = nib.as_closest_canonical(load_volume(path))
            reference, _ = register(image)  # the unposed scan's registration: the truth up to the pose
            rng = np.random.default_rng([args.seed, 8, index])
            pose = random_pose(rng, args.max_degrees, args.max_shift_mm, 0.0)
            move = pose_matrix(1.0, pose.degrees, pose.shift_mm)
            found, qc = register(nib.Nifti1Image(np.asarray(image.dataobj), move @ image.affine))
            return {"group": f"real raw heads ({Path(args.real).name}), posed", "head": name,
                    "pose_degrees": list(pose.degrees), "pose_shift_mm": list(pose.shift_mm),
                    **judge(found, move @ reference, qc, args.max_error_mm)}
        rows.append(cached(out / "heads" / f"real_{name}.json", compute))
    return rows


def table(results: pd.DataFrame) -> str:
    lines = ["| heads | n | registered correctly | QC passed | QC agrees with the truth | landmark error mm, "
             "median (max of the correct) |", "|---|---|---|---|---|---|"]
    for group, part in results.groupby("group", sort=False):
        agree = part.correct == part.qc_passed
        correct = part[part.correct]
        lines.append(f"| {group} | {len(part)} | {int(part.correct.sum())} | {int(part.qc_passed.sum())} | "
                     f"{int(agree.sum())} | {part.landmark_error_mm.median():.1f} "
                     f"({correct.landmark_error_mm.max() if len(correct) else float('nan'):.1f}) |")
    wrong = results[~results.correct]
    if len(wrong):
        lines += ["", "Registered wrongly:", ""]
        lines += [f"- {r.group}, {r.head}: landmark error {r.landmark_error_mm:.1f} mm, volume x{r.volume_ratio:.2f}, "
                  f"QC {'passed' if r.qc_passed else 'failed'} (r {r.template_correlation:.2f}, "
                  f"misalignment {r.misalignment_mm:.1f} mm)" for r in wrong.itertuples()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/registration_robustness")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--real", default=None, help="folder of real raw T1 heads (*.nii.gz)")
    parser.add_argument("--max_degrees", type=float, default=30.0)
    parser.add_argument("--max_shift_mm", type=float, default=40.0)
    parser.add_argument("--max_scale", type=float, default=0.15)
    parser.add_argument("--max_error_mm", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args()
    out = Path(args.out)
    use_itk_threads()
    rows = simulated_heads(args, out) + (real_heads(args, out) if args.real else [])
    results = pd.DataFrame(rows)
    results.to_csv(out / "registration_robustness.csv", index=False)
    text = table(results)
    (out / "registration_robustness.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
