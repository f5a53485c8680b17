"""The command line of this repository's packages: ``python -m <package> <command> [--flags]`` and
``python -m <package> <command> --help``, from a table of commands.

Commands are imported only when chosen, so ``--help`` of one does not pay for ITK or MONAI imports of
another. An InputError ends the command with its message and exit status 2, without a traceback.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence

import fire

from .volumes import InputError

Commands = Mapping[str, tuple[str, str, str]]  # command -> (module, function, one-line summary)


def usage(program: str, commands: Commands) -> str:
    width = max(map(len, commands))
    lines = [f"usage: {program} <command> [--flags]   ({program} <command> --help)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in commands.items()]
    return "\n".join(lines)


def run_command(program: str, commands: Commands, argv: Sequence[str] | None = None,
                moved: Mapping[str, str] | None = None) -> int:
    """Run the command ``argv`` names (``sys.argv[1:]`` when None) with python-fire; return the exit status.
    ``moved``: former commands -> the command line that replaces them, named in the error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(program, commands))
        return 0
    if argv[0] in (moved or {}):
        print(f"error: {program} {argv[0]} moved: run {moved[argv[0]]}", file=sys.stderr)
        return 2
    if argv[0] not in commands:
        print(f"error: unknown command {argv[0]!r}\n\n{usage(program, commands)}", file=sys.stderr)
        return 2
    module, attr, _ = commands[argv[0]]
    command = getattr(importlib.import_module(module), attr)
    try:
        fire.Fire(command, command=argv[1:], name=f"{program} {argv[0]}")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
