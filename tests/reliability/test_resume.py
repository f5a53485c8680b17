"""Crashes: a training run killed with SIGKILL resumes from its last epoch when the same command runs again;
checkpoints are replaced whole or not at all; synthesis and preprocessing redo only what is missing and leave
no partial files."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.handlers import CheckpointSaver
from reliability_helpers import BUNDLES, GAN_TINY, SLICE_TINY, bundle_command

from brainage_core.datalist import read_datalist
from custom_components.common.resume import AtomicCheckpointSaver
from custom_components.tgb_gan import synthesis
from custom_components.tgb_gan.networks import TGBGenerator
from custom_components.tgb_gan.synthesis import LatentSet, synthesise
from data_prep.preprocess import preprocess_datalist

MAX_EPOCHS = 3
ITERATIONS = 4  # per epoch: 8 training volumes in batches of 2
BUNDLE_CASES = {
    "slice_cnn_brainage": ({**SLICE_TINY, "batch_size": 2}, ["model", "bias_correction", "optimizer", "training_model",
                                                              "weight_average", "lr_scheduler", "trainer"]),
    "tgb_gan_augment": ({**GAN_TINY, "batch_size": 2}, ["generator", "critic", "regressor", "g_optimizer", "d_optimizer",
                                                          "warmup_optimizer", "branch_optimizer", "g_lr_scheduler", "d_lr_scheduler",
                                                          "branch_lr_scheduler", "trainer"]),
}


def _kill_mid_epoch(command: list[str], cwd: Path, log: Path) -> int:
    """Start ``command``, SIGKILL it once it has logged the first iteration of an epoch after the first (so an
    epoch checkpoint exists and the epoch is unfinished); return that epoch."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not (started := re.search(rf"Epoch: ([2-9])/{MAX_EPOCHS}, Iter: 1/{ITERATIONS} ", log.read_text())):
            assert process.poll() is None, f"run ended before it was killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no second epoch after 240 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL  # killed, not finished
    return int(started.group(1))


def _restored(bundle: str, root: Path, cohort: Path, epochs: int, tiny: dict, stop_after: int | None = None):
    """The training workflow run in this process to ``epochs`` (resuming from ``root``'s checkpoint if any;
    with ``epochs`` = the checkpoint's epoch it only restores); ``stop_after`` ends the run after that epoch,
    as a crash would, with the same settings."""
    workflow = ConfigWorkflow(config_file=str(BUNDLES / bundle / "configs" / "train.json"), workflow_type=None,
                              bundle_root=str(root), dataset_dir=str(cohort),
                              **{**tiny, "train#trainer#max_epochs": epochs})
    workflow.initialize()
    if stop_after is not None:
        trainer = workflow.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda engine: engine.terminate())
    workflow.run()
    return workflow


@pytest.mark.parametrize("bundle", BUNDLE_CASES)
def test_sigkill_mid_training_then_the_same_command_resumes_and_finishes(tmp_path, cohort, bundle):
    tiny, saved = BUNDLE_CASES[bundle]
    root = tmp_path / "root"
    command = bundle_command(bundle, ["train"], root, cohort, **tiny, **{"train#trainer#max_epochs": MAX_EPOCHS})
    resume_file = root / "models" / "checkpoint_resume.pt"
    unfinished = _kill_mid_epoch(command, BUNDLES / bundle, tmp_path / "killed.log")

    at_kill = torch.load(resume_file, weights_only=True)  # whole: never half-written
    assert set(at_kill) == {*saved, "resume_state"}
    assert at_kill["trainer"]["epoch_length"] == ITERATIONS
    killed_epoch = at_kill["trainer"]["iteration"] // ITERATIONS
    assert killed_epoch == unfinished - 1 and at_kill["trainer"]["iteration"] == killed_epoch * ITERATIONS
    best = at_kill["resume_state"]["engines"]["validate"]  # with model.pt's score, so a worse epoch keeps it
    assert 1 <= best["best_metric_epoch"] <= killed_epoch
    savers = at_kill["resume_state"]["best_model_savers"]  # the slice bundle's model.pt and bias_correction.pt
    assert len(savers) == (2 if bundle == "slice_cnn_brainage" else 1)
    for saver_state in savers:
        assert [score for score, _ in saver_state["_saved"]] == [-best["best_metric"]]

    # the same command again: resumes and trains the remaining epochs only
    rerun = subprocess.run(command, cwd=BUNDLES / bundle, capture_output=True, text=True, timeout=300)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-4000:]
    assert f"resumed from {resume_file}: epoch {killed_epoch}" in log
    assert f"Epoch[{killed_epoch + 1}] Metrics -- " in log and f"Epoch[{killed_epoch}] Metrics" not in log
    final = torch.load(root / "models" / "checkpoint_last.pt", weights_only=True)
    assert final["trainer"]["iteration"] == MAX_EPOCHS * ITERATIONS
    optimizer_key = saved[2] if "optimizer" in saved else saved[3]
    assert final[optimizer_key]["state"][0]["step"] == MAX_EPOCHS * ITERATIONS  # Adam went on counting
    if "g_lr_scheduler" in final:  # stepped per adversarial iteration (the reliability runs have no warm-up)
        assert final["g_lr_scheduler"]["last_epoch"] == MAX_EPOCHS * ITERATIONS
    if "lr_scheduler" in final:  # per-iteration schedule and weight average went on counting too
        assert final["lr_scheduler"]["last_epoch"] == MAX_EPOCHS * ITERATIONS
        assert int(final["weight_average"]["updates"]) == MAX_EPOCHS * ITERATIONS
    assert not list((root / "models").glob(".*part*"))


