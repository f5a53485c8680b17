"""The two command lines, ``python -m data_prep`` (data preparation) and ``python -m workflows`` (the demo,
its report, packaging), both dispatched by ``brainage_core.cli``."""
import subprocess
import sys

import pytest

from data_prep.__main__ import main as data_prep_main
from workflows.__main__ import main as workflows_main

CLIS = {
    "data_prep": (data_prep_main, ("ingest-ixi", "ingest-bids", "ingest-csv", "ingest-dicom", "preprocess",
                                   "simulate-cohort", "validate")),
    "workflows": (workflows_main, ("demo", "demo-report", "package-bundles")),
}


@pytest.mark.parametrize("package", CLIS)
def test_cli_lists_commands_and_rejects_unknown(capsys, package):
    main, commands = CLIS[package]
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in commands:
        assert name in out
    others = [name for other, (_, names) in CLIS.items() if other != package for name in names]
    assert not [name for name in others if f"  {name} " in out]  # each command lives in one CLI
    assert main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize("package, command", [("data_prep", "simulate-cohort"), ("workflows", "package-bundles")])
def test_cli_runs_as_module(repo_root, package, command):
    proc = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True, text=True, cwd=repo_root)
    assert proc.returncode == 0 and command in proc.stdout


@pytest.mark.parametrize("command", ["demo", "demo-report", "package-bundles"])
def test_data_prep_names_where_a_moved_command_went(capsys, command):
    assert data_prep_main([command, "--out", "x"]) == 2
    assert f"python -m data_prep {command} moved: run python -m workflows {command}" in capsys.readouterr().err
