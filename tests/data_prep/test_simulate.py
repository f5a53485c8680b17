"""The simulated ageing cohort: determinism, file layout, and effects measured back from the images.

One 4 mm cohort of 60 subjects (30 % AD) is simulated once for the module. Effects are measured from
the written images the way an analysis of real scans would (tissue classes by 1D k-means on each
image's brain voxels), never read from the simulator's parameters. Designed sizes (effects.py) and what
this cohort measured when the thresholds were chosen are noted at each assertion.
"""
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold, cross_val_predict

from brainage_core.datalist import SPLITS, read_datalist
from brainage_core.grid import canonical_grid
from brainage_core.volumes import InputError
from data_prep.__main__ import main
from data_prep.anatomy import template_anatomy
from data_prep.effects import MAX_VENTRICLE_EXPANSION_MM, ventricle_pullback
from data_prep.simulate import CohortConfig, HeadPose, render_raw, simulate_cohort, simulate_subjects

RESOLUTION = 4.0
SEED = 3
N = 60
VOXEL_ML = RESOLUTION**3 / 1000


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    datalist = simulate_cohort(n=N, out=str(out), resolution=RESOLUTION, seed=SEED, ad_fraction=0.3,
                               raw_variants=1, progress=False)
    table = pd.read_csv(out / "participants.tsv", sep="\t")
    images = np.stack([nib.load(out / _t1(p)).get_fdata(dtype=np.float32) for p in table.participant_id])
    return {"out": out, "datalist": datalist, "table": table, "images": images}


@pytest.fixture(scope="module")
def measures(cohort):
    return measure_cohort(cohort["table"], cohort["images"])


def measure_cohort(table, images):
    """participants.tsv plus volumes measured from each image: ventricles (dark voxels in the ventricle
    region), grey-matter fraction of the brain mask, medial temporal grey matter."""
    anatomy = template_anatomy(RESOLUTION)
    rows = []
    for image in images:
        csf_gm, gm_wm, _ = tissue_thresholds(image[image > 0])
        rows.append({
            "ventricles_ml": ((image > 0) & (image < csf_gm) & (anatomy.ventricle_region > 0)).sum() * VOXEL_ML,
            "gm_fraction": ((image >= csf_gm) & (image < gm_wm)).sum() / (image > 0).sum(),
            "mtl_gm_ml": medial_temporal_grey_matter(image, anatomy, csf_gm) * VOXEL_ML,
        })
    return pd.concat([table, pd.DataFrame(rows)], axis=1)


def _t1(participant_id):
    return f"{participant_id}/anat/{participant_id}_T1w.nii.gz"


def tissue_thresholds(brain_values, iterations=30):
    """CSF/GM and GM/WM thresholds: midpoints of a three-class 1D k-means; also the class means."""
    centres = np.array([0.3, 0.65, 0.95])
    for _ in range(iterations):
        label = np.argmin(np.abs(brain_values[:, None] - centres), axis=1)
        centres = np.array([brain_values[label == k].mean() for k in range(3)])
    return (centres[0] + centres[1]) / 2, (centres[1] + centres[2]) / 2, centres


def medial_temporal_grey_matter(image, anatomy, csf_gm):
    """Voxels of grey matter or brighter inside the medial temporal ellipsoids (the region is grey
    matter; atrophy there turns it to CSF)."""
    return ((image >= csf_gm) & (anatomy.medial_temporal > 0.5)).sum()


def cn(measures):
    return measures[measures.diagnosis == "CN"]


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_files_through_the_command_line(cohort, tmp_path):
    # a subject depends only on the seed and its index, so a 3-subject run repeats the first 3
    code = main(["simulate-cohort", "--n", "3", "--out", str(tmp_path), "--resolution", "4", "--seed", str(SEED),
                 "--ad-fraction", "0.3", "--progress", "False"])
    assert code == 0
    again = pd.read_csv(tmp_path / "participants.tsv", sep="\t")
    pd.testing.assert_frame_equal(again, cohort["table"].iloc[:3])
    for pid in again.participant_id:
        assert (tmp_path / _t1(pid)).read_bytes() == (cohort["out"] / _t1(pid)).read_bytes()
    truth = "derivatives/ground_truth/ad_effect.nii.gz"
    assert (tmp_path / truth).read_bytes() == (cohort["out"] / truth).read_bytes()


