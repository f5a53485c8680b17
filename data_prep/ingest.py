"""IXI, BIDS and generic CSV/TSV cohorts to MONAI datalists, through one shared path.

Each source only turns its files into candidate ``Row``s (raw text values plus where they came from).
The shared core then validates them into records, splits the subjects (``splits.py``), writes the
datalist(s) and writes every row it could not use to ``<datalist stem>_skipped.csv`` with the reason, so
nothing is dropped silently. Images are found, never opened: checking them is the preprocessing step's job.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd

from brainage_core.datalist import write_datalist
from brainage_core.volumes import InputError, atomic_path

from .splits import kfold_records, split_records

MAX_AGE = 120.0
UNKNOWN_SITE = "unknown"
UNKNOWN_SEX = "U"
MISSING = {"", "n/a", "na", "nan", "none", "null"}
SEX_CODES = {"m": "M", "male": "M", "f": "F", "female": "F"}
IXI_SEX_CODES = {"1": "M", "2": "F"}
DIAGNOSIS_COLUMNS = ("diagnosis", "dx", "group", "diagnostic_group")
LABELS = {
    **dict.fromkeys(("0", "cn", "hc", "nc", "control", "controls", "healthy", "healthy control", "normal"), 0),
    **dict.fromkeys(("1", "ad", "alzheimer", "alzheimers", "alzheimer's disease", "dementia", "patient"), 1),
}
IXI_T1 = re.compile(r"^(IXI(\d+)-([A-Za-z]+)-\d+)[-_]T1\.nii(\.gz)?$")
IXI_ID = re.compile(r"(?:IXI)?(\d+)(?:\.0*)?", re.IGNORECASE)
BIDS_T1W = ("sub-*/anat/*_T1w.nii*", "sub-*/ses-*/anat/*_T1w.nii*")


@dataclass
class Row:
    """One candidate scan as read: text values ("" when absent) and where they came from."""

    subject: str
    source: str
    image: str = ""
    age: str = ""
    sex: str = ""
    site: str = ""
    diagnosis: str = ""


@dataclass
class Skipped:
    subject: str
    source: str
    reason: str


class Unusable(Exception):
    """A row cannot become a record; the message is the reason written to the skipped table."""


# ----------------------------------------------------------------------------------------------- sources


def ingest_ixi(demographics: str, image_dir: str, out: str, seed: int = 0, val_fraction: float = 0.15,
               test_fraction: float = 0.15, folds: int = 0) -> Path | list[Path]:
    """IXI demographics (IXI.xls or a CSV/TSV export) and a folder of IXI T1 files -> datalist JSON.

    Args:
        demographics: IXI.xls, or a CSV/TSV with columns IXI_ID, AGE and SEX_ID (1 = male, 2 = female).
        image_dir: folder of ``IXI###-Site-####-T1.nii.gz`` files; subject id and site come from the name.
        out: datalist JSON to write; skipped rows go to ``<out stem>_skipped.csv``.
        seed: seed of the split.
        val_fraction: share of subjects in validation (with ``folds``: share of the non-test subjects).
        test_fraction: share of subjects in test (ignored with ``folds``).
        folds: 0 for one split; k >= 2 for k datalists ``<out stem>_fold{i}.json``, one per test fold.
    """
    table_path = Path(demographics)
    table = _read_table(table_path)
    id_col = _column(table, table_path, "IXI_ID")
    age_col = _column(table, table_path, "AGE")
    sex_col = _column(table, table_path, "SEX_ID", prefix=True, required=False)
    if sex_col:
        table[sex_col] = table[sex_col].map(_ixi_sex)
    people, bad_ids = _rows_by_id(table, table_path, id_col, _ixi_key, {"age": age_col, "sex": sex_col})
    rows, unmatched = _join(people, _ixi_scans(Path(image_dir)), table_path.name)
    metadata = {"source": "IXI", "input": str(table_path.resolve()), "images": str(Path(image_dir).resolve())}
    return rows_to_datalist(rows, bad_ids + unmatched, out, metadata, seed, val_fraction, test_fraction, folds)


def ingest_bids(bids_root: str, out: str, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                diagnosis_column: str | None = None, folds: int = 0) -> Path | list[Path]:
    """A BIDS dataset (``participants.tsv`` and ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``) -> datalist JSON.

    ``participants.tsv`` needs ``participant_id`` and ``age``; ``sex`` and ``site`` are used when present.
    Diagnoses (CN/HC/control -> label 0, AD/patient -> label 1) come from ``diagnosis_column``, or else
    from the first of diagnosis, dx, group, diagnostic_group whose values all read as CN or AD. Every T1w
    run of every session becomes a record of its subject, with the subject's participants.tsv age.
    Other arguments as in ``ingest_ixi``.
    """
    root = Path(bids_root)
    table_path = root / "participants.tsv"
    table = _read_table(table_path)
    id_col = _column(table, table_path, "participant_id")
    columns = {
        "age": _column(table, table_path, "age"),
        "sex": _column(table, table_path, "sex", required=False),
        "site": _column(table, table_path, "site", required=False),
        "diagnosis": _diagnosis_column(table, table_path, diagnosis_column),
    }
    people, bad_ids = _rows_by_id(table, table_path, id_col, _bids_subject, columns)
    rows, unmatched = _join(people, _bids_scans(root), table_path.name)
    metadata = {"source": "BIDS", "input": str(root.resolve()), "diagnosis_column": columns["diagnosis"]}
    return rows_to_datalist(rows, bad_ids + unmatched, out, metadata, seed, val_fraction, test_fraction, folds)


def ingest_csv(table: str, out: str, image_column: str = "image", age_column: str = "age",
               subject_column: str | None = "subject", sex_column: str | None = None,
               site_column: str | None = None, label_column: str | None = None, seed: int = 0,
               val_fraction: float = 0.15, test_fraction: float = 0.15, folds: int = 0) -> Path | list[Path]:
    """A CSV/TSV with one row per scan -> datalist JSON.

    Image paths are absolute or relative to the table's folder. Rows sharing a subject id are scans of
    one subject and stay in one split; with ``subject_column=None`` each image is its own subject, named
    after its file. Labels may be 0/1 or CN/AD-style names. Other arguments as in ``ingest_ixi``.
    """
    table_path = Path(table)
    frame = _read_table(table_path)
    values_from = {"age": age_column, "sex": sex_column, "site": site_column, "diagnosis": label_column}
    values_from = {field: name for field, name in values_from.items() if name is not None}
    named = [image_column, *([subject_column] if subject_column else []), *values_from.values()]
    missing = [name for name in named if name not in frame.columns]
    if missing:
        raise InputError(f"{table_path}: no column(s) {missing}; columns are {list(frame.columns)}")
    rows = []
    for i, values in enumerate(frame.to_dict("records")):
        image = values[image_column]
        if image and not os.path.isabs(image):
            image = str(table_path.resolve().parent / image)
        subject = values[subject_column] if subject_column else _image_stem(image)
        rows.append(Row(subject, _row_source(table_path, i), image, **{f: values[c] for f, c in values_from.items()}))
    metadata = {"source": "CSV", "input": str(table_path.resolve()), "columns": {"image": image_column,
                "subject": subject_column, **values_from}}
    return rows_to_datalist(rows, [], out, metadata, seed, val_fraction, test_fraction, folds)


# ----------------------------------------------------------------------------------------- shared core


def rows_to_datalist(rows: list[Row], skipped: list[Skipped], out: str | os.PathLike, metadata: dict,
                     seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                     folds: int = 0) -> Path | list[Path]:
    """Validate rows, write the skipped table, split by subject and write the datalist(s).

    ``skipped`` holds rows the source already rejected. ``metadata`` becomes top-level datalist keys and
    needs ``source`` (a name) and ``input`` (the path that error messages name). Returns the datalist
    path, or with ``folds`` >= 2 the list of per-fold paths.
    """
    out = Path(out)
    records, invalid = _validate(rows)
    skipped = skipped + invalid
    skipped_path = _write_skipped(skipped, out.with_name(f"{out.stem}_skipped.csv"))
    if not records:
        raise InputError(f"{metadata['input']}: no usable scan in this {metadata['source']} input "
                         f"({len(skipped)} skipped; reasons in {skipped_path})")
    try:
        datalists = _split(records, seed, val_fraction, test_fraction, folds)
    except InputError as err:
        raise InputError(f"{metadata['input']}: {err}") from None
    metadata = {**metadata, "seed": seed, "skipped": skipped_path.name}
    if folds:
        paths = [write_datalist(out.with_name(f"{out.stem}_fold{i}{out.suffix}"), splits, **metadata,
                                fold=i, folds=folds, val_fraction=val_fraction)
                 for i, splits in enumerate(datalists)]
    else:
        paths = [write_datalist(out, datalists[0], **metadata, val_fraction=val_fraction,
                                test_fraction=test_fraction)]
    _print_summary(metadata["source"], records, skipped, skipped_path, datalists[0], paths)
    return paths if folds else paths[0]


def _split(records: list[dict], seed: int, val_fraction: float, test_fraction: float,
           folds: int) -> list[dict[str, list[dict]]]:
    if folds:
        return kfold_records(records, k=folds, seed=seed, val_fraction=val_fraction)
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    return [split_records(records, fractions=fractions, seed=seed)]


def _validate(rows: list[Row]) -> tuple[list[dict], list[Skipped]]:
    records, skipped = [], []
    for row in rows:
        try:
            records.append(_record(row))
        except Unusable as err:
            skipped.append(Skipped(row.subject, row.source, str(err)))
    return records, skipped


def _record(row: Row) -> dict:
    """The datalist record of a row, or Unusable with the first problem found."""
    age = _age(row.age)
    if not row.image:
        raise Unusable("no T1 image found")
    if not Path(row.image).is_file():
        raise Unusable(f"image not found: {row.image}")
    if not row.subject:
        raise Unusable("subject missing")
    record = {"image": str(Path(row.image).resolve()), "age": age, "sex": _sex(row.sex),
              "site": row.site or UNKNOWN_SITE, "subject": row.subject}
    label = _label(row.diagnosis)
    if label is not None:
        record["label"] = label
    return record


def _age(text: str) -> float:
    if _is_missing(text):
        raise Unusable("age missing")
    try:
        age = float(text)
    except ValueError:
        raise Unusable(f"age not a number: {text!r}") from None
    if not (math.isfinite(age) and 0 < age <= MAX_AGE):
        raise Unusable(f"age implausible: {text} (expected years in (0, {MAX_AGE:g}])")
    return age


def _sex(text: str) -> str:
    if _is_missing(text):
        return UNKNOWN_SEX
    return SEX_CODES.get(text.lower(), text)


def _label(text: str) -> int | None:
    """0 (CN) or 1 (AD) from a diagnosis name or 0/1 code; None when missing."""
    if _is_missing(text):
        return None
    if not _reads_as_label(text):
        raise Unusable(f"diagnosis not CN or AD: {text!r}")
    return LABELS[_label_key(text)]


def _reads_as_label(text: str) -> bool:
    return _label_key(text) in LABELS


def _label_key(text: str) -> str:
    return text.strip().lower().removesuffix(".0")


def _is_missing(text: str) -> bool:
    return text.strip().lower() in MISSING


def _join(people: dict[str, list[Row]], scans: dict[str, list[Row]],
          table_name: str) -> tuple[list[Row], list[Skipped]]:
    """Match demographics rows to scans by subject key; report keys without one or the other.

    ``people`` maps a key to its demographics rows (several when the table repeats an ID: identical
    repeats are merged, disagreeing ones are skipped). ``scans`` maps a key to rows holding a subject id,
    an image and any values read from the file name (IXI site), which win over the table's.
    """
    rows, skipped = [], []
    for key in sorted(set(people) | set(scans)):
        entries, images = people.get(key, []), scans.get(key, [])
        if not entries:
            skipped += [Skipped(s.subject, s.source, f"not listed in {table_name}") for s in images]
            continue
        try:
            person = _merge_duplicates(entries)
        except Unusable as err:
            sources = ", ".join(row.source for row in entries)
            skipped.append(Skipped(images[0].subject if images else key, sources, str(err)))
            continue
        if not images:
            skipped.append(Skipped(key, person.source, "no T1 image found"))
        rows += [_with_scan(person, scan) for scan in images]
    return rows, skipped


def _with_scan(person: Row, scan: Row) -> Row:
    """The demographics row completed by a scan's subject id, image and file-name values."""
    from_scan = {field: value for field, value in asdict(scan).items() if value and field != "source"}
    return Row(**{**asdict(person), **from_scan})


