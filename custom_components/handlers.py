"""Ignite handlers for brain-age evaluation: per-subject CSV, metrics, bias correction and plots."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import evenly_divisible_all_gather, string_list_all_gather

from data_prep.volumes import atomic_path

from .brain_age import BiasCorrection, brain_age_metrics, pearson_r
from .plots import plot_gap_vs_age, plot_predicted_vs_true, plot_slice_weights


class EpochCollector:
    """Base of handlers that collect something every iteration of an epoch and report it at the epoch's end:
    subclasses define ``_reset``, ``_collect`` and ``_report`` (each taking the engine)."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)


class BrainAgeReport(EpochCollector):
    """Collect predictions over an evaluation epoch and report them as a brain-age researcher expects.

    Writes ``<prefix>predictions.csv`` (subject, age, predicted age, gap, bias-corrected gap),
    ``<prefix>metrics.json`` (MAE, RMSE, Pearson r, R^2), a predicted-vs-true scatter and a gap-vs-age
    plot, and puts r, R^2 and RMSE into ``engine.state.metrics`` for the stats handlers. With
    ``fit_bias_correction`` it first refits ``bias_correction`` on this epoch (the validation set), so a
    checkpoint saved afterwards carries the correction that matches its weights. Subjects without a
    known age (plain inference) get a predicted age and empty gap columns.

    Expects decollated engine output (MONAI's default): ``engine.state.batch`` and ``engine.state.output``
    are lists of per-subject dicts. Under DDP it must be attached on every rank (it gathers across
    ranks); only rank 0 writes files.
    """

    def __init__(self, output_dir, bias_correction: BiasCorrection | None = None, fit_bias_correction: bool = False,
                 prefix: str = "", subject_key: str = "subject", age_key: str = "age", pred_key: str = "pred",
                 plots: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.bias_correction = bias_correction if bias_correction is not None else BiasCorrection()
        self.fit_bias_correction = fit_bias_correction
        self.prefix, self.plots = prefix, plots
        self.subject_key, self.age_key, self.pred_key = subject_key, age_key, pred_key
        self._subjects: list[str] = []
        self._ages: list[float] = []
        self._preds: list[float] = []

    def _reset(self, engine: Engine) -> None:
        self._subjects, self._ages, self._preds = [], [], []

    def _collect(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            self._subjects.append(str(item.get(self.subject_key, f"case{len(self._subjects)}")))
            age = item.get(self.age_key)
            self._ages.append(float(age) if age is not None else math.nan)
            self._preds.append(float(torch.as_tensor(out[self.pred_key]).float().reshape(-1)[0]))

    def _gathered(self):
        """All ranks' subjects, ages and predictions (ranks may hold different counts)."""
        values = torch.tensor([self._ages, self._preds], dtype=torch.float64).T.reshape(-1, 2)
        if idist.get_world_size() == 1:
            return self._subjects, values[:, 0].numpy(), values[:, 1].numpy()
        values = evenly_divisible_all_gather(values, concat=True)
        return string_list_all_gather(self._subjects), values[:, 0].numpy(), values[:, 1].numpy()

    def _report(self, engine: Engine) -> None:
        subjects, ages, preds = self._gathered()
        known = np.isfinite(ages)
        if self.fit_bias_correction and known.sum() >= 2 and np.ptp(ages[known]) > 0:
            self.bias_correction.fit(preds[known], ages[known])
        gap = preds - ages
        corrected = self.bias_correction.corrected_gap(preds, ages)
        metrics = brain_age_metrics(preds[known], ages[known]) if known.any() else {"n": 0}
        if known.any():
            metrics["corrected_gap_age_r"] = pearson_r(corrected[known], ages[known])
            for key in ("rmse", "pearson_r", "r2"):
                engine.state.metrics[f"{self.prefix}{key}"] = metrics[key]
        if idist.get_rank() == 0:
            self._write(subjects, ages, preds, gap, corrected, metrics, known)

    def _write(self, subjects, ages, preds, gap, corrected, metrics, known) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows = [
            {"subject": s, "age": _fmt(a), "predicted_age": _fmt(p), "brain_age_gap": _fmt(g), "corrected_gap": _fmt(c)}
            for s, a, p, g, c in zip(subjects, ages, preds, gap, corrected)
        ]
        _write_atomic(self.output_dir / f"{self.prefix}predictions.csv", lambda f: _write_csv(f, rows))
        _write_atomic(self.output_dir / f"{self.prefix}metrics.json", lambda f: json.dump(metrics, f, indent=1))
        if self.plots and known.sum() >= 2:
            plot_predicted_vs_true(ages[known], preds[known], self.output_dir / f"{self.prefix}scatter.png")
            plot_gap_vs_age(ages[known], gap[known], corrected[known], self.output_dir / f"{self.prefix}gap_vs_age.png")


def _fmt(value: float) -> str:
    return "" if not np.isfinite(value) else f"{value:.3f}"


def _write_csv(handle, rows) -> None:
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["subject"])
    writer.writeheader()
    writer.writerows(rows)


def _write_atomic(path: Path, write) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        write(handle)


class SliceAttentionReport(EpochCollector):
    """Per-subject slice attention weights of an attention-pooling slice network: CSV plus a plot.

    Re-runs the network's ``forward_with_attention`` on each batch's images (the evaluator's forward pass
    returns predictions only, which keeps the network exportable), so enable it only when the weights
    are wanted. Weights are averaged over heads: one row per subject, one column per slice index.
    """

    def __init__(self, network, output_dir, prefix: str = "", subject_key: str = "subject", image_key: str = "image",
                 axis_name: str = "slice") -> None:
        self.network = getattr(network, "module", network)
        self.output_dir = Path(output_dir)
        self.prefix, self.subject_key, self.image_key, self.axis_name = prefix, subject_key, image_key, axis_name
        self._subjects: list[str] = []
        self._weights: list[np.ndarray] = []

    def _reset(self, engine: Engine) -> None:
        self._subjects, self._weights = [], []

    @torch.no_grad()
    def _collect(self, engine: Engine) -> None:
        images = torch.stack([torch.as_tensor(out[self.image_key]) for out in engine.state.output])
        _, weights = self.network.forward_with_attention(images.to(engine.state.device))
        self._weights.extend(weights.float().mean(dim=1).cpu().numpy())
        self._subjects.extend(str(item.get(self.subject_key, f"case{len(self._subjects)}")) for item in engine.state.batch)

    def _report(self, engine: Engine) -> None:
        if idist.get_rank() != 0 or not self._weights:
            return
        weights = np.stack(self._weights)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows = [{"subject": s, **{f"w{i}": f"{w:.5f}" for i, w in enumerate(row)}} for s, row in zip(self._subjects, weights)]
        _write_atomic(self.output_dir / f"{self.prefix}slice_attention.csv", lambda f: _write_csv(f, rows))
        plot_slice_weights(weights, self.output_dir / f"{self.prefix}slice_attention.png", axis_name=self.axis_name)
