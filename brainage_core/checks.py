"""Up-front checks of a run's inputs and outputs, so that a long run does not fail hours in, and errors
that reach the user as one message.

``validate_datalist`` (and ``validate_records`` for records in memory: a list, or splits of lists) checks,
in one pass:

- the datalist: readable JSON, the requested splits present, non-empty and lists of records;
- every record: an ``image`` key, the target (``age`` or ``label``) present when required and a finite
  number (``age`` >= 0, ``label`` 0 or 1; values are type-checked, never evaluated), the image inside the
  dataset folder when one is given, no subject twice in a split nor in two splits;
- every image: a readable 3D NIfTI (not truncated, one volume, no NaN/Inf, not constant; the voxel
  checks of ``volumes.load_volume``), integer or float voxels, an axis-aligned affine with isotropic
  voxels, and a shape (after reorientation to RAS, as the bundles load it) equal to the model's
  ``image_size`` unless ``on_shape_mismatch="resample"``.

All problems are collected and raised as one InputError, one line per problem naming the split, row and
file. Harmless findings (an image stored in another orientation, one that will be resized) are returned
as notes. ``check_output_dir`` fails early on an output folder that cannot be created or written, or
whose disk is nearly full. CLI: ``python -m data_prep validate --datalist D``.

In a bundle run, ``load_split`` reads a datalist split after checking its file and records, and
``check_bundle_inputs`` (the ``initialize`` step of the configs) checks the output folders and every
image the run will read. ``python -m monai.bundle run`` wraps every error of a config expression in
"Failed to evaluate ..." and prints the whole traceback; both install ``clean_excepthook``: an uncaught
error whose cause is an InputError, or a bad argument of a component the config builds (unknown encoder
or aggregation name, unusable pretrained weights), is printed as one ``error: ...`` message without the
traceback (``BRAINAGE_TRACEBACK=1`` shows it).
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .options import as_image_size, as_names
from .volumes import InputError, load_volume

SHAPE_POLICIES = ("refuse", "resample")
TARGET_KEYS = ("age", "label")
MIN_FREE_MB = 200
MAX_LISTED = 100  # problems listed in one error; the rest are counted
OBLIQUE_TOLERANCE_DEG = 1.0
ANISOTROPY_TOLERANCE = 0.01  # relative difference of voxel sizes
PREPROCESS_HINT = "put it on the canonical grid first (python -m data_prep preprocess)"
LOCK_FILE = ".brainage.lock"
_LOCKS: dict[Path, int] = {}  # output folder -> this process's open, locked lock file (held until it exits)
# the characters str.splitlines breaks at, escaped in messages so that each problem stays on its own line
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}
TRACEBACK_ENV = "BRAINAGE_TRACEBACK"
_BUILD_ERROR = re.compile(r"Failed to instantiate component '([^']+)'")
logger = logging.getLogger(__name__)


@dataclass
class ValidationReport:
    """What a validation found: problems (fatal), notes (harmless), records checked per split."""

    source: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def raise_problems(self) -> ValidationReport:
        """Raise one InputError listing every problem (the first MAX_LISTED); return self when there is none."""
        if not self.problems:
            return self
        lines = [f"  - {p.translate(_LINE_BREAKS)}" for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"  ... and {len(self.problems) - MAX_LISTED} more")
        raise InputError(f"{self.source.translate(_LINE_BREAKS)}: {len(self.problems)} problem(s) found before the run "
                         "started:\n" + "\n".join(lines))

    def __str__(self) -> str:
        listed = ", ".join(f"{name} {n}" for name, n in self.counts.items())
        lines = [f"{self.source}: OK ({listed} records; {len(self.problems)} problems)"]
        lines += [f"  note: {n}" for n in self.notes[:MAX_LISTED]]
        return "\n".join(lines)


def validate_datalist(datalist: str | os.PathLike, splits: Sequence[str] | None = None,
                      target_key: str | None = "age", image_size: Sequence[int] | None = None,
                      on_shape_mismatch: str = "refuse", dataset_root: str | os.PathLike | None = None,
                      check_voxels: bool = True, check_images: bool = True) -> ValidationReport:
    """Check a datalist JSON and every image it lists (module docstring); raise InputError listing all problems.

    ``splits``: the splits a run reads (all list-valued top-level keys when None). Relative image paths
    are read from the datalist's folder, as ``monai.data.load_decathlon_datalist`` does. ``check_images``
    False checks the file and its records only, without opening an image.
    """
    path = Path(datalist)
    report = ValidationReport(str(path))
    content = _read_json(path)
    if not isinstance(content, dict):
        raise InputError(f"{path}: a datalist is a JSON object of splits, not a {type(content).__name__}")
    found = [key for key, value in content.items() if isinstance(value, list)]
    wanted = list(found if splits is None else as_names(splits))
    records: dict[str, list] = {}
    for split in wanted:
        if split not in content:
            report.problems.append(f"no '{split}' split (the datalist has: {', '.join(content) or 'nothing'})")
        elif not isinstance(content[split], list):
            report.problems.append(f"split '{split}' is a {type(content[split]).__name__}, not a list of records")
        elif not content[split]:
            report.problems.append(f"split '{split}' is empty")
        else:
            records[split] = content[split]
    _check_splits(records, report, path.resolve().parent, target_key, image_size, on_shape_mismatch,
                  dataset_root, check_voxels, check_images)
    return report.raise_problems()


def validate_records(records: Iterable[dict] | Mapping[str, Iterable[dict]], source: str = "records",
                     target_key: str | None = None, image_size: Sequence[int] | None = None,
                     on_shape_mismatch: str = "refuse", dataset_root: str | os.PathLike | None = None,
                     check_voxels: bool = True) -> ValidationReport:
    """``validate_datalist`` for records already read or passed in memory: one list, or splits (name ->
    list; no subject in two of them); paths relative to the working directory."""
    report = ValidationReport(source)
    named = records.items() if isinstance(records, Mapping) else [("records", records)]
    splits = {}
    for name, rows in named:
        if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
            report.problems.append(f"'{name}' is a {type(rows).__name__}, not a list of records")
        elif not (rows := list(rows)):
            report.problems.append(f"'{name}' is empty" if isinstance(records, Mapping) else "no records")
        else:
            splits[name] = rows
    _check_splits(splits, report, Path.cwd(), target_key, image_size, on_shape_mismatch, dataset_root, check_voxels)
    return report.raise_problems()


def _check_splits(splits: dict[str, list], report: ValidationReport, base: Path, target_key: str | None,
                  image_size, on_shape_mismatch: str, dataset_root, check_voxels: bool,
                  check_images: bool = True) -> None:
    if on_shape_mismatch not in SHAPE_POLICIES:
        raise InputError(f"on_shape_mismatch must be one of {', '.join(SHAPE_POLICIES)}, got {on_shape_mismatch!r}")
    if target_key is not None and target_key not in TARGET_KEYS:
        raise InputError(f"target_key must be one of {', '.join(TARGET_KEYS)} (or none), got {target_key!r}")
    size = None if image_size is None else as_image_size(image_size)
    root = None if dataset_root is None else Path(dataset_root).resolve()
    seen_in: dict[str, dict[str, int]] = {}  # subject -> {split: first row}
    checked: dict[Path, tuple[list[str], list[str]]] = {}
    for split, records in splits.items():
        report.counts[split] = len(records)
        for row, record in enumerate(records):
            where = f"{split}[{row}]"
            if not isinstance(record, dict):
                report.problems.append(f"{where}: a record is a JSON object, not {_short(record)}")
                continue
            if "subject" in record:
                where += f" (subject {record['subject']})"
            report.problems += [f"{where}: {p}" for p in _record_problems(record, target_key)]
            if not isinstance(record.get("image"), str):
                continue
            image = (base / record["image"]).resolve()
            if root is not None and not image.is_relative_to(root):
                report.problems.append(f"{where}: image {record['image']} lies outside the dataset folder {root}")
                continue
            if check_images:
                if image not in checked:
                    checked[image] = check_image(image, size, on_shape_mismatch, check_voxels)
                problems, notes = checked[image]
                report.problems += [f"{where}: {p}" for p in problems]
                report.notes += notes
            subject = str(record.get("subject", image))
            rows = seen_in.setdefault(subject, {})
            if split in rows:
                report.problems.append(f"{where}: subject {subject} is listed twice in '{split}' "
                                       f"(also at {split}[{rows[split]}])")
            elif rows:
                other, other_row = next(iter(rows.items()))
                report.problems.append(f"{where}: subject {subject} is in two splits ('{other}' row {other_row} and "
                                       f"'{split}'): a subject's scans must all be in one split")
            rows.setdefault(split, row)
    report.notes = sorted(set(report.notes))


def _record_problems(record: dict, target_key: str | None) -> list[str]:
    problems = []
    if "image" not in record:
        problems.append(f"no 'image' key (keys: {', '.join(map(str, record)) or 'none'})")
    elif not isinstance(record["image"], str):
        problems.append(f"image {_short(record['image'])} is not a file path")
    if target_key is not None and target_key not in record:
        problems.append(f"no '{target_key}' key (keys: {', '.join(map(str, record))})")
    for key in TARGET_KEYS:
        if key in record:
            problem = _target_problem(key, record[key])
            if problem:
                problems.append(problem)
    return problems


def _target_problem(key: str, value) -> str | None:
    """Why ``value`` is not a usable ``age`` / ``label``; None when it is. Only types and comparisons: a text
    value is reported as such, never parsed or evaluated."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{key} {_short(value)} is not a number"
    if not math.isfinite(value):
        return f"{key} {value} is not a finite number"
    if key == "age" and value < 0:
        return f"age {value} is negative"
    if key == "label" and value not in (0, 1):
        return f"label {value} is not 0 (cognitively normal) or 1 (Alzheimer's disease)"
    return None