def _merge_duplicates(entries: list[Row]) -> Row:
    """The single demographics row of an ID, or Unusable naming the field on which its rows disagree."""
    for field in (f.name for f in fields(Row) if f.name != "source"):
        values = [getattr(row, field) for row in entries]
        if len(set(values)) > 1:
            raise Unusable(f"duplicate ID with conflicting {field}: {' / '.join(map(repr, values))}")
    return entries[0]


def _write_skipped(skipped: list[Skipped], path: Path) -> Path:
    table = pd.DataFrame([asdict(s) for s in skipped], columns=[f.name for f in fields(Skipped)])
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path.resolve()


def _print_summary(source: str, records: list[dict], skipped: list[Skipped], skipped_path: Path,
                   splits: dict[str, list[dict]], paths: list[Path]) -> None:
    n_subjects = len({rec["subject"] for rec in records})
    print(f"{source}: {len(records)} scan(s) of {n_subjects} subject(s) kept, {len(skipped)} row(s) skipped")
    for reason, count in Counter(s.reason.split(":")[0] for s in skipped).most_common():
        print(f"  skipped {count:4d}: {reason}")
    if skipped:
        print(f"  skipped rows and reasons: {skipped_path}")
    print("  " + ", ".join(f"{name} {len(recs)}" for name, recs in splits.items()) + " scans"
          + (f" (fold 0 of {len(paths)})" if len(paths) > 1 else ""))
    for path in paths:
        print(f"  wrote {path}")