def test_different_seed_gives_different_subjects(cohort, tmp_path):
    simulate_cohort(n=3, out=str(tmp_path), resolution=RESOLUTION, seed=SEED + 1, ad_fraction=0.3, progress=False)
    other = pd.read_csv(tmp_path / "participants.tsv", sep="\t")
    assert not np.allclose(other.age, cohort["table"].age[:3])
    first, same_index = nib.load(tmp_path / _t1("sub-0001")).get_fdata(), cohort["images"][0]
    brain = (first > 0) | (same_index > 0)
    assert np.abs(first - same_index)[brain].mean() > 0.08  # measured 0.15


# ------------------------------------------------------------------------------------- layout


def test_images_are_skull_stripped_normalised_on_the_canonical_grid(cohort):
    grid = canonical_grid(RESOLUTION)
    img = nib.load(cohort["out"] / _t1("sub-0001"))
    np.testing.assert_allclose(img.affine, grid.affine)
    assert img.header.get_sform(coded=True)[1] == 1 and img.shape == grid.shape
    images = cohort["images"]
    brain = images > 0
    # 99th percentile inside the brain is 1 by construction; the background is exactly zero
    p99 = [np.percentile(image[mask], 99) for image, mask in zip(images, brain)]
    np.testing.assert_allclose(p99, 1.0, atol=0.01)
    corner = images[:, :4, :4, :4]
    assert np.all(corner == 0)
    # brain-mask volume follows head size (the template mask holds 1.88 litres; linear scale sd ~4 %)
    litres = brain.sum(axis=(1, 2, 3)) * VOXEL_ML / 1000
    assert litres.min() > 1.3 and litres.max() < 2.6 and litres.std() > 0.1


def test_participants_and_datalist_agree(cohort):
    table = cohort["table"].set_index("participant_id")
    assert list(table.columns) == ["age", "sex", "site", "diagnosis"]
    assert table.age.between(20, 90).all() and set(table.sex) <= {"M", "F"}
    assert set(table.diagnosis) == {"CN", "AD"} and table.age[table.diagnosis == "AD"].min() >= 55
    splits = read_datalist(cohort["datalist"])
    assert all(len(splits[name]) > 0 for name in SPLITS)
    records = [rec for name in SPLITS for rec in splits[name]]
    assert sorted(rec["subject"] for rec in records) == sorted(table.index)
    for rec in records:
        row = table.loc[rec["subject"]]
        assert rec["age"] == pytest.approx(row.age) and rec["sex"] == row.sex and rec["site"] == row.site
        assert rec["label"] == (row.diagnosis == "AD") and rec["image"].endswith(_t1(rec["subject"]))
    description = json.loads((cohort["out"] / "dataset_description.json").read_text())
    assert description["SimulationConfig"]["seed"] == SEED


# --------------------------------------------------------------------------------- measured effects


def test_ventricles_grow_with_age(measures):
    normal = cn(measures)
    r = stats.pearsonr(normal.age, normal.ventricles_ml)[0]
    # designed: ~10 ml at 20, ~29 ml at 70, ~45 ml at 90 for a typical subject, each with its own size.
    # Measured (dark voxels in the ventricle region) on 60-subject 4 mm cohorts: r 0.75 (seed 3, this
    # cohort), 0.54 and 0.66 (seeds 5, 7); old/young 2.55, 1.72, 2.24
    assert r > 0.5
    old, young = normal[normal.age >= 70].ventricles_ml.mean(), normal[normal.age < 40].ventricles_ml.mean()
    assert old > 1.3 * young


