"""Command line: ``python -m data_prep <command> [--flags]``; ``python -m data_prep <command> --help``.

Commands are imported only when chosen (``brainage_core.cli``). The demo, its report and packaging are
``python -m workflows`` commands.
"""
from __future__ import annotations

import sys

from brainage_core.cli import run_command

COMMANDS = {
    "ingest-ixi": ("data_prep.ingest", "ingest_ixi", "IXI demographics + T1 folder -> datalist JSON"),
    "ingest-bids": ("data_prep.ingest", "ingest_bids", "BIDS participants.tsv + sub-*/anat T1w -> datalist JSON"),
    "ingest-csv": ("data_prep.ingest", "ingest_csv", "any CSV/TSV of image paths and ages -> datalist JSON"),
    "ingest-dicom": ("data_prep.dicom", "ingest_dicom", "folder of DICOM series -> NIfTI T1 volumes + datalist JSON"),
    "preprocess": ("data_prep.preprocess", "preprocess_command", "raw T1 heads -> brain volumes on the canonical grid"),
    "simulate-cohort": ("data_prep.simulate", "simulate_cohort", "simulated ageing cohort on MNI152 anatomy"),
    "validate": ("data_prep.validate", "validate_command", "check a datalist and its images before a run; lists every problem"),
}
MOVED = {name: f"python -m workflows {name}" for name in ("demo", "demo-report", "package-bundles")}


def main(argv: list[str] | None = None) -> int:
    return run_command("python -m data_prep", COMMANDS, argv, MOVED)


if __name__ == "__main__":
    sys.exit(main())
