"""A folder of DICOM series -> anonymised NIfTI T1 volumes and datalist rows for the shared ingest core.

The series are found with ITK/GDCM in any folder layout, one T1-weighted series is picked per patient
and study (by description, else by TR/TE), its age is read from the header, and it is converted to NIfTI
named by an anonymised subject id. The rows then go through ``ingest.rows_to_datalist`` like the other
sources, so every series not used is listed with its reason in ``<datalist stem>_skipped.csv``.

Subject ids are a keyed hash (HMAC-SHA256) of the PatientID: anyone holding the salt and a PatientID can
recompute the id, so set your own secret salt (the default is public). Patient names and IDs are written
nowhere unless a private ``mapping_csv`` is asked for; the skipped table names series by their folder
below the input folder, so keep patient names out of folder names.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import itk
import pandas as pd
from tqdm import tqdm

from brainage_core.volumes import InputError, atomic_path

from .ingest import Row, Skipped, Unusable, rows_to_datalist

DEFAULT_SALT = "brain-age-dicom"
TAGS = {
    "modality": "0008|0060", "description": "0008|103e", "protocol": "0018|1030", "image_type": "0008|0008",
    "series_number": "0020|0011", "study_uid": "0020|000d", "study_date": "0008|0020",
    "patient_id": "0010|0020", "birth_date": "0010|0030", "sex": "0010|0040", "age": "0010|1010",
    "sequence": "0018|0020", "acquisition": "0018|0023", "tr": "0018|0080", "te": "0018|0081",
    "ti": "0018|0082", "pixel_spacing": "0028|0030", "slice_thickness": "0018|0050", "frames": "0028|0008",
}
# Words of series descriptions / protocol names, matched at the start of a word ("t2" also finds "t2w").
NOT_T1 = re.compile(r"(?<![a-z])(t2|flair|pd|dwi|dti|diff|adc|swi|bold|fmri|rest|asl|perf|tof|angio|loc|scout|"
                    r"survey|calib|inv1|inv2|t1map|map|b0)")
T1 = re.compile(r"(?<![a-z])(3d)?(t1|mp-?r|mp2rage|spgr|fspgr|ir-?fspgr|bravo|tfl|tfe)")
# Without a telling description: short TE with short TR (spin or spoiled gradient echo T1), or a gradient
# echo with an inversion pulse (MPRAGE-like, whose TR is the whole shot's, about 2 s).
MAX_T1_TE_MS = 15.0
MAX_T1_TR_MS = 1000.0
MIN_SLICES = 16  # fewer cannot cover a head: localisers, single slices
MAX_SLICE_DEVIATION = 0.05  # of the slice spacing; more means missing or unevenly spaced slices
AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
MAX_AGE_DISAGREEMENT = 1.0  # years between PatientAge (whole units, rounded down) and the dates


@dataclass
class Series:
    files: list[str]
    tags: dict[str, str]
    source: str  # where the series is, for the skipped table: folder below the input, number, description
    subject: str  # anonymised PatientID ("" when the header has none)
    session: str  # anonymised StudyInstanceUID

    @property
    def n_slices(self) -> int:
        return len(self.files) if len(self.files) > 1 else int(_number(self.tags["frames"]) or 1)


def ingest_dicom(dicom_dir: str, out_dir: str, out: str, salt: str = DEFAULT_SALT, site: str = "",
                 mapping_csv: str | None = None, seed: int = 0, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, folds: int = 0) -> Path | list[Path]:
    """A folder of DICOM series (any layout, searched recursively) -> NIfTI T1 volumes + datalist JSON.

    Per patient and study, the T1-weighted MR series is kept (3D original acquisitions with the finest
    voxels first) and written as ``<out_dir>/sub-<id>_ses-<id>_T1w.nii.gz``. Age comes from the birth and
    study dates, else from PatientAge. Split arguments (seed, fractions, folds) as in ``ingest_ixi``.

    Args:
        dicom_dir: folder holding the DICOM files.
        out_dir: folder for the NIfTI volumes.
        out: datalist JSON to write; series not used go to ``<out stem>_skipped.csv`` with the reason.
        salt: secret key of the anonymised ids; set your own (the default is public). The same salt
            gives the same ids, so keep it to add scans of the same patients later.
        site: site of every scan of this folder (default: unknown).
        mapping_csv: if given, a private CSV of anonymised id -> PatientID and StudyInstanceUID.
    """
    root = Path(dicom_dir)
    salt, site = str(salt), str(site)  # the command line reads --salt 1234 as a number
    if salt == DEFAULT_SALT:
        print("note: anonymised ids use the default salt; pass --salt with a secret of your own")
    all_series, skipped = find_series(root, salt)
    t1_series = []
    for series in all_series:
        try:
            _check_t1(series)
            t1_series.append(series)
        except Unusable as err:
            skipped.append(Skipped(series.subject, series.source, str(err)))
    chosen, duplicates = _one_per_study(t1_series)
    rows = []
    for series in tqdm(chosen, desc="dicom -> nifti", unit="series", file=sys.stderr):
        try:
            age = series_age(series.tags)
            image = _convert(series, Path(out_dir) / f"{series.subject}_{series.session}_T1w.nii.gz")
        except Unusable as err:
            skipped.append(Skipped(series.subject, series.source, str(err)))
            continue
        rows.append(Row(series.subject, series.source, str(image), age=age, sex=series.tags["sex"], site=site))
    if mapping_csv:
        _write_mapping(all_series, Path(mapping_csv))
    metadata = {"source": "DICOM", "input": str(root.resolve()), "images": str(Path(out_dir).resolve())}
    try:
        return rows_to_datalist(rows, skipped + duplicates, out, metadata, seed, val_fraction, test_fraction,
                                folds)
    except InputError as err:
        raise InputError(f"{err}; series found: {_inventory(all_series)}") from None


# ------------------------------------------------------------------------------------------ finding series


def find_series(root: Path, salt: str) -> tuple[list[Series], list[Skipped]]:
    """Every DICOM series below ``root`` with its header tags, and those whose header cannot be read."""
    if not root.is_dir():
        raise InputError(f"{root}: folder not found")
    n_files = sum(1 for path in root.rglob("*") if path.is_file())
    if not n_files:
        raise InputError(f"{root}: folder is empty")
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)  # also splits a series by orientation, matrix and slice thickness
    names.SetRecursive(True)
    names.SetDirectory(str(root))  # scans the folder: the two settings above must come first
    uids = names.GetSeriesUIDs()
    if not uids:
        raise InputError(f"{root}: no DICOM series among its {n_files} file(s)")
    series, skipped = [], []
    for uid in uids:
        files = list(names.GetFileNames(uid))
        try:
            tags = _read_tags(files[0])
        except RuntimeError as err:
            skipped.append(Skipped("", os.path.relpath(files[0], root), f"unreadable: {_one_line(err)}"))
            continue
        folder = os.path.relpath(Path(files[0]).parent, root)
        where = ("" if folder == "." else folder, f"series {tags['series_number']}".strip(), repr(tags["description"]))
        source = " ".join(part for part in where if part)
        subject = f"sub-{_keyed_hash(salt, tags['patient_id'], 10)}" if tags["patient_id"] else ""
        series.append(Series(files, tags, source, subject, f"ses-{_keyed_hash(salt, tags['study_uid'], 6)}"))
    return series, skipped


def _read_tags(path: str) -> dict[str, str]:
    io = itk.GDCMImageIO.New()
    io.SetFileName(path)
    io.ReadImageInformation()
    return {name: io.GetValueFromTag(tag, "")[1].strip() for name, tag in TAGS.items()}


def _keyed_hash(salt: str, text: str, n_hex: int) -> str:
    return hmac.new(salt.encode(), text.encode(), hashlib.sha256).hexdigest()[:n_hex]


# -------------------------------------------------------------------------------------- picking the T1


def is_t1_weighted(tags: dict[str, str]) -> bool:
    """By series description and protocol name, else by TR/TE and the kind of sequence."""
    text = f"{tags['description']} {tags['protocol']}".lower()
    if NOT_T1.search(text):
        return False
    if T1.search(text):
        return True
    te, tr, ti = _number(tags["te"]), _number(tags["tr"]), _number(tags["ti"])
    sequence = tags["sequence"].upper()
    if te is None or te >= MAX_T1_TE_MS or "EP" in sequence:
        return False
    return (tr is not None and tr < MAX_T1_TR_MS) or ("GR" in sequence and (ti or 0) > 0)


def _check_t1(series: Series) -> None:
    """Unusable with the reason when the series is not a T1-weighted MR head volume of a known patient."""
    tags = series.tags
    if tags["modality"] != "MR":
        raise Unusable(f"not MR: modality {tags['modality'] or 'missing'}")
    if not is_t1_weighted(tags):
        raise Unusable(f"not T1-weighted: {tags['description']!r}, TR {tags['tr'] or '?'} ms, "
                       f"TE {tags['te'] or '?'} ms")
    if series.n_slices < MIN_SLICES:
        raise Unusable(f"too few slices: {series.n_slices} (a head volume needs {MIN_SLICES})")
    if not series.subject:
        raise Unusable("PatientID missing")


def _one_per_study(series: list[Series]) -> tuple[list[Series], list[Skipped]]:
    """The best T1 of each patient's study (original 3D acquisition, finest voxels, most slices)."""
    studies: dict[tuple[str, str], list[Series]] = {}
    for s in series:
        studies.setdefault((s.subject, s.session), []).append(s)
    chosen, skipped = [], []
    for candidates in studies.values():
        best = max(candidates, key=_preference)
        chosen.append(best)
        skipped += [Skipped(s.subject, s.source, f"another T1 of the study was used: {best.source}")
                    for s in candidates if s is not best]
    return chosen, skipped


