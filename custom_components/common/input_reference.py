"""Is an input like the training inputs? A cheap out-of-distribution score written beside every prediction.

A network gives a confident answer for any volume of the right shape: a raw head with skull, a
contrast-inverted (T2-like) scan, a volume left un-normalised, noise. :class:`InputReference` keeps what
the training volumes looked like as they entered the bundle (after loading and reorientation, before any
intensity normalisation or augmentation): their mean image, where they hold a brain, their intensity
distribution and the spread of three measures over them:

- ``mean_image_correlation``: Pearson correlation with the training mean image inside the core mask
  (voxels inside the brain in at least half the training volumes); low for a misplaced, non-brain,
  contrast-inverted or noise volume;
- ``intensity_distance``: the mean absolute difference between the volume's intensity quantiles
  (1..99 %) inside the core mask and the training volumes' mean quantiles, over the training 99th
  percentile (white matter after the project's normalisation); high for a wrong normalisation or contrast;
- ``outside_brain_fraction``: the share of the volume's absolute signal outside the brain support
  (voxels inside the brain in at least 1 % of training volumes); high for skull, neck or background signal.

Each measure becomes a one-sided robust z: its distance from the training median, in the direction that
is worse, in units of the training spread (1.4826 x the median absolute deviation, at least
``SPREAD_FLOOR``). The ``ood_score`` is the largest of the three; above ``threshold`` an input is flagged.
Training writes the fitted reference to ``models/input_reference.pt`` (tensors only); inference computes
the score in its transforms (:class:`InputCheckd`) and ``handlers.InputCheckReport`` writes it out.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from monai.transforms import MapTransform
from torch import nn
from tqdm import tqdm

from brainage_core.volumes import InputError, atomic_path

logger = logging.getLogger(__name__)
FEATURES = ("mean_image_correlation", "intensity_distance", "outside_brain_fraction")
WORSE = (-1.0, 1.0, 1.0)  # the direction in which each measure means "less like the training inputs"
SPREAD_FLOOR = (0.02, 0.02, 0.01)  # so a measure that hardly varies in training does not flag tiny changes
CORE_SHARE, SUPPORT_SHARE = 0.5, 0.01
QUANTILES = np.linspace(0.01, 0.99, 99)
DEFAULT_THRESHOLD = 6.0


class InputReference(nn.Module):
    """The training inputs' appearance (see the module docstring), as buffers of a ``spatial_shape`` grid.

    Args:
        spatial_shape: the bundle's ``image_size``.
        threshold: ``ood_score`` above which an input is flagged.
    """

    def __init__(self, spatial_shape: Sequence[int], threshold: float = DEFAULT_THRESHOLD) -> None:
        super().__init__()
        self.threshold = float(threshold)
        shape = tuple(int(s) for s in spatial_shape)
        self.register_buffer("mean_image", torch.zeros(shape))
        self.register_buffer("core", torch.zeros(shape, dtype=torch.bool))
        self.register_buffer("support", torch.zeros(shape, dtype=torch.bool))
        self.register_buffer("quantiles", torch.zeros(len(QUANTILES), dtype=torch.float64))
        self.register_buffer("median", torch.zeros(len(FEATURES), dtype=torch.float64))
        self.register_buffer("spread", torch.ones(len(FEATURES), dtype=torch.float64))
        self.register_buffer("training_scores", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def fit(self, volumes: Callable[[], Iterable[torch.Tensor]]) -> InputReference:
        """Fit on the training volumes; ``volumes()`` yields them (called twice: the mean image and masks
        first, then each volume's measures)."""
        total, inside, count = torch.zeros_like(self.mean_image, dtype=torch.float64), None, 0
        for volume in volumes():
            volume = self._array(volume)
            total += torch.from_numpy(volume)
            brain = torch.from_numpy(volume != 0)
            inside = brain.long() if inside is None else inside + brain
            count += 1
        if count == 0:
            raise InputError("no training volumes to fit the input reference on")
        self.mean_image.copy_(total / count)
        self.core.copy_(inside >= CORE_SHARE * count)
        self.support.copy_(inside >= max(SUPPORT_SHARE * count, 1))
        if not self.core.any():
            raise InputError("the training volumes share no brain voxels: are they on one grid?")
        measured = [self._measures(volume) for volume in volumes()]
        quantiles = np.stack([q for _, q, _ in measured])
        self.quantiles.copy_(torch.from_numpy(quantiles.mean(axis=0)))
        features = torch.tensor([[r, self._distance(q), o] for r, q, o in measured], dtype=torch.float64)
        self.median.copy_(features.median(dim=0).values)
        spread = 1.4826 * (features - self.median).abs().median(dim=0).values
        self.spread.copy_(torch.maximum(spread, torch.tensor(SPREAD_FLOOR, dtype=torch.float64)))
        self.training_scores = self.score(features)
        self.fitted.fill_(True)
        return self

    def fit_or_load(self, records: Sequence[dict], loading: Callable[[dict], dict], path: str | os.PathLike,
                    image_key: str = "image", max_volumes: int = 500) -> InputReference:
        """Load the reference from ``path`` when it exists (a resumed run), else fit it on ``records`` read
        through ``loading`` (the bundle's loading transforms) and write it there (rank 0, atomically). Of a
        larger training set, ``max_volumes`` evenly spaced records are read (each is read twice)."""
        path = Path(path)
        if path.is_file():
            return self.load(path)
        records = list(records)[:: max(1, -(-len(records) // max_volumes))]

        def volumes():
            for record in tqdm(records, desc="input reference", unit="volume", leave=False, mininterval=5):
                yield loading(dict(record))[image_key]

        self.fit(volumes)
        logger.info("input reference: training ood_score %.1f-%.1f (flag above %.1f), written to %s",
                    float(self.training_scores.min()), float(self.training_scores.max()), self.threshold, path)
        if idist.get_rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(self.state_dict(), tmp)
        return self

    def load(self, path: str | os.PathLike) -> InputReference:
        """Load a reference written by training; its grid must be this one's."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        shape = tuple(state.get("mean_image", torch.zeros(0)).shape)
        if shape != tuple(self.mean_image.shape):
            raise InputError(f"{path}: the input reference was fitted on another grid ({shape}), "
                             f"not image_size {tuple(self.mean_image.shape)}")
        self.training_scores = torch.zeros_like(state["training_scores"])
        self.load_state_dict(state)
        return self

    def load_if_present(self, path: str | os.PathLike) -> InputReference:
        """Load the reference when ``path`` exists; otherwise warn that inputs go unchecked."""
        if Path(path).is_file():
            return self.load(path)
        logger.warning("no input reference at %s (written by training): inputs are not checked against the "
                       "training data", path)
        return self

    def features(self, volume) -> torch.Tensor:
        """The three measures of one volume (float64, in ``FEATURES`` order)."""
        correlation, quantiles, outside = self._measures(volume)
        return torch.tensor([correlation, self._distance(quantiles), outside], dtype=torch.float64)

    def _measures(self, volume) -> tuple[float, np.ndarray, float]:
        """Correlation with the mean image, intensity quantiles inside the core, share of signal outside."""
        volume = self._array(volume)
        core, mean = self.core.numpy(), self.mean_image.numpy()
        x, m = volume[core].astype(np.float64), mean[core].astype(np.float64)
        x_c, m_c = x - x.mean(), m - m.mean()
        denominator = np.sqrt((x_c * x_c).sum() * (m_c * m_c).sum())
        correlation = float((x_c * m_c).sum() / denominator) if denominator > 0 else 0.0
        magnitude = np.abs(volume.astype(np.float64))
        outside = float(magnitude[~self.support.numpy()].sum() / max(magnitude.sum(), 1e-12))
        return correlation, np.quantile(x, QUANTILES), outside

    def _distance(self, quantiles: np.ndarray) -> float:
        """Mean absolute quantile difference from the training quantiles, over their 99th percentile."""
        reference = self.quantiles.numpy()
        return float(np.abs(quantiles - reference).mean() / max(float(reference[-1]), 1e-12))

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """The ``ood_score`` of measures shaped (..., 3): the largest one-sided robust z."""
        worse = torch.tensor(WORSE, dtype=torch.float64)
        return ((features.double() - self.median) * worse / self.spread).amax(dim=-1)

    def _array(self, volume) -> np.ndarray:
        """A volume (tensor or array, with or without its channel) as a float32 array of the grid's shape."""
        array = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
        array = np.nan_to_num(array.reshape(array.shape[-3:]) if array.ndim == 4 and array.shape[0] == 1 else array)
        if array.shape != tuple(self.mean_image.shape):
            raise InputError(f"input reference: volume of shape {array.shape}, expected {tuple(self.mean_image.shape)}")
        return array


class InputCheckd(MapTransform):
    """Put ``[ood_score, *features]`` of ``data[key]`` (as loaded, before normalisation) into
    ``data[output_key]``; NaN when the reference is not fitted (no reference file)."""

    def __init__(self, keys, reference: InputReference, output_key: str = "input_check") -> None:
        super().__init__(keys)
        self.reference, self.output_key = reference, output_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if bool(self.reference.fitted):
                features = self.reference.features(d[key])
                d[self.output_key] = torch.cat([self.reference.score(features).reshape(1), features]).float()
            else:
                d[self.output_key] = torch.full((1 + len(FEATURES),), float("nan"))
        return d