def _latents(n: int = 6) -> LatentSet:
    generator = TGBGenerator(encoder_channels=(4, 8), decoder_channels=(8, 4))
    with torch.no_grad():
        codes = generator.encode(torch.rand(n, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)))
    records = [{"image": f"/data/s{i}.nii.gz", "age": 30.0 + (i % 2) * 0.2, "subject": f"s{i}"} for i in range(n)]
    return generator, LatentSet(codes, np.array([r["age"] for r in records]), records, np.diag([4.0, 4.0, 4.0, 1.0]))


def test_synthesis_resumes_without_rewriting_finished_volumes(tmp_path, cohort, monkeypatch):
    generator, latents = _latents()
    options = dict(generator=generator, latents=latents, datalist_file=str(cohort / "datalist.json"),
                   output_dir=str(tmp_path), target_per_bin=10, seed=0, batch_size=2, progress=False)
    images = tmp_path / "synthetic" / "images"
    writes: list[str] = []
    real_save = synthesis.save_nifti

    def crashing_save(data, affine, path, dtype=np.float32):
        if len(writes) == 3:
            raise KeyboardInterrupt("simulated crash")
        writes.append(Path(path).name)
        return real_save(data, affine, path, dtype)

    monkeypatch.setattr("custom_components.tgb_gan.synthesis.save_nifti", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        synthesise(**options)
    assert sorted(p.name for p in images.glob("syn_*")) == ["syn_0000.nii.gz", "syn_0001.nii.gz", "syn_0002.nii.gz"]
    assert not (tmp_path / "synthetic" / "datalist.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in images.glob("syn_*")}
    (images / ".syn_0003.nii.gz.x1y2.part.nii.gz").write_bytes(b"half")  # a write killed midway
    writes.clear()
    monkeypatch.setattr("custom_components.tgb_gan.synthesis.save_nifti", real_save)
    path = synthesise(**options)
    datalist = json.loads(path.read_text())
    assert datalist["n_synthetic"] == 4  # one bin of 6 codes topped up to 10
    assert sorted(p.name for p in images.iterdir()) == ["plan.json"] + [f"syn_{i:04d}.nii.gz" for i in range(4)]
    assert {name: (images / name).stat().st_mtime_ns for name in before} == before  # not rewritten
    # a different plan (another seed) replaces every volume
    synthesise(**{**options, "seed": 1})
    assert all((images / name).stat().st_mtime_ns != mtime for name, mtime in before.items())
    assert read_datalist(path)["training"][-1]["subject"] == "syn_0003"


def test_preprocessing_removes_partial_files_of_a_killed_run(tmp_path):
    out = tmp_path / "prep"
    (out / "images").mkdir(parents=True)
    partial = out / "images" / ".sub-1.nii.gz.abcd.part.nii.gz"
    partial.write_bytes(b"half a volume")
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": str(tmp_path / "bad.nii.gz"), "age": 40, "subject": "sub-1"}]}))
    summary = preprocess_datalist(datalist, out, resolution=4, workers=1)
    assert not partial.exists()
    assert [f["subject"] for f in summary.failures] == ["sub-1"]
    assert "not a readable NIfTI image" in (out / "failures.csv").read_text()


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, cohort):
    """Networks, their average, optimiser, schedule, trainer and random states (augmentation included) all
    come back: a 2-epoch run stopped after epoch 1 and started again gives, bit for bit, the weights of one
    uninterrupted 2-epoch run."""
    tiny = BUNDLE_CASES["slice_cnn_brainage"][0]
    whole = _restored("slice_cnn_brainage", tmp_path / "whole", cohort, 2, tiny)
    _restored("slice_cnn_brainage", tmp_path / "split", cohort, 2, tiny, stop_after=1)
    resumed = _restored("slice_cnn_brainage", tmp_path / "split", cohort, 2, tiny)
    assert resumed.parser.get_parsed_content("train#trainer").state.iteration == 2 * ITERATIONS
    for name in ("network", "ema"):
        expected = whole.parser.get_parsed_content(name)
        got = resumed.parser.get_parsed_content(name)
        expected, got = (getattr(x, "module", x).state_dict() for x in (expected, got))
        for key, value in got.items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    # the best validation metric and the best-model list span both epochs, as in the uninterrupted run
    for engine in ("validate#evaluator", "train#trainer"):
        states = [run.parser.get_parsed_content(engine).state for run in (whole, resumed)]
        assert [(s.best_metric, s.best_metric_epoch) for s in states] == [(states[0].best_metric, states[0].best_metric_epoch)] * 2
        assert states[0].best_metric_epoch >= 1
    savers = [[h for h in run.parser.get_parsed_content("validate#handlers") if isinstance(h, CheckpointSaver)][0]
              for run in (whole, resumed)]
    assert savers[1]._key_metric_checkpoint.state_dict() == savers[0]._key_metric_checkpoint.state_dict()


def test_checkpoint_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    network = torch.nn.Linear(2, 1)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": network}, save_final=True, final_filename="last.pt")
    engine = Engine(lambda engine, batch: None)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    first = torch.load(tmp_path / "last.pt", weights_only=True)  # one object: saved as its state dict
    assert (tmp_path / "last.pt").stat().st_mode & 0o044 == 0o044  # readable by group and others
    real_save = torch.save

    def killed_midway(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(10)
        raise KeyboardInterrupt("killed while writing")

    with torch.no_grad():
        network.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0], max_epochs=1)
    monkeypatch.setattr(torch, "save", real_save)
    kept = torch.load(tmp_path / "last.pt", weights_only=True)  # the previous file, whole
    torch.testing.assert_close(kept["weight"], first["weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
