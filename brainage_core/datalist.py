"""MONAI datalists: ``{"training": [...], "validation": [...], "test": [...]}`` of subject records.

A record is ``{"image": path, "age": float, "sex": str, "site": str, "subject": id}`` plus ``label``
(0 = cognitively normal, 1 = Alzheimer's disease) when a diagnosis is known. Image paths are written
relative to the datalist's folder when they lie below it, so a dataset folder can be moved as a whole;
MONAI's ``load_decathlon_datalist(..., base_dir=...)`` resolves them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .volumes import atomic_path

SPLITS = ("training", "validation", "test")


def write_datalist(path: str | os.PathLike, splits: dict[str, list[dict]], **extra) -> Path:
    """Write ``splits`` (and any ``extra`` top-level keys) as a datalist JSON, atomically."""
    path = Path(path).resolve()
    root = path.parent
    out = dict(extra)
    for name, records in splits.items():
        out[name] = [_relative_image(rec, root) for rec in records]
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(out, indent=1) + "\n")
    return path


def read_datalist(path: str | os.PathLike) -> dict[str, list[dict]]:
    """Read a datalist and return its splits with absolute image paths."""
    path = Path(path).resolve()
    data = json.loads(path.read_text())
    return {
        name: [{**rec, "image": str((path.parent / rec["image"]).resolve())} for rec in records]
        for name, records in data.items()
        if isinstance(records, list)
    }


def synthetic_records(path: str | os.PathLike) -> list[dict]:
    """The synthetic volumes of a merged real + synthetic datalist (``generate.json``'s): the training records
    flagged ``synthetic``."""
    return [record for record in read_datalist(path)["training"] if record.get("synthetic")]


def _relative_image(record: dict, root: Path) -> dict:
    image = Path(record["image"]).resolve()
    try:
        rel = image.relative_to(root)
    except ValueError:
        rel = image
    return {**record, "image": str(rel)}