# ------------------------------------------------------------------------------------------ table reading


def _read_table(path: Path) -> pd.DataFrame:
    """A CSV, TSV or Excel table with every cell as stripped text ("" when empty)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".xls", ".xlsx"):
        raise InputError(f"{path}: unsupported table type {suffix!r}; use .csv, .tsv, .xls or .xlsx")
    try:
        if suffix in (".xls", ".xlsx"):
            table = pd.read_excel(path, dtype=str)
        else:
            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    except (ValueError, ImportError, OSError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read table ({type(err).__name__}: {err})") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table.fillna("").map(lambda cell: str(cell).strip())


def _column(table: pd.DataFrame, path: Path, name: str, prefix: bool = False, required: bool = True) -> str | None:
    """The column called ``name`` (case-insensitive; or starting with it, for IXI's "SEX_ID (1=m, 2=f)")."""
    for column in table.columns:
        low = column.lower()
        if low == name.lower() or (prefix and low.startswith(name.lower())):
            return column
    if required:
        raise InputError(f"{path}: no {name!r} column; columns are {list(table.columns)}")
    return None


def _rows_by_id(table: pd.DataFrame, path: Path, id_column: str, key_of,
                columns: dict[str, str | None]) -> tuple[dict[str, list[Row]], list[Skipped]]:
    """Demographics rows grouped by subject key ``key_of(id cell)``; rows with an unusable ID are skipped.

    ``columns`` maps Row fields to table columns (None: not in this table).
    """
    people: dict[str, list[Row]] = {}
    skipped = []
    for i, values in enumerate(table.to_dict("records")):
        source = _row_source(path, i)
        try:
            key = key_of(values[id_column])
        except Unusable as err:
            skipped.append(Skipped(values[id_column], source, str(err)))
            continue
        row = Row(key, source, **{field: values[c] for field, c in columns.items() if c})
        people.setdefault(key, []).append(row)
    return people, skipped


def _row_source(path: Path, index: int) -> str:
    """Where a table row is, as a spreadsheet shows it: the header is row 1."""
    return f"{path.name} row {index + 2}"


# ----------------------------------------------------------------------------------------- IXI specifics


def _ixi_key(text: str) -> str:
    """``IXI012`` from an IXI_ID cell such as 12, 12.0 or IXI012."""
    match = IXI_ID.fullmatch(text)
    if not match:
        raise Unusable(f"IXI_ID not a subject number: {text!r}")
    return f"IXI{int(match.group(1)):03d}"


def _ixi_sex(text: str) -> str:
    """IXI's SEX_ID code (1 = male, 2 = female; 1.0 from a spreadsheet) as M/F; other text unchanged."""
    return IXI_SEX_CODES.get(text.removesuffix(".0"), text)


def _ixi_scans(image_dir: Path) -> dict[str, list[Row]]:
    """IXI T1 files by key ``IXI###``; subject ``IXI###-Site-####`` and site from the file name."""
    if not image_dir.is_dir():
        raise InputError(f"{image_dir}: image folder not found")
    scans: dict[str, list[Row]] = {}
    for path in sorted(image_dir.iterdir()):
        match = IXI_T1.match(path.name)
        if match:
            subject, number, site = match.group(1, 2, 3)
            row = Row(subject, path.name, image=str(path), site=site)
            scans.setdefault(f"IXI{int(number):03d}", []).append(row)
    if not scans:
        raise InputError(f"{image_dir}: no IXI T1 files named like IXI012-HH-1211-T1.nii.gz")
    return scans


# ---------------------------------------------------------------------------------------- BIDS specifics


def _bids_subject(text: str) -> str:
    if _is_missing(text):
        raise Unusable("participant_id missing")
    return text if text.startswith("sub-") else f"sub-{text}"


def _bids_scans(root: Path) -> dict[str, list[Row]]:
    """T1w images by subject folder name, sessions included."""
    scans: dict[str, list[Row]] = {}
    for pattern in BIDS_T1W:
        for path in sorted(root.glob(pattern)):
            if path.name.endswith((".nii", ".nii.gz")):
                rel = path.relative_to(root)
                scans.setdefault(rel.parts[0], []).append(Row(rel.parts[0], str(rel), image=str(path)))
    return scans


def _diagnosis_column(table: pd.DataFrame, path: Path, name: str | None) -> str | None:
    """The given diagnosis column, else the first usual one whose values all read as CN/AD (or missing)."""
    if name is not None:
        return _column(table, path, name)
    for candidate in DIAGNOSIS_COLUMNS:
        column = _column(table, path, candidate, required=False)
        if column is None:
            continue
        if all(_is_missing(v) or _reads_as_label(v) for v in table[column]):
            return column
        print(f"note: {path}: column {column!r} has values other than CN/AD; not used as diagnosis")
    return None


def _image_stem(image: str) -> str:
    name = Path(image).name
    return name.removesuffix(".gz").removesuffix(".nii")
