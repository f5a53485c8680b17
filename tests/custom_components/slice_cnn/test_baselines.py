import nibabel as nib
import numpy as np

from custom_components.slice_cnn.baselines import ad_baseline, age_baselines, region_mean_auc


def _records(folder, name, ages, offset=0.0, seed=0):
    """Tiny 4^3 volumes whose first 2^3 block brightens with age (plus noise); ``offset`` shifts every
    voxel, as another scanner's intensity would."""
    rng = np.random.default_rng(seed)
    records = []
    for i, age in enumerate(ages):
        image = rng.normal(0.0, 0.05, (4, 4, 4)) + offset
        image[:2, :2, :2] += age / 50.0
        path = folder / f"{name}{i}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), path)
        records.append({"image": str(path), "age": float(age), "label": int(age > 55)})
    return records


def test_ridge_beats_the_constant_and_is_scored_on_other_cohorts(tmp_path):
    ages = np.linspace(20, 90, 60)
    train, val, test = (_records(tmp_path, f"{split}_", ages, seed=k) for k, split in enumerate(("tr", "va", "te")))
    shifted = _records(tmp_path, "shifted_", ages, offset=0.2, seed=4)
    result = age_baselines(train, val, test, elsewhere={"shifted": shifted})

    assert result["n_train"] == 60 and result["n_test"] == 60
    assert result["ridge_mae"] < 0.2 * result["constant_mae"]
    assert result["ridge_r"] > 0.95
    other = result["ridge_shifted"]
    assert other["n"] == 60 and other["pearson_r"] > 0.95
    # the brighter scanner reads as older: the shift moves the mean gap, not the ranking
    assert other["mean_gap"] > 2.0 and other["mae"] > result["ridge_mae"]


def test_logistic_baseline_detects_a_separable_label(tmp_path):
    ages = np.linspace(20, 90, 40)
    train, val, test = (_records(tmp_path, f"{split}_", ages, seed=k) for k, split in enumerate(("tr", "va", "te")))
    detection = ad_baseline(train, val, test)
    assert detection["logistic_auc"] > 0.95
    assert detection["logistic_auc_ci95_low"] <= detection["logistic_auc"] <= detection["logistic_auc_ci95_high"]
    assert detection["n_test"] == 40
    # the label is age > 55 here, so age alone separates it perfectly
    assert detection["age_auc"] == 1.0


def test_age_alone_scores_chance_when_ad_and_cn_are_age_matched(tmp_path):
    ages = np.linspace(20, 90, 40)
    train, val, test = (_records(tmp_path, f"{split}_", ages, seed=k) for k, split in enumerate(("tr", "va", "te")))
    for i, rec in enumerate(test):
        rec["label"] = i % 2  # alternate along the sorted ages: the same age spread in both groups
    detection = ad_baseline(train, val, test)
    assert abs(detection["age_auc"] - 0.5) < 0.05
    assert detection["age_auc_ci95_low"] < 0.5 < detection["age_auc_ci95_high"]


def test_region_mean_scores_atrophy_only_where_it_acts(tmp_path):
    rng = np.random.default_rng(0)
    region = np.zeros((6, 6, 6), bool)
    region[1:3, 1:3, 1:3] = True
    records = []
    for i in range(40):
        image = 1.0 + rng.normal(0.0, 0.05, region.shape)
        if i % 2:
            image[region] -= 0.3  # "AD": the region darkens
        path = tmp_path / f"s{i}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), path)
        records.append({"image": str(path), "label": i % 2})
    inside = region_mean_auc(records, region)
    assert inside["auc"] > 0.99 and inside["auc_ci95_low"] <= inside["auc"] <= inside["auc_ci95_high"]
    elsewhere = np.zeros_like(region)
    elsewhere[4:, 4:, 4:] = True
    # z-scoring lifts the rest of a darkened volume a little, so elsewhere reads as less atrophied
    assert region_mean_auc(records, elsewhere)["auc"] < 0.5
