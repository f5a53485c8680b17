import csv
import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from custom_components.common.brain_age import BiasCorrection
from custom_components.slice_cnn import handlers
from custom_components.slice_cnn.handlers import BrainAgeReport


def _engine(ages, predict, batch_size=4):
    batches = [
        [{"subject": f"s{i + j}", "age": a} for j, a in enumerate(ages[i:i + batch_size])]
        for i in range(0, len(ages), batch_size)
    ]
    engine = Engine(lambda e, batch: [{"pred": torch.tensor([predict(item["age"])])} for item in batch])
    return engine, batches


def test_report_writes_csv_metrics_plots_and_fits_bias(tmp_path):
    ages = list(np.linspace(20, 90, 10))
    engine, batches = _engine(ages, lambda a: 0.5 * a + 27.5)  # regression to the mean age 55
    bc = BiasCorrection()
    BrainAgeReport(tmp_path, bias_correction=bc, fit_bias_correction=True, prefix="val_").attach(engine)
    engine.run(batches)

    assert float(bc.slope) == pytest.approx(-0.5) and float(bc.intercept) == pytest.approx(27.5)
    rows = list(csv.DictReader(open(tmp_path / "val_predictions.csv")))
    assert [r["subject"] for r in rows] == [f"s{i}" for i in range(10)]
    assert float(rows[0]["predicted_age"]) == pytest.approx(37.5, abs=1e-3)
    assert float(rows[0]["brain_age_gap"]) == pytest.approx(17.5, abs=1e-3)
    assert max(abs(float(r["corrected_gap"])) for r in rows) < 1e-3
    metrics = json.loads((tmp_path / "val_metrics.json").read_text())
    assert metrics["mae"] == pytest.approx(np.mean(np.abs(0.5 * np.array(ages) + 27.5 - ages)))
    assert engine.state.metrics["val_pearson_r"] == pytest.approx(1.0)
    for name in ("val_scatter.png", "val_gap_vs_age.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_report_without_ages_keeps_predictions_and_stored_correction(tmp_path):
    bc = BiasCorrection().fit([30.0, 70.0], [20.0, 80.0])
    engine, batches = _engine([None, None, 50.0], lambda a: 42.0)
    BrainAgeReport(tmp_path, bias_correction=bc).attach(engine)
    engine.run(batches)
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert [r["predicted_age"] for r in rows] == ["42.000"] * 3
    assert rows[0]["brain_age_gap"] == "" and rows[2]["brain_age_gap"] == "-8.000"
    assert float(rows[2]["corrected_gap"]) == pytest.approx(-8.0 - (float(bc.slope) * 50 + float(bc.intercept)), abs=1e-3)
    assert not (tmp_path / "scatter.png").exists()  # a single known age: nothing to plot


def test_plots_are_drawn_every_plot_interval_and_after_the_last_epoch(tmp_path, monkeypatch):
    """Tables every epoch, figures on the interval (and the learning curve after the last epoch too)."""
    drawn = []
    monkeypatch.setattr(handlers, "plot_learning_curve", lambda rows, path: drawn.append(("curve", len(rows))))
    monkeypatch.setattr(handlers, "plot_predicted_vs_true", lambda *args: drawn.append(("scatter", None)))
    trainer = Engine(lambda engine, batch: [{"loss": torch.tensor(1.0)}])
    handlers.LearningCurve(tmp_path, plot_interval=2).attach(trainer)
    trainer.run([0, 1], max_epochs=5)
    assert drawn == [("curve", 2), ("curve", 4), ("curve", 5)]
    assert len(list(csv.DictReader(open(tmp_path / "learning_curve.csv")))) == 5

    drawn.clear()
    evaluator, batches = _engine(list(np.linspace(20, 90, 8)), lambda a: a)
    report = BrainAgeReport(tmp_path, prefix="val_", plot_interval=3)
    report.attach(evaluator)
    for _ in range(6):
        evaluator.run(batches)
    assert drawn == [("scatter", None)] * 2
    with pytest.raises(ValueError, match="plot_interval"):
        handlers.LearningCurve(tmp_path, plot_interval=0)
