"""Checkpoints of a bundle run: loaded weights only (never unpickled objects), checked to hold an entry for
every object to restore and tensors with the names and shapes of the configured networks; InputErrors that
name the file and every mismatch.
"""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.handlers import Checkpoint
from torch import nn

from .volumes import InputError

logger = logging.getLogger(__name__)


def load_weights(path: str | os.PathLike, map_location=None):
    """``torch.load(path, weights_only=True)`` with errors that name the file: a file holding pickled
    Python objects (anything but tensors and plain containers) is refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise InputError(f"{path}: refused: the file holds pickled Python objects, not only tensors; "
                             "checkpoints are loaded with weights_only=True and never unpickled") from None
        raise InputError(f"{path}: not a PyTorch checkpoint ({err})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None


def check_checkpoint(path: str | os.PathLike, load_dict: Mapping[str, object], map_location=None) -> dict:
    """Load ``path`` (weights only) and check it holds an entry for every object of ``load_dict`` and that
    each network's tensors have the names and shapes of the configured network; return the checkpoint.

    As ``ignite.handlers.Checkpoint.load_objects``, a ``load_dict`` of one object also accepts a file that
    is that object's state dict. Raises InputError naming the file, the entry and every mismatch.
    """
    checkpoint = load_weights(path, map_location)
    if not isinstance(checkpoint, Mapping):
        raise InputError(f"{path}: holds a {type(checkpoint).__name__}, not a dict of state dicts")
    names = list(load_dict)
    if len(names) == 1 and names[0] not in checkpoint:
        checkpoint = {names[0]: checkpoint}
    missing = [name for name in names if name not in checkpoint]
    if missing:
        raise InputError(f"{path}: has no {', '.join(map(repr, missing))} {'entry' if len(missing) == 1 else 'entries'} "
                         f"(it holds {_listing(checkpoint)}); "
                         "it is not a checkpoint of this bundle and configuration")
    problems = [p for name in names for p in _fit_problems(name, checkpoint[name], unwrap(load_dict[name]))]
    if problems:
        raise InputError(f"{path} does not fit the configured networks (was it trained with other settings or "
                         "by the other bundle?):\n" + "\n".join(f"  - {p}" for p in problems))
    return dict(checkpoint)


def load_checkpoint(path: str | os.PathLike, load_dict: Mapping[str, object], map_location=None,
                    also_required: Sequence[str] = ()) -> dict:
    """``check_checkpoint`` (with the plain entries ``also_required`` present too), then load every entry of
    ``load_dict`` into its object (networks unwrapped from DDP); return the checkpoint."""
    checkpoint = check_checkpoint(path, {**load_dict, **{name: {} for name in also_required}}, map_location)
    Checkpoint.load_objects(to_load={k: unwrap(v) for k, v in load_dict.items()}, checkpoint=checkpoint)
    return checkpoint


def load_initial_weights(network: nn.Module, path: str | os.PathLike | None, exclude: Sequence[str] = (),
                         map_location=None) -> nn.Module:
    """Start ``network`` from the ``model`` entry of another run's checkpoint (e.g. an AD detector from a
    trained brain-age model), leaving out the tensors whose names start with one of ``exclude`` (the output
    layer, whose meaning differs). The rest must fit by name and shape (InputError naming the file and
    every mismatch otherwise). ``path`` None or empty: nothing is loaded."""
    if not path:
        return network
    target = unwrap(network)
    state = check_checkpoint(path, {"model": target}, map_location)["model"]
    kept = {key: value for key, value in state.items() if not key.startswith(tuple(exclude))}
    target.load_state_dict(kept, strict=False)
    logger.info(f"network initialised from {path} ({len(kept)} tensors; left out: {', '.join(exclude) or 'none'})")
    return network


def _fit_problems(name: str, state, target) -> list[str]:
    if not isinstance(target, nn.Module):
        return [] if isinstance(state, Mapping) else [f"{name}: a {type(state).__name__}, not a state dict"]
    if not isinstance(state, Mapping):
        return [f"{name}: a {type(state).__name__}, not a state dict of tensors"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return [f"{name}: the file holds {_listing(state)}, not the network's tensors"]
    expected = target.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    problems = []
    if missing and len(missing) == len(expected):
        return [f"{name}: none of the network's {len(expected)} tensors is in the file (it holds {_listing(state)})"]
    if missing:
        problems.append(f"{name}: missing {_listing(missing)}")
    if unexpected:
        problems.append(f"{name}: unexpected {_listing(unexpected)}")
    for key in sorted(set(state) & set(expected)):
        if state[key].shape != expected[key].shape:
            line = f"{name}: {key} has shape {tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} here"
            if key.startswith("position."):
                line += (f" (the position embedding has one row per slice: trained with {state[key].shape[0]} slices,"
                         f" this config gives {expected[key].shape[0]}; check image_size and slice_axis)")
            problems.append(line)
    return problems


def _listing(keys, limit: int = 6) -> str:
    keys = [str(k) for k in keys]
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown or "nothing"


def unwrap(obj):
    """The network inside a (Distributed)DataParallel wrapper; any other object as it is."""
    return obj.module if isinstance(obj, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else obj
