import numpy as np
import pytest
import torch

from custom_components.common.brain_age import BiasCorrection, age_statistics, brain_age_metrics


def test_age_statistics_mean_and_population_sd():
    records = [{"age": "20"}, {"age": 40.0}, {"age": 60}, {"age": 80.5, "label": 1}]
    ages = [20.0, 40.0, 60.0, 80.5]
    mean, sd = age_statistics(records)
    assert mean == sum(ages) / 4 and sd == float(np.std(ages)) and sd == pytest.approx(np.sqrt(np.mean((np.array(ages) - mean) ** 2)))
    assert age_statistics(records[3:], "label") == (1.0, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        age_statistics([])


def test_metrics_on_known_values():
    age = np.array([20.0, 40.0, 60.0, 80.0])
    pred = age + np.array([2.0, -2.0, 2.0, -2.0])
    m = brain_age_metrics(pred, age)
    assert m["mae"] == pytest.approx(2.0) and m["rmse"] == pytest.approx(2.0) and m["mean_gap"] == 0
    assert m["r2"] == pytest.approx(1 - 16 / 2000)
    assert m["pearson_r"] == pytest.approx(np.corrcoef(pred, age)[0, 1])


def test_metrics_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="equal"):
        brain_age_metrics([1.0, 2.0], [1.0])


def test_bias_correction_removes_regression_to_the_mean():
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 90, 200)
    pred = 0.6 * age + 0.4 * 55 + rng.normal(0, 3, age.size)  # shrunk towards the mean age 55
    bc = BiasCorrection().fit(pred, age)
    assert float(bc.slope) == pytest.approx(-0.4, abs=0.05)
    corrected = bc.corrected_gap(pred, age)
    assert abs(np.corrcoef(corrected, age)[0, 1]) < 0.05
    assert abs(np.corrcoef(pred - age, age)[0, 1]) > 0.8


def test_bias_correction_travels_in_a_weights_only_checkpoint(tmp_path):
    bc = BiasCorrection().fit([30.0, 50.0, 70.0], [20.0, 50.0, 80.0])
    torch.save({"bias_correction": bc.state_dict()}, tmp_path / "ckpt.pt")
    restored = BiasCorrection()
    restored.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["bias_correction"])
    assert bool(restored.fitted) and float(restored.slope) == pytest.approx(float(bc.slope))
    np.testing.assert_allclose(restored.corrected_gap([40.0], [40.0]), bc.corrected_gap([40.0], [40.0]))


def test_unfitted_correction_returns_raw_gap():
    assert BiasCorrection().corrected_gap([35.0], [30.0]) == pytest.approx([5.0])
    with pytest.raises(ValueError, match="two subjects"):
        BiasCorrection().fit([1.0, 2.0], [30.0, 30.0])
