"""Crash-safe training: a per-epoch checkpoint of everything a run needs to go on, reloaded on restart, and
checkpoint files that are never half-written (``AtomicCheckpointSaver``).

MONAI's CheckpointSaver writes its final checkpoint on completion or on a Python exception, not when the
process is killed (SIGKILL, out of memory, a pre-empted GPU job). ``TrainingResume`` writes
``<save_dir>/checkpoint_resume.pt`` atomically at the end of every ``save_interval``-th epoch and, when
``resume`` is true and the file exists, loads it when the trainer starts, so re-running the same command
goes on from the last finished epoch and ends at ``max_epochs``.

The file holds state dicts and plain values only (loadable with ``weights_only=True``): every object of
``save_dict`` (networks, optimisers, schedulers, the trainer's epoch and iteration), each evaluator's best
metric and its epoch, and the trainer's (not part of an ignite engine's state dict), the best-model list of each key-metric
CheckpointSaver among ``best_model_savers`` (else the first validation after a restart would overwrite
``model.pt`` whatever its score), and the torch, NumPy and Python random states and those of the random
transforms given, so that a resumed run draws the same batches and augmentations as an uninterrupted one.

The checkpoint it replaces is kept as ``checkpoint_resume.previous.pt``: a resume file that cannot be read
(truncated, overwritten, a failing disk) is reported and the run resumes from the previous one instead.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver
from monai.transforms import Compose, Randomizable

from brainage_core.checkpoints import load_checkpoint, load_weights, unwrap
from brainage_core.checks import remove_partial_writes
from brainage_core.options import as_bool
from brainage_core.volumes import InputError, atomic_path

logger = logging.getLogger(__name__)
RESUME_KEY = "resume_state"


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's CheckpointSaver, but every file (final, best-metric, interval) is written to a temporary file
    in the same folder and renamed onto its name, so a kill mid-write never leaves a half-written one; and
    a file of fixed name (``checkpoint_last.pt``, ``model.pt``) is not deleted before its replacement is
    written (the rename replaces it), so there is always one whole file.

    MONAI builds its disk saver with ``atomic=False`` (ignite's atomic write once left files readable by
    their owner only; ignite 0.5 adds group and other read permission after the rename).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True
                if checkpoint.save_handler.filename is not None:
                    checkpoint.save_handler.remove = _replaced_by_rename


def _replaced_by_rename(filename: str) -> None:
    """The ``remove`` of a fixed-name disk saver: nothing to delete, the next atomic write replaces the file."""


class TrainingResume:
    """Per-epoch resume checkpoint of a trainer (see the module docstring).

    Args:
        save_dir: folder of the checkpoint (the bundle's ``models``).
        save_dict: name -> object with ``state_dict``/``load_state_dict`` (the final CheckpointSaver's).
        engines: name -> MONAI engine (evaluator, trainer) whose ``best_metric`` and ``best_metric_epoch`` are kept.
        best_model_savers: handlers of the evaluators; the key-metric CheckpointSavers among them are kept.
        resume: load the checkpoint when it exists (true/false, also as text from the command line).
        filename: checkpoint file name.
        save_interval: write every this many epochs.
        save: write at all (false on the non-zero ranks of a multi-GPU run, which only load).
        map_location: where tensors are loaded.
        transforms: the training transforms (a MONAI Compose or a list); the random states of their
            random transforms are saved and restored.
    """

    def __init__(self, save_dir: str, save_dict: Mapping[str, object], engines: Mapping[str, Engine] | None = None,
                 best_model_savers: Sequence[object] = (), resume=True, filename: str = "checkpoint_resume.pt",
                 save_interval: int = 1, save=True, map_location=None, transforms=None) -> None:
        if int(save_interval) < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}")
        if RESUME_KEY in save_dict:
            raise ValueError(f"'{RESUME_KEY}' is reserved in save_dict")
        self.path = Path(save_dir) / filename
        self.previous = self.path.with_name(f"{self.path.stem}.previous{self.path.suffix}")
        self.save_dict = dict(save_dict)
        self.engines = dict(engines or {})
        self.savers = [s for s in best_model_savers
                       if isinstance(s, CheckpointSaver) and s._key_metric_checkpoint is not None]
        self.resume = as_bool(resume, "resume")
        self.save_interval = int(save_interval)
        self.save = as_bool(save, "save")
        self.map_location = map_location
        self.random_transforms = random_transforms(transforms)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        if self.save:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.write)

    def state(self) -> dict:
        """The checkpoint's content: state dicts, best metrics, best-model lists, random states."""
        content = {name: unwrap(obj).state_dict() for name, obj in self.save_dict.items()}
        numpy_state = np.random.get_state()
        content[RESUME_KEY] = {
            "engines": {name: {"best_metric": float(e.state.best_metric), "best_metric_epoch": int(e.state.best_metric_epoch)}
                        for name, e in self.engines.items()},
            # MONAI's CheckpointSaver keeps its key-metric ignite Checkpoint private; its list is plain
            # (score, file name) pairs and CheckpointSaver.load_state_dict restores it
            "best_model_savers": [dict(s._key_metric_checkpoint.state_dict()) for s in self.savers],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_rng": _numpy_state_to_save(numpy_state),
            "python_rng": random.getstate(),
            "transform_rngs": [_numpy_state_to_save(t.R.get_state()) for t in self.random_transforms],
        }
        return content

    def write(self, engine: Engine) -> Path:
        """Write the checkpoint atomically (a kill mid-write leaves the previous one intact); the one it
        replaces becomes ``previous``."""
        with atomic_path(self.path) as tmp:
            torch.save(self.state(), tmp)
            if self.path.is_file():
                os.replace(self.path, self.previous)
        return self.path

    def _readable(self) -> Path | None:
        """The newest resume file that loads: the checkpoint, else (reported) the previous one; None if none
        exists. InputError naming both when neither loads."""
        problems = []
        for path in (self.path, self.previous):
            if not path.is_file():
                continue
            try:
                load_weights(path, "cpu")
            except InputError as err:
                problems.append(str(err))
                continue
            if problems:
                logger.warning(f"{problems[0]}; resuming from the one before it, {path}")
            return path
        if problems:
            raise InputError("no resume checkpoint can be read: " + "; ".join(problems) +
                             "; set resume to false to start afresh")
        return None

    def load(self, engine: Engine) -> bool:
        """Restore everything from the checkpoint when ``resume`` is on and it exists; True when restored."""
        remove_partial_writes(self.path.parent)  # temporary files of a write that was killed
        if not self.resume or (path := self._readable()) is None:
            return False
        max_epochs = engine.state.max_epochs
        content = load_checkpoint(path, self.save_dict, self.map_location, also_required=(RESUME_KEY,))
        extra = content[RESUME_KEY]
        for name, best in extra["engines"].items():
            if name in self.engines:
                self.engines[name].state.best_metric = best["best_metric"]
                self.engines[name].state.best_metric_epoch = best["best_metric_epoch"]
        for saver, saved in zip(self.savers, extra["best_model_savers"]):
            saver.load_state_dict(saved)
        torch.set_rng_state(extra["torch_rng"].cpu())
        if torch.cuda.is_available() and len(extra["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([state.cpu() for state in extra["cuda_rng"]])
        np.random.set_state(_numpy_state_loaded(extra["numpy_rng"]))
        random.setstate(extra["python_rng"])
        saved_transforms = extra.get("transform_rngs", [])
        if len(saved_transforms) != len(self.random_transforms):
            logger.warning(f"{path} holds the random states of {len(saved_transforms)} random transforms, this "
                           f"run has {len(self.random_transforms)}: augmentation will not repeat the uninterrupted run")
        else:
            for transform, state in zip(self.random_transforms, saved_transforms):
                transform.R.set_state(_numpy_state_loaded(state))
        if max_epochs is not None:
            if engine.state.epoch > max_epochs:
                raise ValueError(f"{path} is at epoch {engine.state.epoch}, beyond max_epochs {max_epochs}; "
                                 "raise max_epochs to train on, or set resume to false to start afresh")
            engine.state.max_epochs = max_epochs  # the command's max_epochs, not the checkpoint's
        logger.info(f"resumed from {path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}")
        return True


def random_transforms(transforms) -> list[Randomizable]:
    """The random transforms of a MONAI Compose (flattened) or a list of transforms, in order, each followed
    by the random transforms it holds (a dictionary transform draws from its array transform's state)."""
    if transforms is None:
        return []
    items = transforms.flatten().transforms if isinstance(transforms, Compose) else list(transforms)
    found: list[Randomizable] = []

    def visit(obj, depth: int) -> None:
        if isinstance(obj, Randomizable) and all(obj is not seen for seen in found):
            found.append(obj)
            if depth < 2:
                for value in vars(obj).values():
                    visit(value, depth + 1)

    for item in items:
        visit(item, 0)
    return found


def _numpy_state_to_save(state: tuple) -> list:
    """A NumPy RandomState state as plain values and a tensor (loadable with weights_only=True)."""
    return [state[0], torch.from_numpy(np.asarray(state[1]).astype(np.int64)), *state[2:]]


def _numpy_state_loaded(saved: list) -> tuple:
    return (saved[0], saved[1].cpu().numpy().astype(np.uint32), *saved[2:])

