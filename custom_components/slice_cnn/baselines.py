"""Simple baselines fitted on the same split as a trained network, for its figures to be read against:
the constant predictor (training mean age), ridge regression of age and logistic regression of AD on
block-averaged voxels (``BLOCK``^3 voxels: 8 mm blocks at 4 mm).

Both regressions fit on the training split with their penalty chosen on the validation split (the
network also trains on the training split and uses validation only to pick its checkpoint), then score
the test split.
"""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
from scipy.linalg import LinAlgWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .classification import bootstrap_auc_interval

BLOCK = 2
RIDGE_ALPHAS = np.logspace(-2, 5, 15)
LOGISTIC_CS = np.logspace(-5, 1, 13)


def voxel_features(records: list[dict], block: int = BLOCK) -> np.ndarray:
    """Each record's image averaged over ``block``^3 voxel blocks, flattened: one row per record."""
    rows = []
    for rec in records:
        image = np.asarray(nib.load(rec["image"]).dataobj, dtype=np.float32)
        n = [size // block for size in image.shape]
        image = image[: n[0] * block, : n[1] * block, : n[2] * block]
        rows.append(image.reshape(n[0], block, n[1], block, n[2], block).mean(axis=(1, 3, 5)).ravel())
    return np.stack(rows)


def age_baselines(train: list[dict], validation: list[dict], test: list[dict],
                  elsewhere: dict[str, list[dict]] | None = None) -> dict:
    """Test MAE of the constant predictor and of ridge on voxels (alpha chosen on validation MAE); with
    ``elsewhere`` (name: records of another cohort), also the same ridge model's MAE, r and mean gap there."""
    x_train, x_val, x_test = (voxel_features(s) for s in (train, validation, test))
    y_train, y_val, y_test = (_ages(s) for s in (train, validation, test))

    def fitted(alpha: float):
        with warnings.catch_warnings():  # small alphas on more voxels than subjects: ill-conditioned, and not chosen
            warnings.simplefilter("ignore", LinAlgWarning)
            return make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x_train, y_train)

    alpha = min(RIDGE_ALPHAS, key=lambda a: np.abs(fitted(a).predict(x_val) - y_val).mean())
    model = fitted(alpha)
    prediction = model.predict(x_test)
    result = {"constant_mae": float(np.abs(y_train.mean() - y_test).mean()),
              "ridge_mae": float(np.abs(prediction - y_test).mean()),
              "ridge_r": float(np.corrcoef(prediction, y_test)[0, 1]), "ridge_alpha": float(alpha),
              "n_train": len(train), "n_test": len(test)}
    for name, records in (elsewhere or {}).items():
        age, predicted = _ages(records), model.predict(voxel_features(records))
        result[f"ridge_{name}"] = {"n": len(records), "mae": float(np.abs(predicted - age).mean()),
                                   "pearson_r": float(np.corrcoef(predicted, age)[0, 1]),
                                   "mean_gap": float((predicted - age).mean())}
    return result


def region_mean_auc(records: list[dict], region: np.ndarray) -> dict:
    """AUC (with its bootstrap 95 % interval) of minus the mean z-scored intensity inside ``region`` (a
    boolean mask on the records' grid) for ``label``: no fitting, an atrophy measure that knows where the
    disease acts (on a simulated cohort, its ground-truth region)."""
    scores = [-_zscored(rec["image"])[region].mean() for rec in records]
    labels = [int(rec["label"]) for rec in records]
    low, high = bootstrap_auc_interval(np.array(labels), np.array(scores))
    return {"auc": float(roc_auc_score(labels, scores)), "auc_ci95_low": low, "auc_ci95_high": high}


def _zscored(path: str) -> np.ndarray:
    image = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    return (image - image.mean()) / image.std()


def _ages(records: list[dict]) -> np.ndarray:
    return np.array([float(r["age"]) for r in records])


def ad_baseline(train: list[dict], validation: list[dict], test: list[dict], seed: int = 0) -> dict:
    """Test AUC (with its bootstrap 95 % interval) of logistic regression on voxels, C chosen on
    validation AUC; and of the subject's age alone (no image, no fitting), which shows how much of an
    AUC the cohort's age difference between AD and CN could explain."""
    x_train, x_val, x_test = (voxel_features(s) for s in (train, validation, test))
    y_train, y_val, y_test = (np.array([int(r["label"]) for r in s]) for s in (train, validation, test))

    def fitted(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(x_train, y_train)

    c = max(LOGISTIC_CS, key=lambda c: roc_auc_score(y_val, fitted(c).predict_proba(x_val)[:, 1]))
    scores = fitted(c).predict_proba(x_test)[:, 1]
    low, high = bootstrap_auc_interval(y_test, scores, seed=seed)
    ages = _ages(test)
    age_low, age_high = bootstrap_auc_interval(y_test, ages, seed=seed)
    return {"logistic_auc": float(roc_auc_score(y_test, scores)), "logistic_auc_ci95_low": low,
            "logistic_auc_ci95_high": high, "logistic_c": float(c),
            "age_auc": float(roc_auc_score(y_test, ages)), "age_auc_ci95_low": age_low,
            "age_auc_ci95_high": age_high, "n_train": len(train), "n_test": len(test)}