def test_grey_matter_fraction_falls_with_age(measures):
    normal = cn(measures)
    r = stats.pearsonr(normal.age, normal.gm_fraction)[0]
    # designed: 22 % of grey matter lost by 90 for a typical subject, plus GM/WM contrast loss.
    # Measured r -0.83 (seed 3, this cohort), -0.73 and -0.64 (seeds 5, 7)
    assert r < -0.45


def test_alzheimer_subjects_have_less_medial_temporal_grey_matter_than_age_matched_normals(measures):
    old = measures[measures.age >= 55]
    normal = cn(old)
    fit = np.polyfit(normal.age, normal.mtl_gm_ml, 1)
    residual = old.mtl_gm_ml - np.polyval(fit, old.age)
    ad, spread = residual[old.diagnosis == "AD"], residual[old.diagnosis == "CN"].std()
    # designed: AD removes 25-50 % of medial temporal GM. Measured AD mean residual -4.0 CN sd (seed 3,
    # 16 AD), -2.3 and -2.4 (seeds 5, 7)
    assert len(ad) >= 8 and ad.mean() < -1.0 * spread
    assert stats.mannwhitneyu(ad, residual[old.diagnosis == "CN"], alternative="less").pvalue < 0.01


def test_ridge_baselines_beat_the_constant_predictor_but_are_not_perfect(cohort, measures):
    ages = cohort["table"].age.to_numpy()
    folds = KFold(5, shuffle=True, random_state=0)
    volumes = measures[["ventricles_ml", "gm_fraction"]].to_numpy()
    volumes = (volumes - volumes.mean(axis=0)) / volumes.std(axis=0)
    images = cohort["images"]
    half = images.shape[1] // 2
    voxels = images.reshape(len(images), half, 2, half, 2, half, 2).mean(axis=(2, 4, 6)).reshape(len(images), -1)
    volume_mae, voxel_mae = (np.abs(cross_val_predict(Ridge(alpha=1.0), x, ages, cv=folds) - ages).mean()
                             for x in (volumes, voxels))
    constant_mae = np.mean([np.abs(ages[test] - ages[train].mean()).mean() for train, test in folds.split(ages)])
    print(f"\n5-fold CV MAE, {N} subjects: ridge on measured volumes {volume_mae:.2f} y, on 8 mm voxels "
          f"{voxel_mae:.2f} y, constant {constant_mae:.2f} y")
    # Measured (volumes / voxels / constant): 8.7 / 11.2 / 16.8 (seed 3). Voxel ridge needs more than 60
    # subjects (benchmarks/bench_simulate.py at n = 400). A brain-age offset of sd 5 y keeps any model
    # above ~4 y.
    assert volume_mae < 0.75 * constant_mae and voxel_mae < 0.9 * constant_mae
    assert min(volume_mae, voxel_mae) > 3.0


# -------------------------------------------------------------------------------------- ground truth


def test_ground_truth_maps_mark_where_the_effects_act(cohort):
    truth = cohort["out"] / "derivatives" / "ground_truth"
    anatomy = template_anatomy(RESOLUTION)
    ageing = nib.load(truth / "ageing_effect.nii.gz")
    ad = nib.load(truth / "ad_effect.nii.gz").get_fdata()
    np.testing.assert_allclose(ageing.affine, canonical_grid(RESOLUTION).affine)
    ageing = ageing.get_fdata()
    brain = anatomy.brain > 0.5
    deep_wm = (anatomy.wm > 0.95) & (anatomy.periventricular < 0.05)
    assert ageing[(anatomy.ventricle_region > 0) & brain].mean() > 2 * ageing[deep_wm].mean()
    mtl = anatomy.medial_temporal > 0.5
    assert ad[mtl].mean() > 5 * ad[brain & ~mtl & (anatomy.ventricle_region == 0)].mean()


def test_ventricle_expansion_does_not_fold_space():
    anatomy = template_anatomy(RESOLUTION)
    grid = anatomy.grid
    world = grid.world_coordinates().reshape(3, -1)
    moved = (world + ventricle_pullback(anatomy, world, MAX_VENTRICLE_EXPANSION_MM)).reshape(3, *grid.shape)
    jacobian = np.stack([np.stack(np.gradient(c, grid.resolution)) for c in moved])
    determinant = np.linalg.det(np.moveaxis(jacobian, (0, 1), (-2, -1)))
    assert determinant.min() > 0
    assert determinant.max() > 1.5  # and it does enlarge space (around the ventricles)


