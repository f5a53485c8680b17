"""Brain-age statistics: the training ages' mean and SD, accuracy metrics and the age-bias correction of
the brain-age gap.

Brain-age models regress towards the training mean, so the gap (predicted - chronological age) trends
with age. The usual correction fits ``gap = slope * age + intercept`` on a validation set and subtracts
that trend from every later gap. :class:`BiasCorrection` keeps the two numbers as buffers, so they travel
inside the checkpoint beside the network's weights (tensors only, loadable with ``weights_only=True``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def age_statistics(records, key: str = "age") -> tuple[float, float]:
    """Mean and population standard deviation (``numpy.std``, ddof=0) of ``float(record[key])`` over the
    records: the regression head's ``init_bias`` and ``output_scale`` in both bundles' train.json."""
    ages = [float(record[key]) for record in records]
    if not ages:
        raise ValueError("age_statistics needs at least one record")
    return sum(ages) / len(ages), float(np.std(ages))


def pearson_r(a, b) -> float:
    """Pearson correlation of two equal-length arrays; NaN when either does not vary."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    return float(np.corrcoef(a, b)[0, 1]) if a.size > 1 and a.std() > 0 and b.std() > 0 else float("nan")


def brain_age_metrics(predicted, age) -> dict[str, float]:
    """MAE, RMSE, Pearson r and R^2 (coefficient of determination) of predicted vs chronological age."""
    predicted, age = np.asarray(predicted, float).ravel(), np.asarray(age, float).ravel()
    if predicted.shape != age.shape or predicted.size == 0:
        raise ValueError(f"need equal, non-empty predicted and age arrays, got {predicted.shape} and {age.shape}")
    err = predicted - age
    ss_tot = float(((age - age.mean()) ** 2).sum())
    return {
        "n": int(age.size),
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "pearson_r": pearson_r(predicted, age),
        "r2": 1.0 - float((err**2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
        "mean_gap": float(err.mean()),
    }


class BiasCorrection(nn.Module):
    """Linear age-bias correction of the brain-age gap, fitted on validation data, stored as buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("slope", torch.zeros(()))
        self.register_buffer("intercept", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def fit(self, predicted, age) -> BiasCorrection:
        """Least-squares fit of gap on age; needs at least two distinct ages."""
        predicted, age = np.asarray(predicted, float).ravel(), np.asarray(age, float).ravel()
        if age.size < 2 or np.ptp(age) == 0:
            raise ValueError("bias correction needs at least two subjects with different ages")
        slope, intercept = np.polyfit(age, predicted - age, deg=1)
        self.slope.fill_(float(slope))
        self.intercept.fill_(float(intercept))
        self.fitted.fill_(True)
        return self

    def corrected_gap(self, predicted, age) -> np.ndarray:
        """The gap with its linear age trend removed (the raw gap when not fitted yet)."""
        age = np.asarray(age, float)
        gap = np.asarray(predicted, float) - age
        return gap - (float(self.slope) * age + float(self.intercept)) if bool(self.fitted) else gap


class BrainAgeGapd:
    """The brain-age bundle's ``postprocessing``, on one decollated evaluator output: ``pred`` stays the
    predicted age in years; ``brain_age_gap`` (predicted - chronological age) and ``corrected_gap`` (the
    gap less ``bias_correction``'s age trend) are added as one-element float tensors, NaN for a subject
    whose age is not in the record."""

    def __init__(self, bias_correction: BiasCorrection, pred_key: str = "pred", age_key: str = "age") -> None:
        self.bias_correction, self.pred_key, self.age_key = bias_correction, pred_key, age_key

    def __call__(self, data: dict) -> dict:
        predicted = float(torch.as_tensor(data[self.pred_key]).float().reshape(-1)[0])
        age = float(data[self.age_key]) if data.get(self.age_key) is not None else float("nan")
        corrected = float(self.bias_correction.corrected_gap(predicted, age))
        return {**data, "brain_age_gap": torch.tensor([predicted - age]), "corrected_gap": torch.tensor([corrected])}
