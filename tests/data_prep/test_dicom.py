"""DICOM ingestion: real DICOM series written with ITK from the IXI sample, read back through the whole path."""
import contextlib
import gzip
import hashlib
import hmac
import io
import json
import locale
from pathlib import Path
from types import SimpleNamespace

import itk
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainage_core.datalist import read_datalist
from brainage_core.grid import canonical_grid
from brainage_core.volumes import InputError
from data_prep.__main__ import main
from data_prep.dicom import ingest_dicom, is_t1_weighted, series_age
from data_prep.ingest import Unusable

SOURCE = "IXI012-HH-1211_T1.nii.gz"  # 120 x 120 x 90 voxels of 2 mm, sagittal slices
SALT = "test-salt"
PATIENT_ID, PATIENT_NAME = "PAT-0042-XYZ", "DOE^JANE"
TAG = {"modality": "0008|0060", "description": "0008|103e", "image_type": "0008|0008",
       "patient_id": "0010|0020", "patient_name": "0010|0010", "age": "0010|1010", "birth_date": "0010|0030",
       "sex": "0010|0040", "study_date": "0008|0020", "study_uid": "0020|000d", "series_uid": "0020|000e",
       "series_number": "0020|0011", "acquisition": "0018|0023", "tr": "0018|0080", "te": "0018|0081"}
T1_TAGS = {"modality": "MR", "description": "T1 MPRAGE SAG", "image_type": "ORIGINAL\\PRIMARY\\M\\ND",
           "acquisition": "3D", "tr": "2300", "te": "2.98"}


def anonymised(patient_id: str, salt: str = SALT) -> str:
    return "sub-" + hmac.new(salt.encode(), patient_id.encode(), hashlib.sha256).hexdigest()[:10]


def integer_source(ixi_sample) -> itk.Image:
    """The IXI head rounded to int16, as a scanner would store it (the NIfTI holds scaled uint8)."""
    source = itk.imread(str(ixi_sample / SOURCE), itk.F)
    image = itk.image_from_array(np.rint(itk.array_view_from_image(source)).astype(np.int16))
    image.CopyInformation(source)
    return image


def subsampled(image: itk.Image, step: tuple[int, int, int]) -> itk.Image:
    """Every ``step``-th voxel along (x, y, slice): the same head, coarser and faster to write."""
    array = itk.array_view_from_image(image)[::step[2], ::step[1], ::step[0]]
    out = itk.image_from_array(np.ascontiguousarray(array))
    out.SetOrigin(itk.origin(image))
    out.SetDirection(image.GetDirection())
    out.SetSpacing([s * k for s, k in zip(itk.spacing(image), step)])
    return out


@contextlib.contextmanager
def locale_kept():
    """Restore the process's locale afterwards: writing these DICOM headers through GDCM leaves the C
    library's LC_CTYPE at "C", after which Python's default text encoding is ASCII and later tests in the
    same pytest worker fail to read UTF-8 files with ``Path.read_text()``."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@locale_kept()
def write_series(folder: Path, image: itk.Image, n_slices: int | None = None, **tags) -> None:
    """``image`` as a DICOM series of one file per slice, each header holding ``tags`` (names in TAG)."""
    folder.mkdir(parents=True, exist_ok=True)
    array = itk.array_view_from_image(image)  # (slice, row, column)
    direction = itk.array_from_matrix(image.GetDirection())
    spacing = itk.spacing(image)
    fixed = {TAG[name]: str(value) for name, value in tags.items()}
    fixed["0020|0037"] = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    fixed["0018|0050"] = f"{spacing[2]:.6f}"
    for k in range(n_slices or len(array)):
        slice_ = itk.image_from_array(np.ascontiguousarray(array[k]))
        slice_.SetSpacing([spacing[0], spacing[1]])
        header = slice_.GetMetaDataDictionary()
        position = image.TransformIndexToPhysicalPoint([0, 0, k])
        for tag, value in {**fixed, "0020|0013": str(k + 1),
                           "0020|0032": "\\".join(f"{v:.6f}" for v in position)}.items():
            header[tag] = value
        imageio = itk.GDCMImageIO.New()
        imageio.KeepOriginalUIDOn()  # else each file gets new study and series UIDs
        itk.imwrite(slice_, str(folder / f"s{tags['series_number']}_{k:03d}.dcm"), imageio=imageio)


def patient(number: int, **tags) -> dict:
    """Tags of one patient's study; ``number`` makes the UIDs and ids distinct."""
    return {"patient_id": f"P{number:04d}", "patient_name": f"PATIENT^{number}", "sex": "F",
            "study_uid": f"1.2.826.0.1.3680043.9.7777.{number}", **tags}


