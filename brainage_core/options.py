"""Parsing of options that may arrive as text from the command line (or as a file).

``python -m monai.bundle run --key false`` passes the *string* "false" (truthy in Python), so switches
read from configs go through :func:`as_bool`, which accepts booleans and their usual spellings only.
Lists may arrive as "a,b,c" (:func:`as_names`, :func:`as_image_size`), a dict as the JSON file holding it
(:func:`as_dict`).
"""
from __future__ import annotations

import json
from pathlib import Path

from .volumes import InputError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0", "none", "null", ""}


def as_bool(value, name: str = "option") -> bool:
    """``value`` as a bool: True/False, 0/1, or a string such as "true"/"False"/"yes"/"off"; else ValueError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if value is None:
        return False
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")


def as_non_negative(value, name: str = "option") -> float:
    """``value`` as a float >= 0 (a number or its text); else ValueError naming the option."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number >= 0:  # NaN too
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return number


def as_names(value) -> list[str]:
    """``value`` as a list of names: "a,b" (spaces around each stripped) or a sequence."""
    return [s.strip() for s in value.split(",")] if isinstance(value, str) else [str(s) for s in value]


def as_image_size(value) -> tuple[int, int, int]:
    """``value`` as a grid shape (X, Y, Z): "48,48,48", a sequence of three, or one int for a cube; else InputError."""
    sizes = as_names(value) if isinstance(value, str) else ([value] * 3 if isinstance(value, int) else list(value))
    try:
        sizes = [int(s) for s in sizes]
    except (TypeError, ValueError):
        sizes = []
    if len(sizes) != 3 or min(sizes) < 1:
        raise InputError(f"image_size must be three positive integers (X, Y, Z), got {value!r}")
    return tuple(sizes)


def as_dict(value, option: str, holds: str) -> dict:
    """``value`` itself when a dict, else the JSON object (of ``holds``) in the file it names; InputError naming
    the file otherwise."""
    if isinstance(value, dict):
        return dict(value)
    path = Path(str(value))
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{option}: give a dict or a JSON file of one; {path}: {err}") from None
    if not isinstance(content, dict):
        raise InputError(f"{path}: {option} are a JSON object of {holds}, not a {type(content).__name__}")
    return content
