"""Ignite handlers of the slice bundle's evaluations: brain-age and AD-detection reports (per-subject CSV,
metrics, bias correction, plots), the learning curve, slice attention and occlusion maps."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from monai.handlers import from_engine

from brainage_core.grid import FIELD_OF_VIEW_MM, canonical_grid
from brainage_core.volumes import atomic_path, save_nifti
from custom_components.common.brain_age import BiasCorrection, brain_age_metrics, pearson_r
from custom_components.common.handlers import (
    EpochCollector,
    PlotInterval,
    checked_interval,
    csv_number,
    gather_subject_values,
    subject_id,
    write_csv,
)
from custom_components.common.plots import (
    map_overlay_figure,
    plot_gap_vs_age,
    plot_learning_curve,
    plot_predicted_vs_true,
    plot_roc,
    plot_slice_weights,
    save_figure,
)

from .classification import detection_metrics


class BrainAgeReport(EpochCollector):
    """Collect predictions over an evaluation epoch and report them as a brain-age researcher expects.

    Writes ``<prefix>predictions.csv`` (subject, age, predicted age, gap, bias-corrected gap),
    ``<prefix>metrics.json`` (MAE, RMSE, Pearson r, R^2), a predicted-vs-true scatter and a gap-vs-age
    plot (every ``plot_interval``-th report: drawing them costs about half a second), and puts r, R^2 and RMSE into ``engine.state.metrics`` for the stats handlers. With
    ``fit_bias_correction`` it first refits ``bias_correction`` on this epoch (the validation set), so a
    checkpoint saved afterwards carries the correction that matches its weights. Subjects without a
    known age (plain inference) get a predicted age and empty gap columns.

    Expects decollated engine output (MONAI's default): ``engine.state.batch`` and ``engine.state.output``
    are lists of per-subject dicts. Under DDP it must be attached on every rank (it gathers across
    ranks); only rank 0 writes files.
    """

    def __init__(self, output_dir, bias_correction: BiasCorrection | None = None, fit_bias_correction: bool = False,
                 prefix: str = "", subject_key: str = "subject", age_key: str = "age", pred_key: str = "pred",
                 plots: bool = True, plot_interval: int = 1) -> None:
        self.output_dir = Path(output_dir)
        self.plot_every = PlotInterval(plot_interval)
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
            self._subjects.append(subject_id(item, self.subject_key, len(self._subjects)))
            age = item.get(self.age_key)
            self._ages.append(float(age) if age is not None else math.nan)
            self._preds.append(float(torch.as_tensor(out[self.pred_key]).float().reshape(-1)[0]))

    def _report(self, engine: Engine) -> None:
        subjects, (ages, preds) = gather_subject_values(self._subjects, [self._ages, self._preds])
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
            {"subject": s, "age": csv_number(a), "predicted_age": csv_number(p), "brain_age_gap": csv_number(g), "corrected_gap": csv_number(c)}
            for s, a, p, g, c in zip(subjects, ages, preds, gap, corrected)
        ]
        write_csv(self.output_dir / f"{self.prefix}predictions.csv", rows)
        with atomic_path(self.output_dir / f"{self.prefix}metrics.json") as tmp, open(tmp, "w") as handle:
            json.dump(metrics, handle, indent=1)
        if self.plots and self.plot_every.due() and known.sum() >= 2:
            plot_predicted_vs_true(ages[known], preds[known], self.output_dir / f"{self.prefix}scatter.png")
            plot_gap_vs_age(ages[known], gap[known], corrected[known], self.output_dir / f"{self.prefix}gap_vs_age.png")


class DetectionReport(EpochCollector):
    """Collect the AD probabilities of an evaluation epoch and report them: ``<prefix>detection.csv``
    (subject, label, probability, predicted label), ``<prefix>detection_metrics.json`` (ROC AUC with its
    bootstrap 95 % interval, accuracy, balanced accuracy, sensitivity, specificity at ``threshold``) and a
    ROC plot (every ``plot_interval``-th report); AUC interval bounds go into ``engine.state.metrics``.
    Subjects without a label (plain inference) get their probability and predicted label only, and no
    metrics are written when no subject has one. Expects decollated output whose
    ``pred_key`` is the probability (the evaluator's sigmoid postprocessing). Attach on every rank under
    DDP (it gathers); only rank 0 writes.
    """

    def __init__(self, output_dir, threshold: float = 0.5, prefix: str = "", subject_key: str = "subject",
                 label_key: str = "label", pred_key: str = "pred", n_boot: int = 2000, seed: int = 0,
                 plot_interval: int = 1) -> None:
        self.output_dir, self.threshold, self.prefix = Path(output_dir), float(threshold), prefix
        self.plot_every = PlotInterval(plot_interval)
        self.subject_key, self.label_key, self.pred_key = subject_key, label_key, pred_key
        self.n_boot, self.seed = int(n_boot), int(seed)
        self._subjects: list[str] = []
        self._labels: list[float] = []
        self._probabilities: list[float] = []

    def _reset(self, engine: Engine) -> None:
        self._subjects, self._labels, self._probabilities = [], [], []

    def _collect(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            self._subjects.append(subject_id(item, self.subject_key, len(self._subjects)))
            label = item.get(self.label_key)
            self._labels.append(float(torch.as_tensor(label).reshape(-1)[0]) if label is not None else math.nan)
            self._probabilities.append(float(torch.as_tensor(out[self.pred_key]).float().reshape(-1)[0]))

    def _report(self, engine: Engine) -> None:
        subjects, (labels, probabilities) = gather_subject_values(self._subjects, [self._labels, self._probabilities])
        known = np.isfinite(labels)
        metrics = detection_metrics(labels[known], probabilities[known], self.threshold, self.n_boot, self.seed) if known.any() else None
        if metrics is not None:
            for key in ("auc_ci95_low", "auc_ci95_high"):
                engine.state.metrics[f"{self.prefix}{key}"] = metrics[key]
        if idist.get_rank() != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows = [{"subject": s, "label": int(y) if np.isfinite(y) else "", "probability": f"{p:.5f}",
                 "predicted": int(p >= self.threshold)} for s, y, p in zip(subjects, labels, probabilities)]
        write_csv(self.output_dir / f"{self.prefix}detection.csv", rows)
        if metrics is None:
            return
        with atomic_path(self.output_dir / f"{self.prefix}detection_metrics.json") as tmp, open(tmp, "w") as handle:
            json.dump(metrics, handle, indent=1)
        if self.plot_every.due() and 0 < labels[known].sum() < known.sum():
            plot_roc(labels[known], probabilities[known], metrics, self.output_dir / f"{self.prefix}roc.png")


class LearningCurve(EpochCollector):
    """Per-epoch training loss, learning rate and validation metrics as ``<prefix>learning_curve.csv`` and
    ``.png`` in ``output_dir``.

    Attach it to the trainer after the ValidationHandler, so an epoch's row holds that epoch's validation
    (empty cells for epochs without one). Rows of earlier epochs already in the CSV are kept, so a resumed
    run continues its curve; rows of this epoch and later (from a run started afresh) are replaced.

    Args:
        output_dir: folder of the CSV and the plot.
        evaluator: the validation evaluator whose ``metrics`` are recorded.
        metrics: names in ``evaluator.state.metrics`` to record (e.g. val_mae, val_pearson_r).
        optimizer: record its first parameter group's learning rate (optional).
        loss_transform: the training loss of an iteration from ``engine.state.output``.
        plot_interval: draw the plot every this many epochs and after the last (the CSV is written every
            epoch); drawing takes most of a second, a large share of a GPU epoch.
    """

    def __init__(self, output_dir, evaluator: Engine | None = None, metrics=("val_mae", "val_pearson_r"),
                 optimizer: torch.optim.Optimizer | None = None, loss_transform=None, prefix: str = "",
                 plot_interval: int = 1) -> None:
        self.path = Path(output_dir) / f"{prefix}learning_curve.csv"
        self.evaluator, self.metrics, self.optimizer = evaluator, tuple(metrics), optimizer
        self.loss_transform = loss_transform or from_engine(["loss"], first=True)
        self.plot_interval = checked_interval(plot_interval)
        self._losses: list[float] = []

    def _reset(self, engine: Engine) -> None:
        self._losses = []

    def _collect(self, engine: Engine) -> None:
        self._losses.append(float(self.loss_transform(engine.state.output)))

    def _report(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        epoch = engine.state.epoch
        row = {"epoch": epoch, "train_loss": float(np.mean(self._losses)) if self._losses else ""}
        if self.optimizer is not None:
            row["lr"] = self.optimizer.param_groups[0]["lr"]
        validated = self.evaluator is not None and self.evaluator.state.epoch == epoch
        for name in self.metrics:
            row[name] = float(self.evaluator.state.metrics[name]) if validated and name in self.evaluator.state.metrics else ""
        earlier = [{key: r.get(key, "") for key in row} for r in self._earlier_rows() if int(r["epoch"]) < epoch]
        rows = earlier + [row]
        write_csv(self.path, rows)
        if epoch % self.plot_interval == 0 or epoch == engine.state.max_epochs:
            plot_learning_curve(rows, self.path.with_suffix(".png"))

    def _earlier_rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as handle:
            return list(csv.DictReader(handle))


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
        start = len(self._subjects)
        self._subjects += [subject_id(item, self.subject_key, start + i) for i, item in enumerate(engine.state.batch)]

    def _report(self, engine: Engine) -> None:
        if idist.get_rank() != 0 or not self._weights:
            return
        weights = np.stack(self._weights)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows = [{"subject": s, **{f"w{i}": f"{w:.5f}" for i, w in enumerate(row)}} for s, row in zip(self._subjects, weights)]
        write_csv(self.output_dir / f"{self.prefix}slice_attention.csv", rows)
        plot_slice_weights(weights, self.output_dir / f"{self.prefix}slice_attention.png", axis_name=self.axis_name)


class OcclusionMapWriter(EpochCollector):
    """3D occlusion maps of the predicted age: one NIfTI per subject, their mean as NIfTI, and an overlay PNG.

    Each voxel holds how much the predicted age changes when a ``mask_size`` cube around it is replaced by
    the image mean (MONAI's ``OcclusionSensitivity``): negative where hiding the region makes the brain
    look younger, i.e. where the network reads ageing. Volumes are on the canonical grid (the input size
    sets its resolution), so the maps overlay on the inputs. Costs ~(size / stride)^3 forward passes per
    subject: enable it for a few subjects.
    """

    def __init__(self, network, output_dir, mask_size: int = 8, overlap: float = 0.25, n_batch: int = 16,
                 prefix: str = "", subject_key: str = "subject", image_key: str = "image") -> None:
        from monai.visualize import OcclusionSensitivity

        self.occlusion = OcclusionSensitivity(getattr(network, "module", network), mask_size=mask_size,
                                              n_batch=n_batch, verbose=False, mode="mean_img", overlap=overlap,
                                              activate=False)
        self.output_dir = Path(output_dir)
        self.prefix, self.subject_key, self.image_key = prefix, subject_key, image_key
        self._maps: list[np.ndarray] = []
        self._images: list[np.ndarray] = []

    def _reset(self, engine: Engine) -> None:
        self._maps, self._images = [], []

    @torch.no_grad()
    def _collect(self, engine: Engine) -> None:
        for out, item in zip(engine.state.output, engine.state.batch):
            image = torch.as_tensor(out[self.image_key])[None].to(engine.state.device)
            occluded, _ = self.occlusion(image)
            change = occluded[0, 0].reshape(image.shape[2:]) - torch.as_tensor(out["pred"]).reshape(-1)[0]
            change = change.float().cpu().numpy()
            subject = subject_id(item, self.subject_key, len(self._maps))
            save_nifti(change, self._grid(change.shape).affine, self.output_dir / "occlusion" / f"{subject}_occlusion.nii.gz")
            self._maps.append(change)
            self._images.append(image[0, 0].float().cpu().numpy())

    @staticmethod
    def _grid(shape):
        if len(set(shape)) != 1:
            raise ValueError(f"occlusion maps are written on the canonical (cubic) grid; input shape {list(shape)} is not")
        return canonical_grid(FIELD_OF_VIEW_MM / shape[0])

    def _report(self, engine: Engine) -> None:
        if not self._maps:
            return
        mean_map = np.mean(self._maps, axis=0)
        save_nifti(mean_map, self._grid(mean_map.shape).affine, self.output_dir / f"{self.prefix}occlusion_mean.nii.gz")
        figure = map_overlay_figure(np.mean(self._images, axis=0), mean_map, "Occlusion map of the predicted age",
                                    label="age change when hidden (years)")
        save_figure(figure, self.output_dir / f"{self.prefix}occlusion_mean.png")