def check_image(path: str | os.PathLike, image_size: Sequence[int] | None = None, on_shape_mismatch: str = "refuse",
                check_voxels: bool = True) -> tuple[list[str], list[str]]:
    """Problems and notes of one image file (each naming the file). The header checks read the header
    only; ``check_voxels`` also decodes the voxels (truncated files, NaN/Inf, constant images)."""
    path = Path(path)
    if not path.is_file():
        return [f"{path}: file not found"], []
    try:
        img = nib.load(str(path))  # reads the header only
    except Exception as err:  # nibabel raises many types for a file that is not an image it knows
        return [f"{path}: not a readable NIfTI image ({type(err).__name__}: {err})"], []
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return [f"{path}: a {type(img).__name__}, not a NIfTI image (.nii / .nii.gz)"], []
    dtype = img.get_data_dtype()
    if dtype.kind not in "iuf":
        return [f"{path}: voxel type {dtype} is not supported; integer or float voxels are needed"], []
    problems, notes = _geometry(path, img, image_size, on_shape_mismatch)
    if check_voxels and not problems:
        try:
            load_volume(path)
        except InputError as err:
            problems.append(str(err))
    return problems, notes


def _geometry(path: Path, img, image_size, on_shape_mismatch: str) -> tuple[list[str], list[str]]:
    shape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
    if len(shape) != 3:
        detail = f"4D image with {shape[3]} volumes" if len(shape) == 4 else f"image of shape {tuple(shape)}"
        return [f"{path}: {detail}; a single 3D volume is needed"], []
    axes = img.affine[:3, :3]
    voxel = np.linalg.norm(axes, axis=0)
    if not np.isfinite(img.affine).all() or voxel.min() == 0 or abs(np.linalg.det(axes)) < 1e-12:
        return [f"{path}: the affine (voxel-to-world matrix) is singular or not finite"], []
    problems, notes = [], []
    tilt = float(np.degrees(np.arccos(np.clip(np.abs(axes / voxel).max(axis=0).min(), -1.0, 1.0))))
    if tilt > OBLIQUE_TOLERANCE_DEG:
        problems.append(f"{path}: oblique voxel axes ({tilt:.1f} degrees from the nearest RAS axes); {PREPROCESS_HINT}")
    if voxel.max() > voxel.min() * (1 + ANISOTROPY_TOLERANCE):
        sizes = " x ".join(f"{v:.2f}" for v in voxel)
        problems.append(f"{path}: anisotropic voxels ({sizes} mm); {PREPROCESS_HINT}")
    codes = "".join(nib.aff2axcodes(img.affine))
    if codes != "RAS":
        notes.append(f"{path}: stored as {codes}, reoriented to RAS when loaded")
    ras_shape = [0, 0, 0]
    for axis, (ras_axis, _) in enumerate(nib.orientations.io_orientation(img.affine)):
        ras_shape[int(ras_axis)] = int(shape[axis])
    if image_size is not None and tuple(ras_shape) != tuple(image_size):
        message = (f"{path}: shape {tuple(ras_shape)} (in RAS) differs from the model's image_size "
                   f"{tuple(image_size)}")
        if on_shape_mismatch == "refuse":
            problems.append(f"{message}; set on_shape_mismatch to 'resample' to resize it on loading, or {PREPROCESS_HINT}")
        else:
            notes.append(f"{message}; resized on loading (on_shape_mismatch = 'resample')")
    return problems, notes