def run_ingest(dicom_dir: Path, out: Path, *flags: str) -> SimpleNamespace:
    """``python -m data_prep ingest-dicom`` in this process; what it printed and wrote."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main(["ingest-dicom", "--dicom_dir", str(dicom_dir), "--out_dir", str(out / "nifti"),
                     "--out", str(out / "raw.json"), "--val_fraction", "0", "--test_fraction", "0", *flags])
    return SimpleNamespace(code=code, printed=printed.getvalue(), out=out, datalist=out / "raw.json")


def records(datalist: Path) -> list[dict]:
    return [rec for recs in read_datalist(datalist).values() for rec in recs]


def skipped_reasons(datalist: Path) -> dict[str, str]:
    table = pd.read_csv(datalist.with_name(f"{datalist.stem}_skipped.csv"), dtype=str, keep_default_na=False)
    return dict(zip(table.source, table.reason))


@pytest.fixture(scope="module")
def hospital(ixi_sample, tmp_path_factory):
    """One patient's study: the IXI head as a sagittal T1 series, and a T2 series in the same folder."""
    root = tmp_path_factory.mktemp("hospital")
    head = integer_source(ixi_sample)
    study = {"patient_id": PATIENT_ID, "patient_name": PATIENT_NAME, "sex": "M", "age": "045Y",
             "study_uid": "1.2.826.0.1.3680043.9.7777.1"}
    write_series(root / "dicom", head, **study, **T1_TAGS, series_uid="1.2.826.0.1.3680043.9.7777.1.1",
                 series_number=1)
    write_series(root / "dicom", head, n_slices=20, **study, modality="MR", description="T2 TSE AX",
                 tr="4000", te="100", series_uid="1.2.826.0.1.3680043.9.7777.1.2", series_number=2)
    run = run_ingest(root / "dicom", root / "out", "--salt", SALT)
    assert run.code == 0, run.printed
    return run


