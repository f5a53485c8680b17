"""Parsing of config options that may arrive as text from the command line.

``python -m monai.bundle run --key false`` passes the *string* "false" (truthy in Python), so switches
read from configs go through :func:`as_bool`, which accepts booleans and their usual spellings only.
"""
from __future__ import annotations

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
