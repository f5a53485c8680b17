"""Handler building blocks both bundles use (per-subject values collected over an epoch and reported at
its end, plot intervals, atomic CSV writing) and the report of the inputs' out-of-distribution check."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import evenly_divisible_all_gather, string_list_all_gather

from brainage_core.volumes import atomic_path

from .input_reference import FEATURES, InputReference

logger = logging.getLogger(__name__)


def subject_id(item: dict, key: str, index: int) -> str:
    """The subject ID of a batch item, ``case<index>`` when absent. MONAI's datalist loader turns an ID that
    names an existing folder beside the datalist (BIDS ``sub-XX``) into that folder's path: keep its name."""
    return Path(str(item.get(key, f"case{index}"))).name


class EpochCollector:
    """Base of handlers that collect something every iteration of an epoch and report it at the epoch's end:
    subclasses define ``_reset``, ``_collect`` and ``_report`` (each taking the engine)."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)


def gather_subject_values(subjects: list[str], columns: list[list[float]]) -> tuple[list[str], list[np.ndarray]]:
    """All ranks' subjects and their values, one array per column (ranks may hold different counts)."""
    values = torch.tensor(columns, dtype=torch.float64).T.reshape(-1, len(columns))
    if idist.get_world_size() > 1:
        values = evenly_divisible_all_gather(values, concat=True)
        subjects = string_list_all_gather(subjects)
    return subjects, [values[:, k].numpy() for k in range(len(columns))]


def checked_interval(interval) -> int:
    if int(interval) < 1:
        raise ValueError(f"plot_interval must be >= 1, got {interval}")
    return int(interval)


class PlotInterval:
    """Counts reports; ``due()`` is true on every ``interval``-th one."""

    def __init__(self, interval: int = 1) -> None:
        self.interval, self.count = checked_interval(interval), 0

    def due(self) -> bool:
        self.count += 1
        return self.count % self.interval == 0


def csv_number(value: float) -> str:
    """A number as a CSV cell: three decimals, empty when not finite."""
    return "" if not np.isfinite(value) else f"{value:.3f}"


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` (dicts with the same keys) as a CSV with a header, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["subject"])
        writer.writeheader()
        writer.writerows(rows)


class InputCheckReport(EpochCollector):
    """Write each input's out-of-distribution check (``input_reference.InputCheckd`` put it in the batch):
    ``<prefix>input_check.csv`` (subject, ood_score, ood_flag, the three measures) beside the predictions,
    and a warning naming the flagged inputs. Attach on every rank under DDP (it gathers); rank 0 writes.
    """

    def __init__(self, reference: InputReference, output_dir, prefix: str = "", subject_key: str = "subject",
                 check_key: str = "input_check") -> None:
        self.reference, self.output_dir, self.prefix = reference, Path(output_dir), prefix
        self.subject_key, self.check_key = subject_key, check_key
        self._subjects: list[str] = []
        self._checks: list[list[float]] = []

    def _reset(self, engine: Engine) -> None:
        self._subjects, self._checks = [], []

    def _collect(self, engine: Engine) -> None:
        for item in engine.state.batch:
            self._subjects.append(subject_id(item, self.subject_key, len(self._subjects)))
            self._checks.append([float(v) for v in torch.as_tensor(item[self.check_key]).reshape(-1)])

    def _report(self, engine: Engine) -> None:
        subjects, columns = gather_subject_values(self._subjects, [list(c) for c in zip(*self._checks)])
        if idist.get_rank() != 0 or not subjects:
            return
        scores, features = columns[0], columns[1:]
        flagged = scores > self.reference.threshold
        rows = [{"subject": s, "ood_score": csv_number(score), "ood_flag": int(flag),
                 **{name: csv_number(values[k]) for name, values in zip(FEATURES, features)}}
                for k, (s, score, flag) in enumerate(zip(subjects, scores, flagged))]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_csv(self.output_dir / f"{self.prefix}input_check.csv", rows)
        if flagged.any():
            names = ", ".join(f"{s} ({score:.1f})" for s, score, flag in zip(subjects, scores, flagged) if flag)
            logger.warning("%d of %d inputs look unlike the training data (ood_score above %.1f; see %s): %s",
                           int(flagged.sum()), len(subjects), self.reference.threshold,
                           self.output_dir / f"{self.prefix}input_check.csv", names)
