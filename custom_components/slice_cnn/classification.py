"""Statistics of a binary detector (AD vs cognitively normal): ROC AUC with a bootstrap confidence
interval, and accuracy-type metrics at a probability threshold."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score


def bootstrap_auc_interval(labels, scores, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC: subjects resampled with replacement, stratified by
    label (every resample holds both classes, in the observed numbers); seeded, so it is reproducible."""
    labels, scores = np.asarray(labels).ravel().astype(int), np.asarray(scores, float).ravel()
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if positives.size == 0 or negatives.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    pos = scores[rng.choice(positives, size=(n_boot, positives.size))]
    neg = scores[rng.choice(negatives, size=(n_boot, negatives.size))]
    # Mann-Whitney: AUC from the rank sum of the positives (average ranks for ties), per resample
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)[:, : positives.size]
    n_pos, n_neg = positives.size, negatives.size
    aucs = (ranks.sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(aucs, [tail, 100 - tail])
    return float(low), float(high)


def detection_metrics(labels, probabilities, threshold: float = 0.5, n_boot: int = 2000, seed: int = 0) -> dict:
    """AUC (with its bootstrap 95 % interval), accuracy, balanced accuracy, sensitivity and specificity of
    ``probabilities`` (of label 1) against 0/1 ``labels``; AUC and its interval are NaN without both classes."""
    labels = np.asarray(labels).ravel().astype(int)
    probabilities = np.asarray(probabilities, float).ravel()
    if labels.shape != probabilities.shape or labels.size == 0:
        raise ValueError(f"need equal, non-empty label and probability arrays, got {labels.shape} and {probabilities.shape}")
    predicted = (probabilities >= threshold).astype(int)
    both = 0 < labels.sum() < labels.size
    sensitivity = float((predicted[labels == 1] == 1).mean()) if (labels == 1).any() else float("nan")
    specificity = float((predicted[labels == 0] == 0).mean()) if (labels == 0).any() else float("nan")
    low, high = bootstrap_auc_interval(labels, probabilities, n_boot=n_boot, seed=seed)
    return {
        "n": int(labels.size),
        "n_positive": int(labels.sum()),
        "auc": float(roc_auc_score(labels, probabilities)) if both else float("nan"),
        "auc_ci95_low": low,
        "auc_ci95_high": high,
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(np.nanmean([sensitivity, specificity])),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "threshold": float(threshold),
    }
