"""The out-of-distribution check: fitted on a simulated 8 mm cohort, it passes held-out subjects of that
cohort and flags what should never reach the network: a raw IXI head (skull, neck, scanner intensities)
resized onto the grid, a contrast-inverted (T2-like) brain, an un-normalised brain, noise."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.transforms import Compose, LoadImaged, Orientationd, Resized

from brainage_core.volumes import InputError
from custom_components.common.input_reference import FEATURES, InputCheckd, InputReference
from data_prep.simulate import simulate_cohort

RESOLUTION = 8.0
SHAPE = (24, 24, 24)


def _loading(resample: bool = False) -> Compose:
    transforms = [LoadImaged("image", image_only=True, ensure_channel_first=True), Orientationd("image", axcodes="RAS")]
    return Compose(transforms + ([Resized("image", spatial_size=SHAPE, mode="trilinear")] if resample else []))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cohort8mm")
    simulate_cohort(n=40, out=str(out), resolution=RESOLUTION, seed=3, progress=False)
    splits = json.loads((out / "datalist.json").read_text())
    return {split: [{**r, "image": str(out / r["image"])} for r in splits[split]] for split in ("training", "test")}


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> InputReference:
    path = tmp_path_factory.mktemp("models") / "input_reference.pt"
    return InputReference(SHAPE).fit_or_load(cohort["training"], _loading(), path)


def _score(reference: InputReference, volume) -> float:
    return float(reference.score(reference.features(volume)))


def test_held_out_subjects_score_like_training_subjects(reference, cohort):
    held_out = [_score(reference, _loading()({"image": r["image"]})["image"]) for r in cohort["test"]]
    assert max(held_out) < reference.threshold
    assert float(reference.training_scores.max()) < reference.threshold
    # the score is not degenerate: held-out subjects spread like training subjects do
    assert np.std(held_out) > 0.1


def test_volumes_unlike_the_training_data_are_flagged(reference, cohort, ixi_sample):
    brain = _loading()({"image": cohort["test"][0]["image"]})["image"][0].numpy()
    inside = brain > 0
    rng = np.random.default_rng(0)
    bad = {
        "contrast inverted (T2-like)": np.where(inside, np.clip(1.2 - brain, 0.0, None), 0.0),
        "not normalised (scanner units)": brain * 800.0,
        "noise": rng.uniform(0.0, 1.0, SHAPE),
        "noise inside the brain": np.where(inside, rng.uniform(0.0, 1.0, SHAPE), 0.0),
    }
    for path in sorted(ixi_sample.glob("*.nii.gz")):
        bad[f"raw head {path.name}"] = _loading(resample=True)({"image": str(path)})["image"]
    scores = {name: _score(reference, volume) for name, volume in bad.items()}
    assert all(score > reference.threshold for score in scores.values()), scores


def test_a_written_reference_loads_into_a_fresh_one_and_scores_alike(reference, cohort, tmp_path):
    path = tmp_path / "input_reference.pt"
    torch.save(reference.state_dict(), path)
    assert set(torch.load(path, weights_only=True)) >= {"mean_image", "median", "spread", "training_scores"}
    loaded = InputReference(SHAPE).load(path)
    volume = _loading()({"image": cohort["test"][1]["image"]})["image"]
    assert _score(loaded, volume) == pytest.approx(_score(reference, volume))
    with pytest.raises(InputError, match="another grid"):
        InputReference((48, 48, 48)).load(path)


def test_the_transform_puts_score_and_measures_in_the_batch_item(reference, cohort):
    item = InputCheckd("image", reference)(_loading()({"image": cohort["test"][2]["image"]}))
    check = item["input_check"]
    assert check.shape == (1 + len(FEATURES),)
    assert float(check[0]) == pytest.approx(_score(reference, item["image"]), rel=1e-5)
    unfitted = InputCheckd("image", InputReference(SHAPE))(dict(item))
    assert torch.isnan(unfitted["input_check"]).all()


def test_fitting_refuses_no_volumes_and_volumes_of_another_shape():
    with pytest.raises(InputError, match="no training volumes"):
        InputReference(SHAPE).fit(lambda: iter(()))
    with pytest.raises(InputError, match="expected"):
        InputReference(SHAPE).fit(lambda: iter([np.zeros((8, 8, 8))]))


def test_a_large_training_set_is_read_through_an_even_subset(cohort, tmp_path):
    read = []

    def loading(record):
        read.append(record["image"])
        return _loading()(record)

    InputReference(SHAPE).fit_or_load(cohort["training"], loading, tmp_path / "reference.pt", max_volumes=5)
    subset = cohort["training"][::6]  # 28 records, every 6th: 5
    assert len(subset) == 5 and read == [r["image"] for r in subset] * 2
