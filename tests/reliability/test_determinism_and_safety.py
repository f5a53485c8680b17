"""Determinism (same seed and config on CPU, same losses) and safety (weights-only loading, nothing from a
datalist or a user file evaluated as code)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.data import load_decathlon_datalist
from monai.handlers import from_engine
from reliability_helpers import BUNDLES, GAN_TINY, REPO, SLICE_TINY

from brainage_core.checkpoints import load_weights
from brainage_core.checks import user_error_message
from brainage_core.datalist import read_datalist
from brainage_core.volumes import InputError

LOSSES = {
    "slice_cnn_brainage": (SLICE_TINY, {"train#dataloader#batch_size": 2}, lambda out: from_engine(["loss"], first=True)(out)),
    "tgb_gan_augment": (GAN_TINY, {"batch_size": 2}, lambda out: out[0]["losses"]["g_loss"] + out[0]["losses"]["d_loss"]),
}


def _first_epoch_losses(bundle: str, root: Path, cohort: Path, **override) -> list[float]:
    tiny, batches, loss_of = LOSSES[bundle]
    workflow = ConfigWorkflow(config_file=str(BUNDLES / bundle / "configs" / "train.json"), workflow_type=None,
                              bundle_root=str(root), dataset_dir=str(cohort),
                              **{**tiny, **batches, "train#trainer#max_epochs": 1, **override})
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(float(loss_of(engine.state.output))))
    workflow.run()
    return losses


@pytest.mark.parametrize("bundle", LOSSES)
def test_same_seed_and_config_give_identical_first_epoch_losses(tmp_path, cohort, bundle):
    first = _first_epoch_losses(bundle, tmp_path / "a", cohort)
    second = _first_epoch_losses(bundle, tmp_path / "b", cohort)
    assert len(first) == 4 and first == second  # 8 training volumes in batches of 2, bit for bit
    if bundle == "slice_cnn_brainage":  # and the seed matters (so the comparison can fail)
        assert _first_epoch_losses(bundle, tmp_path / "c", cohort, seed=1) != first


class _Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_bearing(path: Path, marker: Path, **tensors) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**tensors, "payload": _Payload(marker)}, path)
    return path


def test_a_pickle_bearing_checkpoint_is_refused_unopened(tmp_path):
    marker = tmp_path / "code_ran"
    path = _pickle_bearing(tmp_path / "model.pt", marker, model={"w": torch.zeros(2)})
    with pytest.raises(InputError) as err:
        load_weights(path)
    assert str(err.value) == (f"{path}: refused: the file holds pickled Python objects, not only tensors; "
                              "checkpoints are loaded with weights_only=True and never unpickled")
    assert not marker.exists()


@pytest.mark.parametrize("bundle, configs, file", [
    ("slice_cnn_brainage", ["train"], "checkpoint_resume.pt"),  # the resume checkpoint of a training run
    ("slice_cnn_brainage", ["train", "evaluate"], "model.pt"),
    ("tgb_gan_augment", ["inference"], "model.pt"),
])
def test_bundles_refuse_pickle_bearing_checkpoints(tmp_path, cohort, bundle, configs, file):
    marker = tmp_path / "code_ran"
    _pickle_bearing(tmp_path / "models" / file, marker, model={"w": torch.zeros(2)})
    tiny = SLICE_TINY if bundle == "slice_cnn_brainage" else {k: v for k, v in GAN_TINY.items() if k.startswith(("image", "network"))}
    workflow = ConfigWorkflow(config_file=[str(BUNDLES / bundle / "configs" / f"{c}.json") for c in configs],
                              workflow_type=None, bundle_root=str(tmp_path), dataset_dir=str(cohort), **tiny)
    with pytest.raises(Exception) as err:
        workflow.initialize()
        workflow.run()
    assert "refused: the file holds pickled Python objects" in user_error_message(err.value)
    assert not marker.exists()


def test_every_torch_load_in_the_code_is_weights_only():
    folders = ("brainage_core", "custom_components", "data_prep", "workflows", "bundles", "benchmarks")
    sources = [p for folder in folders for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".json")]
    calls = []
    for path in sources:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 1, match.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            calls.append((path.relative_to(REPO), text[match.start():end]))
    assert calls, "no torch.load found: the scan is broken"
    unsafe = [(str(path), call) for path, call in calls if "weights_only=True" not in call]
    assert not unsafe


def test_datalist_values_are_data_never_code(tmp_path, cohort):
    """Neither the validator, the datalist reader the configs use, nor a bundle evaluates a datalist value."""
    marker = tmp_path / "code_ran"
    attack = f"__import__('pathlib').Path('{marker}').touch()"
    splits = read_datalist(cohort / "datalist.json")
    splits["training"][0]["age"] = attack
    splits["training"][1]["subject"] = "$" + attack  # config-expression syntax, in data
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(splits))
    assert load_decathlon_datalist(str(path), True, "training")[1]["subject"] == "$" + attack
    workflow = ConfigWorkflow(config_file=str(BUNDLES / "slice_cnn_brainage" / "configs" / "train.json"), workflow_type=None,
                              bundle_root=str(tmp_path / "root"), dataset_dir=str(tmp_path), **SLICE_TINY)
    with pytest.raises(Exception) as err:
        workflow.initialize()
    assert re.search(r"training\[0\] \(subject sub00\): age \"__import__\(.*\.\.\. is not a number", user_error_message(err.value))
    assert not marker.exists()
