"""TGB-GAN synthesis and region maps on toys whose answers are known: a linear "generator" (average-pool
encoder, nearest-upsampling decoder), planted age effects and hand-made age bins."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged
from torch import nn

from brainage_core.datalist import read_datalist, write_datalist
from brainage_core.grid import canonical_grid
from brainage_core.volumes import save_nifti
from custom_components.tgb_gan.region_maps import map_auc, write_region_maps
from custom_components.tgb_gan.synthesis import (
    LatentSet,
    age_bins,
    bin_top_up_plan,
    encode_dataset,
    fit_age_direction,
    synthesise,
    traversal_plan,
)

SIZE, FACTOR = 16, 4
AFFINE = canonical_grid(12.0).affine  # a real 16^3 RAS grid
# Integer bins (target 4): 30 -> 3 codes (1 new), 31 -> 1 code (none), 40 -> 2 codes (2 new), 41 -> 5 (none).
AGES = [29.6, 30.2, 30.4, 31.0, 39.9, 40.3, 41.0, 41.1, 40.7, 41.2, 41.4]


class LinearToyGenerator(nn.Module):
    """encode: 4x average pooling; decode: 4x nearest upsampling. Decoding is linear in the code."""

    def encode(self, x):
        return F.avg_pool3d(x, FACTOR)

    def decode(self, z):
        return F.interpolate(z, scale_factor=FACTOR, mode="nearest")


def toy_latents(ages, seed=0) -> LatentSet:
    codes = torch.as_tensor(np.random.default_rng(seed).random((len(ages), 1, 4, 4, 4)), dtype=torch.float32)
    records = [{"image": f"img{i}.nii.gz", "age": a, "subject": f"s{i}"} for i, a in enumerate(ages)]
    return LatentSet(codes, np.asarray(ages, float), records, AFFINE)


def test_age_bins_round_half_up():
    assert age_bins([20.5, 20.49, 21.5, 89.99]).tolist() == [21, 20, 22, 90]


def test_bin_top_up_is_seeded():
    a = bin_top_up_plan(AGES, 4, np.random.default_rng(7))
    b = bin_top_up_plan(AGES, 4, np.random.default_rng(7))
    c = bin_top_up_plan(AGES, 4, np.random.default_rng(8))
    for name in ("first", "second", "weight", "age"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.weight, c.weight)


def test_bin_top_up_fills_bins_with_two_or_more_codes_only():
    ages = np.asarray(AGES)
    plan = bin_top_up_plan(ages, 4, np.random.default_rng(0))
    bins = age_bins(ages)
    made = {b: int((bins[plan.first] == b).sum()) for b in (30, 31, 40, 41)}
    assert made == {30: 1, 31: 0, 40: 2, 41: 0}
    # pairs are two distinct members of one bin; the age is the same convex combination as the code
    assert np.all(plan.first != plan.second)
    np.testing.assert_array_equal(bins[plan.first], bins[plan.second])
    assert np.all((plan.weight >= 0) & (plan.weight <= 1))
    np.testing.assert_allclose(plan.age, plan.weight * ages[plan.first] + (1 - plan.weight) * ages[plan.second])
    low, high = np.minimum(ages[plan.first], ages[plan.second]), np.maximum(ages[plan.first], ages[plan.second])
    assert np.all((plan.age >= low) & (plan.age <= high))


def test_bin_top_up_cap_and_age_range():
    full = bin_top_up_plan(AGES, 6, np.random.default_rng(3))
    assert len(full.age) == 3 + 4 + 1  # bins 30, 40 (n=2) and 41 (n=5); bin 31 holds one code
    capped = bin_top_up_plan(AGES, 6, np.random.default_rng(3), max_synthetic=5)
    assert len(capped.age) == 5
    assert set(zip(capped.first, capped.second, capped.weight)) <= set(zip(full.first, full.second, full.weight))
    ranged = bin_top_up_plan(AGES, 6, np.random.default_rng(3), age_range=[35, 40])
    assert age_bins(np.asarray(AGES)[ranged.first]).tolist() == [40] * 4
    assert len(bin_top_up_plan(AGES, 6, np.random.default_rng(3), age_range=[50, 60]).age) == 0
    with pytest.raises(ValueError, match="no finite 'age'"):
        bin_top_up_plan([30.0, float("nan")], 4, np.random.default_rng(0))


def test_traversal_moves_codes_along_the_age_direction():
    """Codes = noise + age * v: moving a code to an older target raises its true linear age readout."""
    rng = np.random.default_rng(0)
    n = 200
    ages = rng.uniform(20, 90, n)
    v = rng.normal(size=(1, 4, 4, 4))
    codes = 0.05 * rng.normal(size=(n, 1, 4, 4, 4)) + ages[:, None, None, None, None] * v / 50
    latents = LatentSet(torch.as_tensor(codes, dtype=torch.float32), ages, [{"image": "x"}] * n, AFFINE)
    direction = fit_age_direction(latents.flat(), ages, ridge_alpha=1e-3)
    assert np.corrcoef(direction.predict(latents.flat()), ages)[0, 1] > 0.99

    plan = traversal_plan(latents, [30.0, 70.0], np.random.default_rng(1), n_subjects=5, ridge_alpha=1e-3)
    assert len(plan.age) == 10 and sorted(set(plan.age)) == [30.0, 70.0]
    assert len(set(plan.source)) == 5
    new = plan.codes(latents, slice(None)).flatten(1).double().numpy()
    readout = new @ v.ravel() / (v.ravel() @ v.ravel()) * 50  # the true age of a code, independent of the fit
    young, old = readout[plan.age == 30.0], readout[plan.age == 70.0]
    assert np.all(old - young > 20)  # 40 years apart by the fit; the fit also follows the noise a little
    np.testing.assert_allclose(direction.predict(new), direction.predict(latents.flat()[plan.source]) + plan.shift,
                               atol=1e-3)
    ranged = traversal_plan(latents, [10.0, 30.0, 70.0], np.random.default_rng(1), age_range=[20, 50])
    assert set(ranged.age) == {30.0}
    assert len(ranged.age) == n


@pytest.fixture
def toy_dataset(tmp_path):
    """A datalist of real 16^3 NIfTI volumes with the ages of AGES, plus validation and test splits."""
    rng = np.random.default_rng(0)
    records = []
    for i, age in enumerate(AGES):
        path = save_nifti(rng.random((SIZE,) * 3) + age / 100, AFFINE, tmp_path / "data" / f"sub-{i:02d}.nii.gz")
        records.append({"image": str(path), "age": age, "sex": "F", "site": "a", "subject": f"sub-{i:02d}"})
    val = [{**records[0], "subject": "val-0"}]
    test = [{**records[1], "subject": "test-0"}]
    return write_datalist(tmp_path / "data" / "datalist.json", {"training": records, "validation": val, "test": test})


LOAD = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), EnsureTyped("image")])


def test_synthesise_writes_seeded_nifti_and_merged_datalist(toy_dataset, tmp_path):
    generator = LinearToyGenerator()
    latents = encode_dataset(generator, read_datalist(toy_dataset)["training"], LOAD, batch_size=4, progress=False)
    assert latents.codes.shape == (len(AGES), 1, 4, 4, 4)
    np.testing.assert_allclose(latents.affine, AFFINE, atol=1e-5)

    out = synthesise(generator, latents, str(toy_dataset), str(tmp_path / "run1"), target_per_bin=4, seed=5,
                     batch_size=2, progress=False)
    datalist = json.loads(out.read_text())
    splits = read_datalist(out)
    real = [r for r in splits["training"] if not r["synthetic"]]
    synthetic = [r for r in splits["training"] if r["synthetic"]]
    assert len(real) == len(AGES) and len(synthetic) == 3 == datalist["n_synthetic"]
    assert [r["age"] for r in real] == AGES
    assert {tuple(sorted(r)) for r in splits["training"]} == {("age", "image", "subject", "synthetic")}
    original = read_datalist(toy_dataset)
    assert splits["validation"] == original["validation"] and splits["test"] == original["test"]
    assert datalist["synthesis"]["seed"] == 5 and datalist["synthesis"]["target_per_bin"] == 4

    by_subject = {r["subject"]: r for r in real}
    for record in synthetic:
        img = nib.load(record["image"])
        np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
        source = datalist["provenance"][record["subject"]]
        a, b = (by_subject[s] for s in source["sources"])
        w = source["weight"]
        assert age_bins([record["age"]])[0] == age_bins([a["age"]])[0] == age_bins([b["age"]])[0]
        assert record["age"] == pytest.approx(w * a["age"] + (1 - w) * b["age"])
        # the linear toy decoder makes the synthetic volume the same mix of the decoded sources
        decode = [generator.decode(generator.encode(torch.as_tensor(nib.load(r["image"]).get_fdata(),
                                                                    dtype=torch.float32)[None, None]))[0, 0].numpy()
                  for r in (a, b)]
        np.testing.assert_allclose(img.get_fdata(), w * decode[0] + (1 - w) * decode[1], atol=1e-5)

    again = synthesise(generator, latents, str(toy_dataset), str(tmp_path / "run2"), target_per_bin=4, seed=5,
                       batch_size=3, progress=False)
    assert json.loads(again.read_text())["provenance"] == datalist["provenance"]


def test_map_auc_scores_a_planted_map():
    rng = np.random.default_rng(0)
    truth = np.zeros((SIZE,) * 3)
    truth[4:9, 4:9, 4:9] = 1.0
    planted = truth * 0.5 + 0.1 * rng.normal(size=truth.shape)
    assert map_auc(planted, truth) > 0.95
    assert map_auc(rng.normal(size=truth.shape), truth) == pytest.approx(0.5, abs=0.1)
    with pytest.raises(ValueError, match="all or none"):
        map_auc(planted, np.zeros_like(truth))


def test_region_maps_find_the_planted_ageing_region(tmp_path):
    """Codes whose value grows with age in one 2^3 corner: both latent maps light up that corner's decoded
    voxels; real images that darken there with age make the real-image baseline find it too."""
    rng = np.random.default_rng(0)
    ages = np.linspace(20, 90, 24)
    codes = 0.5 + 0.02 * rng.normal(size=(24, 1, 4, 4, 4))
    codes[:, :, :2, :2, :2] -= (ages / 200)[:, None, None, None, None]
    truth = np.zeros((SIZE,) * 3, dtype=np.float32)
    truth[:8, :8, :8] = 1.0
    records = [{"image": str(save_nifti((0.5 - truth * age / 200 + 0.02 * rng.normal(size=truth.shape)).astype(np.float32),
                                        AFFINE, tmp_path / "real" / f"s{i}.nii.gz"))} for i, age in enumerate(ages)]
    latents = LatentSet(torch.as_tensor(codes, dtype=torch.float32), ages, records, AFFINE)
    truth_path = save_nifti(truth, AFFINE, tmp_path / "ageing_effect.nii.gz")

    summary = write_region_maps(LinearToyGenerator(), latents, str(tmp_path / "out"), ground_truth=str(truth_path),
                                truth_transform=LOAD, ridge_alpha=0.1)
    assert summary["auc_group_means"] > 0.95 and summary["auc_traversal"] > 0.95
    assert summary["auc_real_group_means"] > 0.95
    assert summary["old_age"] > summary["young_age"]
    maps = tmp_path / "out" / "region_maps"
    effect = nib.load(maps / "age_map_group_means.nii.gz")
    np.testing.assert_allclose(effect.affine, AFFINE, atol=1e-5)
    assert effect.get_fdata()[:8, :8, :8].mean() < 0  # the planted region darkens with age
    assert (maps / "age_map_traversal.png").stat().st_size > 0
    assert json.loads((maps / "region_maps.json").read_text())["auc_traversal"] == summary["auc_traversal"]

    unscored = write_region_maps(LinearToyGenerator(), latents, str(tmp_path / "out2"),
                                 ground_truth=str(tmp_path / "missing.nii.gz"))
    assert unscored["auc_group_means"] is None and "no ground-truth map" in unscored["note"]
