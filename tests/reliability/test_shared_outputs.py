"""Shared outputs: a second run on a folder in use is refused (and a killed run leaves no stale lock); a resume
checkpoint that cannot be read is reported and the run resumes from the one before it."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from ignite.engine import Engine
from reliability_helpers import BUNDLES, SLICE_TINY, bundle_command

from brainage_core.checks import lock_output_dir, release_output_dirs
from brainage_core.volumes import InputError
from custom_components.common.resume import TrainingResume
from data_prep.__main__ import main

TAKER = ("import sys; from brainage_core.checks import lock_output_dir; from brainage_core.volumes import InputError\n"
         "try:\n    lock_output_dir(sys.argv[1]); print('taken')\nexcept InputError as err:\n    print(err)")
HOLDER = "import sys, time; from brainage_core.checks import lock_output_dir; lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(600)"


@pytest.fixture
def held(tmp_path):
    """A folder whose lock another process holds; yields (folder, process)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    yield folder, process
    process.kill()
    process.wait()


def test_a_folder_in_use_is_refused_and_a_killed_holder_leaves_no_stale_lock(held):
    folder, process = held
    with pytest.raises(InputError) as err:
        lock_output_dir(folder)
    assert str(err.value).startswith(f"{folder.resolve()} is in use by another run (pid {process.pid} on ")
    process.kill()
    process.wait()
    assert lock_output_dir(folder) == folder.resolve()  # the lock died with its process
    assert lock_output_dir(folder) == folder.resolve()  # and this process may take it again


def test_a_process_that_lives_on_releases_its_folders_when_its_runs_end(tmp_path):
    """The augmentation study's workers run one bundle run after another; the folders they wrote are then free."""
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
        lock_output_dir(folder)

    def other_process(folder):
        return subprocess.run([sys.executable, "-c", TAKER, str(folder)], capture_output=True, text=True,
                              timeout=60).stdout.strip()

    assert all(other_process(f).startswith(f"{f.resolve()} is in use by another run") for f in folders)
    release_output_dirs()
    assert [other_process(f) for f in folders] == ["taken", "taken"]
    assert lock_output_dir(folders[0]) == folders[0].resolve()  # and this process may take them again
    release_output_dirs()


def test_a_second_training_on_the_same_bundle_root_is_refused(held, cohort):
    root, process = held
    (root / "models").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root / "models")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        command = bundle_command("slice_cnn_brainage", ["train"], root, cohort, **SLICE_TINY)
        result = subprocess.run(command, cwd=BUNDLES / "slice_cnn_brainage", capture_output=True, text=True, timeout=240)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {(root / 'models').resolve()} is in use by another run (pid {holder.pid} on " in result.stderr
    assert not list(root.rglob("*.pt"))


def test_preprocessing_into_a_folder_in_use_is_refused(held, tmp_path, capsys):
    out_dir, process = held
    datalist = tmp_path / "raw.json"
    datalist.write_text('{"training": [{"image": "x.nii.gz", "age": 40}]}')
    assert main(["preprocess", "--datalist", str(datalist), "--out_dir", str(out_dir)]) == 2
    assert f"is in use by another run (pid {process.pid} on " in capsys.readouterr().err


def _resume(tmp_path, network: torch.nn.Module, engine: Engine) -> TrainingResume:
    return TrainingResume(str(tmp_path), {"model": network, "trainer": engine})


def test_an_unreadable_resume_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    network, engine = torch.nn.Linear(2, 1), Engine(lambda engine, batch: None)
    resume = _resume(tmp_path, network, engine)
    engine.state.epoch_length, engine.state.max_epochs = 1, 5
    weights = []
    for epoch in (1, 2):
        engine.state.epoch, engine.state.iteration = epoch, epoch
        with torch.no_grad():
            network.weight.add_(1.0)
        weights.append(network.weight.detach().clone())
        resume.write(engine)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["checkpoint_resume.previous.pt", "checkpoint_resume.pt"]
    with open(resume.path, "r+b") as handle:  # a truncated newest checkpoint
        handle.truncate(100)

    fresh, restart = torch.nn.Linear(2, 1), Engine(lambda engine, batch: None)
    restart.state.max_epochs = 5
    with caplog.at_level(logging.WARNING, logger="custom_components.common.resume"):
        assert _resume(tmp_path, fresh, restart).load(restart)
    assert restart.state.epoch == 1
    torch.testing.assert_close(fresh.weight, weights[0])
    assert f"{resume.path}: not a readable PyTorch checkpoint" in caplog.text
    assert f"resuming from the one before it, {resume.previous}" in caplog.text

    resume.previous.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError) as err:
        _resume(tmp_path, fresh, restart).load(restart)
    assert str(err.value).startswith("no resume checkpoint can be read: ")
    assert str(resume.path) in str(err.value) and str(resume.previous) in str(err.value)
