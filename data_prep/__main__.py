"""Command line: ``python -m data_prep <command> [--flags]``; ``python -m data_prep <command> --help``.

Commands are imported only when chosen, so ``--help`` of one does not pay for ITK or MONAI imports of
another.
"""
from __future__ import annotations

import importlib
import sys

import fire

from brainage_core.volumes import InputError

COMMANDS = {
    "ingest-ixi": ("data_prep.ingest", "ingest_ixi", "IXI demographics + T1 folder -> datalist JSON"),
    "ingest-bids": ("data_prep.ingest", "ingest_bids", "BIDS participants.tsv + sub-*/anat T1w -> datalist JSON"),
    "ingest-csv": ("data_prep.ingest", "ingest_csv", "any CSV/TSV of image paths and ages -> datalist JSON"),
    "ingest-dicom": ("data_prep.dicom", "ingest_dicom", "folder of DICOM series -> NIfTI T1 volumes + datalist JSON"),
    "preprocess": ("data_prep.preprocess", "preprocess_command", "raw T1 heads -> brain volumes on the canonical grid"),
    "simulate-cohort": ("data_prep.simulate", "simulate_cohort", "simulated ageing cohort on MNI152 anatomy"),
    "validate": ("data_prep.validate", "validate_command", "check a datalist and its images before a run; lists every problem"),
    "demo": ("data_prep.demo", "run_demo", "the main job end to end on the simulated cohort"),
    "demo-report": ("data_prep.demo_report", "write_report", "rewrite the demo's report.md and report.html"),
    "package-bundles": ("data_prep.packaging", "package_bundles", "each bundle as a self-contained Model Zoo zip"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m data_prep <command> [--flags]   (python -m data_prep <command> --help)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, attr, _ = COMMANDS[argv[0]]
    command = getattr(importlib.import_module(module), attr)
    try:
        fire.Fire(command, command=argv[1:], name=f"python -m data_prep {argv[0]}")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
