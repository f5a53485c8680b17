"""Command line: ``python -m workflows <command> [--flags]``; ``python -m workflows <command> --help``.

Commands are imported only when chosen (``brainage_core.cli``). Data preparation is ``python -m data_prep``.
"""
from __future__ import annotations

import sys

from brainage_core.cli import run_command

COMMANDS = {
    "demo": ("workflows.demo", "run_demo", "the main job end to end on the simulated cohort"),
    "demo-report": ("workflows.demo_report", "write_report", "rewrite the demo's report.md and report.html"),
    "package-bundles": ("workflows.packaging", "package_bundles", "each bundle as a self-contained Model Zoo zip"),
}


def main(argv: list[str] | None = None) -> int:
    return run_command("python -m workflows", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