def test_raw_variant_is_in_native_scanner_space(cohort):
    raw = nib.load(cohort["out"] / "raw" / _t1("sub-0001"))
    data = raw.get_fdata()
    assert nib.aff2axcodes(raw.affine) == ("P", "S", "R")
    np.testing.assert_allclose(raw.header.get_zooms(), np.array([1.2, 1.0, 1.0]) * RESOLUTION)
    assert raw.get_data_dtype() == np.int16
    # scanner units, Rician noise in the background (no skull stripping), and a head in the middle
    assert np.percentile(data, 99) > 100 and np.median(data[:3, :3, :3]) > 0
    centre = tuple(s // 2 for s in data.shape)
    assert data[centre] > 5 * np.median(data[:3, :3, :3])
    assert list(pd.read_csv(cohort["out"] / "raw" / "participants.tsv", sep="\t").participant_id) == ["sub-0001"]


def test_raw_head_has_skull_scalp_and_a_neck_in_a_lowered_field_of_view():
    """``render_raw(head=True)``: around the brain a dark skull and a bright scalp, below it a neck when the
    field of view goes down; without ``head`` nothing but noise outside the brain."""
    anatomy = template_anatomy(RESOLUTION)
    subject = next(simulate_subjects(CohortConfig(n=3, resolution=RESOLUTION, seed=SEED).check(), anatomy))
    pose = HeadPose(1.0, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    def rendered(head, shift):
        data, affine = render_raw(anatomy, subject, np.random.default_rng(0), pose, shift, head=head)
        image = nib.as_closest_canonical(nib.Nifti1Image(data.astype(np.float32), affine))
        return image.get_fdata(dtype=np.float32), image.affine
    bare, _ = rendered(False, (0.0, 0.0, 0.0))
    head, affine = rendered(True, (0.0, 0.0, 0.0))
    low, low_affine = rendered(True, (0.0, 0.0, -40.0))
    # up a vertical line through the top of the head (x = 0, y = -17 mm): brain, a dark skull, a bright scalp, air
    i, j, _ = (np.linalg.inv(affine) @ [0.0, -17.0, 0.0, 1.0])[:3].round().astype(int)
    line = head[i, j, :] / head.max()
    scalp = np.nonzero(line > 0.6)[0].max()
    assert line[scalp + 3:].max() < 0.2  # air above
    below = line[scalp - 6:scalp]
    assert below.min() < 0.3 and (line[: scalp - 6] > 0.6).any()  # skull between scalp and brain
    assert (bare[i, j, :] / bare.max())[scalp - 3:].max() < 0.2  # no head without head=True
    # a field of view lowered by 40 mm reaches 120 mm below the centre, and shows the neck there
    z_low = int((np.linalg.inv(low_affine) @ [0.0, -20.0, -120.0, 1.0])[2].round())
    assert z_low >= 0 and np.mean(low[:, :, z_low] > 0.3 * low.max()) > 0.05


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 2}, "n must be an integer >= 3"),
    ({"ad_fraction": 1.5}, "ad_fraction"),
    ({"age_min": 60, "age_max": 40}, "age_min < age_max"),
    ({"ad_fraction": 0.2, "age_max": 50}, "AD subjects"),
    ({"age_distribution": "bimodal"}, "age_distribution"),
    ({"raw_variants": 9}, "raw_variants"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        simulate_cohort(**{"n": 4, "out": str(tmp_path), "resolution": RESOLUTION, **kwargs})


def test_a_folder_holding_other_data_is_not_overwritten(tmp_path):
    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(InputError, match="not empty"):
        simulate_cohort(n=3, out=str(tmp_path), resolution=RESOLUTION)
    assert (tmp_path / "precious.txt").read_text() == "keep"