def _preference(series: Series) -> tuple:
    tags = series.tags
    spacing = [_number(v) for v in tags["pixel_spacing"].split("\\")] + [_number(tags["slice_thickness"])]
    voxel_mm3 = math.prod(spacing) if len(spacing) == 3 and None not in spacing else math.inf
    return (tags["image_type"].upper().startswith("ORIGINAL"), tags["acquisition"].upper() == "3D",
            -voxel_mm3, series.n_slices)


# ------------------------------------------------------------------------------------------------- age


def series_age(tags: dict[str, str]) -> str:
    """Age in years at the study: from the birth and study dates (to the day), else from PatientAge
    (whole days/weeks/months/years). Unusable when neither is there or the two disagree."""
    stated = _patient_age(tags["age"])
    dated = _years_between(tags["birth_date"], tags["study_date"])
    if stated is None and dated is None:
        raise Unusable("age missing: no PatientAge, nor PatientBirthDate with StudyDate")
    if stated is not None and dated is not None and abs(stated - dated) > MAX_AGE_DISAGREEMENT:
        raise Unusable(f"ages disagree: PatientAge {tags['age']} but the birth and study dates give "
                       f"{dated:.2f} years")
    return str(round(dated if dated is not None else stated, 2))


def _patient_age(text: str) -> float | None:
    """Years from a DICOM age string such as 045Y, 006M, 010W or 003D; None when empty."""
    if not text:
        return None
    match = re.fullmatch(r"(\d{1,3})\s*([DWMY])", text.upper())
    if not match:
        raise Unusable(f"PatientAge not a DICOM age (like 045Y): {text!r}")
    return int(match.group(1)) * AGE_UNITS[match.group(2)]


