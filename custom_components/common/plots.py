"""Figures for brain-age results (matplotlib, no display needed). Each writes one PNG atomically."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from brainage_core.volumes import atomic_path  # noqa: E402

VIEWS = ("sagittal", "coronal", "axial")


def central_slices(volume) -> list[np.ndarray]:
    """The middle sagittal, coronal and axial slices of a (D, H, W) RAS volume, rotated for display."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    cx, cy, cz = (s // 2 for s in volume.shape)
    return [np.rot90(volume[cx]), np.rot90(volume[:, cy]), np.rot90(volume[:, :, cz])]


def save_figure(fig, path) -> Path:
    """Save and close ``fig`` as ``path`` via a temporary file, so readers never see half a PNG."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def plot_predicted_vs_true(age, predicted, path, title="Predicted vs chronological age") -> Path:
    age, predicted = np.asarray(age, float), np.asarray(predicted, float)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    lo, hi = float(min(age.min(), predicted.min())), float(max(age.max(), predicted.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
    ax.scatter(age, predicted, s=14, alpha=0.7)
    mae = np.abs(predicted - age).mean()
    ax.set(xlabel="chronological age (years)", ylabel="predicted age (years)", title=f"{title}\nMAE {mae:.2f} y, n={age.size}")
    ax.legend(loc="upper left")
    return save_figure(fig, path)


def plot_gap_vs_age(age, gap, corrected_gap, path) -> Path:
    age = np.asarray(age, float)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.axhline(0, color="k", lw=1)
    for values, label in ((gap, "gap"), (corrected_gap, "bias-corrected gap")):
        values = np.asarray(values, float)
        ax.scatter(age, values, s=12, alpha=0.6, label=label)
        if age.size > 1 and np.ptp(age) > 0:
            slope, intercept = np.polyfit(age, values, 1)
            xs = np.array([age.min(), age.max()])
            ax.plot(xs, slope * xs + intercept, lw=1.5)
    ax.set(xlabel="chronological age (years)", ylabel="brain-age gap (years)", title="Brain-age gap vs age")
    ax.legend()
    return save_figure(fig, path)


def plot_slice_weights(weights, path, axis_name="slice") -> Path:
    """Mean attention weight per slice index (weights: subjects x slices), with the spread across subjects."""
    weights = np.asarray(weights, float)
    mean, std = weights.mean(0), weights.std(0)
    idx = np.arange(mean.size)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(idx, mean)
    ax.fill_between(idx, mean - std, mean + std, alpha=0.3)
    ax.axhline(1.0 / mean.size, color="k", ls="--", lw=1, label="uniform")
    ax.set(xlabel=f"{axis_name} index", ylabel="attention weight", title="Slice attention")
    ax.legend()
    return save_figure(fig, path)


def plot_condition_bars(rows, path) -> Path:
    """Test MAE per training condition, one panel per model: bars = mean over seeds, dots = seeds."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        x = np.arange(len(mine))
        ax.bar(x, [r["mae_mean"] for r in mine], yerr=[r["mae_std"] for r in mine], capsize=4, alpha=0.7)
        for i, r in enumerate(mine):
            seeds = [float(v) for v in str(r["mae_per_seed"]).split()]
            ax.scatter(np.full(len(seeds), i), seeds, color="k", s=10, zorder=3)
        ax.set_xticks(x, [r["condition"] for r in mine], rotation=15)
        ax.set(ylabel="test MAE (years)", title=model)
    return save_figure(fig, path)


def map_overlay_figure(background, effect, title: str, label: str = "old - young"):
    """Central slices of ``background`` in grey with the signed ``effect`` map on top (red up, blue down)."""
    effect = np.asarray(effect, dtype=np.float32)
    limit = float(np.abs(effect).max()) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, view, base, overlay in zip(axes, VIEWS, central_slices(background), central_slices(effect)):
        ax.imshow(base, cmap="gray")
        shown = np.ma.masked_where(np.abs(overlay) < 0.1 * limit, overlay)
        image = ax.imshow(shown, cmap="coolwarm", vmin=-limit, vmax=limit, alpha=0.8)
        ax.set_title(view, fontsize=9)
        ax.set_axis_off()
    fig.colorbar(image, ax=list(axes), shrink=0.8, label=label)
    fig.suptitle(title)
    return fig


def plot_learning_curve(rows: list[dict], path, title: str = "Learning curve") -> Path:
    """One panel per column of ``rows`` (dicts with ``epoch`` and numbers, e.g. train loss, val MAE, val r)
    against the epoch; empty values (epochs without validation) are skipped."""
    columns = [key for key in rows[0] if key != "epoch"] if rows else []
    fig, axes = plt.subplots(1, max(len(columns), 1), figsize=(3.6 * max(len(columns), 1), 3.2), squeeze=False)
    for ax, column in zip(axes[0], columns):
        points = [(row["epoch"], row[column]) for row in rows if row.get(column) not in (None, "")]
        if points:
            epochs, values = zip(*points)
            ax.plot(epochs, [float(v) for v in values], marker="o", ms=3)
        ax.set(xlabel="epoch", title=column)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_roc(labels, scores, metrics: dict, path) -> Path:
    """ROC curve of ``scores`` against 0/1 ``labels``, titled with the AUC and its interval from ``metrics``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(int), np.asarray(scores, float))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    ax.plot(fpr, tpr, lw=2, label="detector")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity",
           title=f"ROC: AUC {metrics['auc']:.3f} (95% CI {metrics['auc_ci95_low']:.3f}-{metrics['auc_ci95_high']:.3f})"
                 f"\nn={metrics['n']} ({metrics['n_positive']} AD)")
    ax.legend(loc="lower right")
    return save_figure(fig, path)
