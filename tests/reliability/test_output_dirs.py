"""An output folder that cannot be written, or a full disk, stops a command before any work, naming the folder."""
from __future__ import annotations

import os
from collections import namedtuple
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow
from reliability_helpers import BUNDLES, GAN_TINY, SLICE_TINY

from brainage_core.checks import check_output_dir, user_error_message
from brainage_core.volumes import InputError
from data_prep.__main__ import main as data_prep_main

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def blocked(tmp_path) -> Path:
    """A folder that cannot be created: its parent is a regular file (unwritable even for root)."""
    (tmp_path / "a_file").write_text("")
    return tmp_path / "a_file" / "out"


@pytest.fixture
def full_disk(monkeypatch):
    monkeypatch.setattr("brainage_core.checks.shutil.disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30, 5 * 2**20))


def test_folder_below_a_file_is_reported(blocked):
    with pytest.raises(InputError) as err:
        check_output_dir(blocked)
    assert str(err.value) == f"{blocked}: output folder cannot be written (Not a directory); choose another folder or fix its permissions"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_reported(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    with pytest.raises(InputError, match="output folder cannot be written"):
        check_output_dir(folder)


def test_full_disk_is_reported(tmp_path, full_disk):
    with pytest.raises(InputError) as err:
        check_output_dir(tmp_path, min_free_mb=200)
    assert str(err.value) == (f"{tmp_path}: only 5 MiB free on its disk, at least 200 MiB needed (min_free_mb); "
                              "free some space or choose another folder")


@pytest.mark.parametrize("command", ["simulate-cohort", "preprocess"])
def test_data_prep_commands_stop_before_any_work(tmp_path, cohort, blocked, capsys, command):
    flags = (["--n", "3", "--out", str(blocked)] if command == "simulate-cohort" else
             ["--datalist", str(cohort / "datalist.json"), "--out_dir", str(blocked)])
    assert data_prep_main([command, *flags]) == 2
    assert f"error: {blocked}: output folder cannot be written (Not a directory)" in capsys.readouterr().err


def test_preprocess_refuses_a_full_disk(tmp_path, cohort, full_disk, capsys):
    assert data_prep_main(["preprocess", "--datalist", str(cohort / "datalist.json"), "--out_dir", str(tmp_path / "p")]) == 2
    assert "only 5 MiB free on its disk" in capsys.readouterr().err
    assert not (tmp_path / "p" / "images").exists()


@pytest.mark.parametrize("bundle", ["slice_cnn_brainage", "tgb_gan_augment"])
@pytest.mark.parametrize("problem", ["unwritable", "full"])
def test_bundles_check_their_output_folders_in_initialize(tmp_path, cohort, blocked, bundle, problem):
    tiny = SLICE_TINY if bundle == "slice_cnn_brainage" else GAN_TINY
    root = blocked if problem == "unwritable" else tmp_path / "root"
    override = {**tiny, "min_free_mb": 10**9} if problem == "full" else tiny
    workflow = ConfigWorkflow(config_file=str(BUNDLES / bundle / "configs" / "train.json"), workflow_type=None,
                              bundle_root=str(root), dataset_dir=str(cohort), **override)
    with pytest.raises(Exception) as err:
        workflow.initialize()
    message = user_error_message(err.value)
    expected = "output folder cannot be written" if problem == "unwritable" else "MiB free on its disk, at least"
    assert message.startswith(f"{root / 'models'}: ") and expected in message