def _years_between(birth: str, study: str) -> float | None:
    if not (birth and study):
        return None
    try:
        days = (datetime.strptime(study, "%Y%m%d") - datetime.strptime(birth, "%Y%m%d")).days
    except ValueError:
        # the dates themselves stay out of the reason: a birth date identifies
        raise Unusable("PatientBirthDate or StudyDate not a YYYYMMDD date") from None
    return days / 365.25


# ------------------------------------------------------------------------------------------ conversion


def _convert(series: Series, path: Path) -> Path:
    """Read the series in its own pixel type (ITK orders the slices and turns LPS into NIfTI's RAS) and
    write it as NIfTI, atomically and without the DICOM header."""
    try:
        image = itk.imread(series.files, imageio=itk.GDCMImageIO.New())
    except RuntimeError as err:
        raise Unusable(f"unreadable: {_one_line(err)}") from None
    header = image.GetMetaDataDictionary()
    key = "ITK_non_uniform_sampling_deviation"
    if header.HasKey(key) and float(header[key]) > MAX_SLICE_DEVIATION * itk.spacing(image)[2]:
        raise Unusable(f"slices missing or unevenly spaced: positions deviate by up to {float(header[key]):.2f} mm")
    image.SetMetaDataDictionary(itk.MetaDataDictionary())  # no patient tags into the NIfTI
    with atomic_path(path) as tmp:
        itk.imwrite(image, str(tmp), compression=True)
    return path


# ------------------------------------------------------------------------------------------------ reports


def _write_mapping(series: list[Series], path: Path) -> None:
    rows = [{"subject": s.subject, "session": s.session, "patient_id": s.tags["patient_id"],
             "study_instance_uid": s.tags["study_uid"]} for s in series if s.subject]
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=["subject", "session", "patient_id", "study_instance_uid"]) \
            .drop_duplicates().to_csv(tmp, index=False)


def _inventory(series: list[Series], most: int = 10) -> str:
    """The commonest kinds of series found, e.g. ``2 x MR 'T2 TSE AX', 1 x CT 'HEAD'``."""
    kinds = Counter(f"{s.tags['modality'] or '?'} {s.tags['description']!r}" for s in series)
    text = ", ".join(f"{n} x {kind}" for kind, n in kinds.most_common(most)) or "none readable"
    return text + (f" and {len(kinds) - most} more kinds" if len(kinds) > most else "")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]