def check_output_dir(folder: str | os.PathLike, min_free_mb: float = MIN_FREE_MB) -> Path:
    """Create ``folder`` if needed and check that a file can be written there and that its disk has at
    least ``min_free_mb`` MiB free; raise InputError naming the folder and the problem otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise InputError(f"{folder}: output folder cannot be written ({err.strerror or err}); "
                         "choose another folder or fix its permissions") from None
    free_mb = shutil.disk_usage(folder).free / 2**20
    if free_mb < float(min_free_mb):
        raise InputError(f"{folder}: only {free_mb:.0f} MiB free on its disk, at least {float(min_free_mb):.0f} MiB "
                         "needed (min_free_mb); free some space or choose another folder")
    return folder


def lock_output_dir(folder: str | os.PathLike) -> Path:
    """Hold an exclusive lock on ``folder`` (``.brainage.lock`` in it) for the rest of this process, so that a
    second run writing into the same folder at the same time is refused with an InputError naming the
    folder and the run holding it. The operating system drops the lock when its process ends, however it
    ends (a killed run leaves no stale lock). Taking it again in the same process is a no-op; the non-zero
    ranks of a multi-GPU run (``RANK`` > 0) write through rank 0 and take none. POSIX ``flock``: not
    reliable on every network file system."""
    folder = Path(folder).resolve()
    if folder in _LOCKS or int(os.environ.get("RANK", "0")) > 0:
        return folder
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise InputError(f"{folder} is in use by another run ({holder}); wait for it to end, or give this run "
                         "another output folder (--bundle_root, --output_dir or --out_dir)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    _LOCKS[folder] = fd
    return folder


def release_output_dirs() -> None:
    """Drop every output-folder lock this process holds, once its runs have ended: for a process that runs one
    bundle run after another and lives on (a worker of the augmentation study), so that another process
    may then write into those folders."""
    while _LOCKS:
        os.close(_LOCKS.popitem()[1])  # closing the descriptor drops its flock


def remove_partial_writes(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that ``volumes.atomic_path`` leaves when its process is killed
    (``.<name>.<random>.part<suffix>``) in ``folder``; return them."""
    folder = Path(folder)
    stale = [p for p in folder.glob(".*.part*") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# ------------------------------------------------------------------------------------------ bundle runs


def check_bundle_inputs(data, target_key: str | None = None, image_size: Sequence[int] | None = None,
                        on_shape_mismatch: str = "refuse", output_dirs: Sequence[str] = (),
                        min_free_mb: float = 200) -> ValidationReport:
    """The input check of a bundle run: output folders writable with ``min_free_mb`` MiB free, then the
    records the run will read, every image included: ``data`` is what the datasets get (``train#dataset#data``
    and ``validate#dataset#data`` as ``{split: records}``, or one list), whether read from the datalist file
    or passed in memory (``monai.bundle.run(..., **{"train#dataset#data": records})``).

    Raises InputError listing every problem; logs the notes (reoriented or resized images).
    """
    report_errors_cleanly()
    for folder in output_dirs:
        lock_output_dir(check_output_dir(folder, min_free_mb))
    sources = {getattr(records, "source", None) for records in (data.values() if isinstance(data, Mapping) else [data])}
    source = next(iter(sources)) if len(sources) == 1 and None not in sources else "input images"
    report = validate_records(data, source, target_key=target_key, image_size=image_size,
                              on_shape_mismatch=on_shape_mismatch)
    for note in report.notes:
        logger.info(note)
    logger.info(str(report).splitlines()[0])
    return report


class DatalistRecords(list):
    """Records read from a datalist file, which ``check_bundle_inputs`` names in its messages."""

    def __init__(self, records, source: str) -> None:
        super().__init__(records)
        self.source = source


def load_split(datalist_file: str | os.PathLike, split: str, splits: Sequence[str] | None = None) -> DatalistRecords:
    """``monai.data.load_decathlon_datalist(datalist_file, True, split)`` after checking the file and the
    records of ``splits`` (``split`` when None) without opening an image (``check_bundle_inputs`` checks the
    images of what the run reads): an InputError naming the file and listing every problem, never a
    traceback from a malformed datalist."""
    from monai.data import load_decathlon_datalist  # here: data_prep's commands use this module without MONAI

    report_errors_cleanly()
    validate_datalist(datalist_file, [split] if splits is None else splits, target_key=None, check_images=False)
    return DatalistRecords(load_decathlon_datalist(datalist_file, True, split), str(datalist_file))


# ------------------------------------------------------------------------------------------ clean errors


def user_error_message(error: BaseException) -> str | None:
    """The message to show instead of a traceback: the InputError in ``error``'s chain of causes, or the
    innermost ValueError/TypeError/FileNotFoundError of a component the config failed to build; else None."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for item in chain:
        if isinstance(item, InputError):
            return str(item)
    built = [m.group(1) for item in chain if (m := _BUILD_ERROR.search(str(item)))]
    if built and isinstance(chain[-1], (ValueError, TypeError, FileNotFoundError)):
        return f"{chain[-1]} (while building {built[-1]})"
    return None


def clean_excepthook(kind, value, traceback, fallback=sys.__excepthook__) -> None:
    """``sys.excepthook`` that prints user errors (``user_error_message``) as one message."""
    message = user_error_message(value)
    if message is None or os.environ.get(TRACEBACK_ENV):
        fallback(kind, value, traceback)
        return
    print(f"error: {message}\n({TRACEBACK_ENV}=1 shows the full traceback)", file=sys.stderr)


def report_errors_cleanly() -> None:
    """Install ``clean_excepthook`` for this process, in front of the current hook (once)."""
    if getattr(sys.excepthook, "__wrapped__", None) is clean_excepthook:
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):
        clean_excepthook(kind, value, traceback, fallback=previous)

    hook.__wrapped__ = clean_excepthook
    sys.excepthook = hook


# ------------------------------------------------------------------------------------------ helpers


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(path: Path):
    if not path.is_file():
        raise InputError(f"{path}: datalist not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