def test_t1_series_reads_back_as_the_source_volume(hospital, ixi_sample):
    [record] = records(hospital.datalist)
    subject = anonymised(PATIENT_ID)
    assert (record["subject"], record["age"], record["sex"], record["site"]) == (subject, 45.0, "M", "unknown")
    assert Path(record["image"]).parent == hospital.out / "nifti"
    assert Path(record["image"]).name.startswith(f"{subject}_ses-")
    # compared in world space: the DICOM slices run along +x whatever the source's voxel order was
    converted = nib.as_closest_canonical(nib.load(record["image"]))
    source = nib.as_closest_canonical(nib.load(ixi_sample / SOURCE))
    np.testing.assert_allclose(converted.affine, source.affine, atol=1e-3)
    assert nib.aff2axcodes(converted.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(converted.get_fdata(), np.rint(source.get_fdata()))


def test_the_t2_series_is_skipped_with_its_reason(hospital):
    assert skipped_reasons(hospital.datalist) == {
        "series 2 'T2 TSE AX'": "not T1-weighted: 'T2 TSE AX', TR 4000 ms, TE 100 ms"}
    assert json.loads(hospital.datalist.read_text())["source"] == "DICOM"


def test_patient_name_and_id_appear_nowhere_in_the_outputs(hospital):
    files = [path for path in hospital.out.rglob("*") if path.is_file()]
    assert sorted(path.suffix for path in files) == [".csv", ".gz", ".json"]  # no mapping unless asked
    for text in [hospital.printed, *(gzip.decompress(p.read_bytes()).decode("latin-1") if p.suffix == ".gz"
                                     else p.read_text() for p in files)]:
        assert PATIENT_ID not in text and PATIENT_NAME not in text and "PAT-0042" not in text


@pytest.mark.slow
def test_ingested_datalist_goes_through_preprocess(hospital, tmp_path):
    code = main(["preprocess", "--datalist", str(hospital.datalist), "--out_dir", str(tmp_path),
                 "--resolution", "4", "--workers", "1"])
    assert code == 0
    [record] = records(tmp_path / "datalist.json")
    assert (record["subject"], record["age"]) == (anonymised(PATIENT_ID), 45.0)
    assert nib.load(record["image"]).shape == canonical_grid(4.0).shape


@pytest.fixture(scope="module")
def small_head(ixi_sample):
    return subsampled(integer_source(ixi_sample), (2, 2, 2))  # 60 x 60 x 45 voxels of 4 mm


def test_age_from_birth_and_study_dates_and_ids_stable_per_salt(small_head, tmp_path):
    tags = patient(7, birth_date="19700615", study_date="20150301")
    write_series(tmp_path / "dicom", small_head, **tags, **T1_TAGS, series_uid="1.2.3.7.1", series_number=1)
    first = run_ingest(tmp_path / "dicom", tmp_path / "a", "--salt", "one", "--mapping_csv",
                       str(tmp_path / "private" / "ids.csv"))
    again = run_ingest(tmp_path / "dicom", tmp_path / "b", "--salt", "one", "--site", "RoyalHospital")
    other = run_ingest(tmp_path / "dicom", tmp_path / "c", "--salt", "2024")
    [a], [b], [c] = (records(run.datalist) for run in (first, again, other))
    assert a["age"] == round((pd.Timestamp("2015-03-01") - pd.Timestamp("1970-06-15")).days / 365.25, 2) == 44.71
    assert a["subject"] == b["subject"] == anonymised("P0007", "one") != c["subject"] == anonymised("P0007", "2024")
    assert Path(a["image"]).name == Path(b["image"]).name and (a["site"], b["site"]) == ("unknown", "RoyalHospital")
    mapping = pd.read_csv(tmp_path / "private" / "ids.csv", dtype=str)
    assert mapping[["subject", "patient_id"]].values.tolist() == [[a["subject"], "P0007"]]
    assert "default salt" not in first.printed
    assert "default salt" in run_ingest(tmp_path / "dicom", tmp_path / "d").printed


def test_each_unused_series_is_skipped_with_its_reason(small_head, tmp_path):
    dicom = tmp_path / "export"
    coarse = subsampled(small_head, (1, 1, 2))
    write_series(dicom / "p1", small_head, **patient(1, age="050Y"), **T1_TAGS, series_uid="1.2.3.1.1",
                 series_number=3)
    write_series(dicom / "p1", coarse, **patient(1, age="050Y"), **T1_TAGS, series_uid="1.2.3.1.2",
                 series_number=4)
    write_series(dicom / "p1", small_head, n_slices=20, **patient(1), modality="CT", description="HEAD",
                 series_uid="1.2.3.1.3", series_number=5)
    write_series(dicom / "p1", small_head, n_slices=3, **patient(1), modality="MR", description="3-plane loc",
                 series_uid="1.2.3.1.4", series_number=1)
    # no description: T1-weighted by its short TR and TE
    write_series(dicom / "p2", small_head, **patient(2, age="030Y"), modality="MR", tr="500", te="12",
                 series_uid="1.2.3.2.1", series_number=1)
    write_series(dicom / "p3", small_head, **patient(3), **T1_TAGS, series_uid="1.2.3.3.1", series_number=1)
    write_series(dicom / "p4", small_head, n_slices=8, **patient(4, age="060Y"), modality="MR",
                 description="T1 SE AX", series_uid="1.2.3.4.1", series_number=1)
    write_series(dicom / "p5", small_head, **patient(5, age="070Y"), **T1_TAGS, series_uid="1.2.3.5.1",
                 series_number=1)
    (dicom / "p5" / "s1_020.dcm").unlink()  # a slice lost on the way
    write_series(dicom / "p6", small_head, **T1_TAGS, age="040Y", study_uid="1.2.3.6", series_uid="1.2.3.6.1",
                 series_number=1)
    run = run_ingest(dicom, tmp_path / "out", "--salt", SALT)
    assert run.code == 0, run.printed
    kept = {rec["subject"]: rec["age"] for rec in records(run.datalist)}
    assert kept == {anonymised("P0001"): 50.0, anonymised("P0002"): 30.0}
    assert skipped_reasons(run.datalist) == {
        "p1 series 4 'T1 MPRAGE SAG'": "another T1 of the study was used: p1 series 3 'T1 MPRAGE SAG'",
        "p1 series 5 'HEAD'": "not MR: modality CT",
        "p1 series 1 '3-plane loc'": "not T1-weighted: '3-plane loc', TR ? ms, TE ? ms",
        "p3 series 1 'T1 MPRAGE SAG'": "age missing: no PatientAge, nor PatientBirthDate with StudyDate",
        "p4 series 1 'T1 SE AX'": "too few slices: 8 (a head volume needs 16)",
        "p5 series 1 'T1 MPRAGE SAG'": "slices missing or unevenly spaced: positions deviate by up to 3.91 mm",
        "p6 series 1 'T1 MPRAGE SAG'": "PatientID missing",
    }
    assert "2 scan(s) of 2 subject(s) kept, 7 row(s) skipped" in run.printed


def test_folders_without_a_usable_t1_are_input_errors(small_head, tmp_path):
    out = str(tmp_path / "raw.json")
    with pytest.raises(InputError, match="missing: folder not found"):
        ingest_dicom(str(tmp_path / "missing"), str(tmp_path / "nifti"), out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: folder is empty"):
        ingest_dicom(str(tmp_path / "empty"), str(tmp_path / "nifti"), out)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image\n")
    (tmp_path / "notes" / "scan.dcm").write_bytes(b"\0" * 1000)
    with pytest.raises(InputError, match=r"notes: no DICOM series among its 2 file\(s\)"):
        ingest_dicom(str(tmp_path / "notes"), str(tmp_path / "nifti"), out)
    write_series(tmp_path / "t2", small_head, n_slices=20, **patient(1, age="040Y"), modality="MR",
                 description="T2 TSE AX", series_uid="1.2.3.9.1", series_number=1)
    with pytest.raises(InputError, match=r"t2: no usable scan in this DICOM input .*raw_skipped.csv\); "
                                         r"series found: 1 x MR 'T2 TSE AX'"):
        ingest_dicom(str(tmp_path / "t2"), str(tmp_path / "nifti"), out)


@pytest.mark.parametrize("tags, age", [
    ({"age": "045Y"}, "45.0"), ({"age": "006M"}, "0.5"), ({"age": "010W"}, "0.19"), ({"age": "003D"}, "0.01"),
    ({"birth_date": "19800101", "study_date": "20200101"}, "40.0"),
    ({"age": "039Y", "birth_date": "19800601", "study_date": "20200101"}, "39.58"),  # the dates are finer
])
def test_age_from_patient_age_units_or_dates(tags, age):
    assert series_age({"age": "", "birth_date": "", "study_date": "", **tags}) == age


@pytest.mark.parametrize("tags, reason", [
    ({}, "age missing"),
    ({"age": "045Y", "birth_date": "19700101", "study_date": "20200101"}, "ages disagree: PatientAge 045Y"),
    ({"age": "45 years"}, "PatientAge not a DICOM age"),
    ({"birth_date": "1980-01-01", "study_date": "20200101"}, "not a YYYYMMDD date"),
])
def test_unusable_ages_say_why(tags, reason):
    with pytest.raises(Unusable, match=reason):
        series_age({"age": "", "birth_date": "", "study_date": "", **tags})


@pytest.mark.parametrize("description, tr, te, ti, sequence, expected", [
    ("t1_mprage_sag_p2_iso", "", "", "", "", True),
    ("Accelerated Sag IR-FSPGR", "", "", "", "", True),
    ("SAG 3D FSPGR BRAVO", "", "", "", "", True),
    ("T1W_3D_TFE", "", "", "", "", True),
    ("3DT1", "", "", "", "", True),
    ("mp2rage_UNI", "", "", "", "", True),
    ("mp2rage_INV1", "", "", "", "", False),
    ("T1 map", "", "", "", "", False),
    ("AX T2 FLAIR", "", "", "", "", False),
    ("PD TSE COR", "", "", "", "", False),
    ("AAHead_Scout", "", "", "", "", False),
    ("ep2d_diff_mddw", "", "", "", "", False),
    ("SAG", "500", "12", "", "SE", True),  # short TR and TE
    ("SAG", "2300", "3", "900", "GR\\IR", True),  # MPRAGE-like: gradient echo with inversion
    ("SAG", "4000", "90", "", "SE", False),
    ("SAG", "3000", "30", "", "EP", False),
    ("", "", "", "", "", False),
])
def test_t1_weighted_by_description_else_by_tr_and_te(description, tr, te, ti, sequence, expected):
    tags = {"description": description, "protocol": "", "tr": tr, "te": te, "ti": ti, "sequence": sequence}
    assert is_t1_weighted(tags) is expected
