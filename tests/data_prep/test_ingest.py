"""IXI, BIDS and CSV ingestion: records, the skipped-row table, splits on disk and clear errors.

Ingestion never opens images, so most fake datasets use empty files.
"""
import json
from pathlib import Path

import pandas as pd
import pytest

from brainage_core.datalist import read_datalist
from brainage_core.volumes import InputError
from data_prep.ingest import ingest_bids, ingest_csv, ingest_ixi


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def write_text(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def all_records(datalist_path) -> list[dict]:
    return [rec for recs in read_datalist(datalist_path).values() for rec in recs]


def by_subject(records) -> dict[str, list[dict]]:
    out = {}
    for rec in records:
        out.setdefault(rec["subject"], []).append(rec)
    return out


def skipped_reasons(out: Path) -> dict[str, str]:
    table = pd.read_csv(out.with_name(f"{out.stem}_skipped.csv"), dtype=str, keep_default_na=False)
    assert list(table.columns) == ["subject", "source", "reason"]
    return dict(zip(table.subject, table.reason))


# ------------------------------------------------------------------------------------------------- IXI


@pytest.fixture
def ixi(tmp_path):
    images = tmp_path / "IXI-T1"
    for name in ["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-HH-1212", "IXI014-HH-1236", "IXI015-HH-1258",
                 "IXI016-Guys-0697", "IXI017-Guys-0698", "IXI019-Guys-0702", "IXI020-Guys-0700",
                 "IXI021-Guys-0703", "IXI022-Guys-0701", "IXI023-Guys-0699", "IXI025-Guys-0852",
                 "IXI035-IOP-0873", "IXI099-IOP-0999"]:
        touch(images / f"{name}-T1.nii.gz")
    touch(images / "IXI002-Guys-0828-T2.nii.gz")  # other modalities are ignored
    demographics = write_text(tmp_path / "IXI.csv", [
        'IXI_ID,"SEX_ID (1=m, 2=f)",HEIGHT,AGE',
        "2,2,164,35.80",
        "12,1,175,38.78",
        "13,1,182,46.71",
        "14,2,163,34.24",
        "15,1,181,24.28",
        "16,1,172,55.17",
        "17,2,158,",          # missing age
        "19,1,170,abc",       # not a number
        "20,1,180,-4",        # negative
        "21,2,160,134",       # implausible
        "22,2,165,30.5",      # duplicate ID, identical rows: kept once
        "22,2,165,30.5",
        "23,1,177,41.2",      # duplicate ID, conflicting ages
        "23,1,177,43.9",
        "25,1,181,64.1",
        "35,2,160,72.0",
        "40,2,170,50.0",      # no image
    ])
    return demographics, images


def test_ixi_records_take_subject_site_and_sex_from_file_and_table(ixi, tmp_path):
    demographics, images = ixi
    out = ingest_ixi(str(demographics), str(images), str(tmp_path / "ixi.json"), seed=1)
    subjects = by_subject(all_records(out))
    assert sorted(subjects) == ["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-HH-1212", "IXI014-HH-1236",
                                "IXI015-HH-1258", "IXI016-Guys-0697", "IXI022-Guys-0701", "IXI025-Guys-0852",
                                "IXI035-IOP-0873"]
    rec = subjects["IXI035-IOP-0873"][0]
    assert (rec["age"], rec["sex"], rec["site"]) == (72.0, "F", "IOP")
    assert Path(rec["image"]) == (images / "IXI035-IOP-0873-T1.nii.gz").resolve()
    assert subjects["IXI012-HH-1211"][0]["sex"] == "M" and "label" not in rec
    assert len(subjects["IXI022-Guys-0701"]) == 1
    meta = json.loads(out.read_text())
    assert (meta["source"], meta["seed"], meta["skipped"]) == ("IXI", 1, "ixi_skipped.csv")


def test_ixi_reports_every_unusable_row_with_its_reason(ixi, tmp_path, capsys):
    demographics, images = ixi
    out = tmp_path / "ixi.json"
    ingest_ixi(str(demographics), str(images), str(out))
    reasons = skipped_reasons(out)
    assert reasons == {
        "IXI017-Guys-0698": "age missing",
        "IXI019-Guys-0702": "age not a number: 'abc'",
        "IXI020-Guys-0700": "age implausible: -4 (expected years in (0, 120])",
        "IXI021-Guys-0703": "age implausible: 134 (expected years in (0, 120])",
        "IXI023-Guys-0699": "duplicate ID with conflicting age: '41.2' / '43.9'",
        "IXI040": "no T1 image found",
        "IXI099-IOP-0999": "not listed in IXI.csv",
    }
    table = pd.read_csv(out.with_name("ixi_skipped.csv"), dtype=str)
    assert table.set_index("subject").loc["IXI017-Guys-0698", "source"] == "IXI.csv row 8"
    assert table.set_index("subject").loc["IXI023-Guys-0699", "source"] == "IXI.csv row 14, IXI.csv row 15"
    printed = capsys.readouterr().out
    assert "9 subject(s) kept, 7 row(s) skipped" in printed and "ixi_skipped.csv" in printed


def test_ixi_sample_with_real_files(ixi_sample, tmp_path):
    demographics = write_text(tmp_path / "demographics.csv", ["IXI_ID,SEX_ID,AGE", "12,1,38.78", "15,1,24.28"])
    out = ingest_ixi(str(demographics), str(ixi_sample), str(tmp_path / "sample.json"),
                     val_fraction=0.0, test_fraction=0.5)
    splits = read_datalist(out)
    assert [len(splits[name]) for name in ("training", "validation", "test")] == [1, 0, 1]
    ages = {rec["subject"]: rec["age"] for rec in splits["training"] + splits["test"]}
    assert ages == {"IXI012-HH-1211": 38.78, "IXI015-HH-1258": 24.28}
    assert all(Path(rec["image"]).is_file() and rec["site"] == "HH" for rec in splits["test"])
    assert skipped_reasons(out) == {}


def test_ixi_with_too_few_subjects_for_three_splits_names_the_file(ixi_sample, tmp_path):
    demographics = write_text(tmp_path / "demographics.csv", ["IXI_ID,AGE", "12,38.78", "15,24.28"])
    with pytest.raises(InputError, match=r"demographics\.csv: 2 subject\(s\) cannot fill 3"):
        ingest_ixi(str(demographics), str(ixi_sample), str(tmp_path / "sample.json"))


def test_ixi_errors_name_the_file_and_problem(ixi, tmp_path):
    demographics, images = ixi
    with pytest.raises(InputError, match="missing.csv: file not found"):
        ingest_ixi(str(tmp_path / "missing.csv"), str(images), str(tmp_path / "x.json"))
    no_age = write_text(tmp_path / "no_age.csv", ["IXI_ID,SEX_ID", "2,1"])
    with pytest.raises(InputError, match="no_age.csv: no 'AGE' column"):
        ingest_ixi(str(no_age), str(images), str(tmp_path / "x.json"))
    with pytest.raises(InputError, match="no IXI T1 files"):
        ingest_ixi(str(demographics), str(touch(tmp_path / "empty" / "x.txt").parent), str(tmp_path / "x.json"))
    with pytest.raises(InputError, match="unsupported table type '.ods'"):
        ingest_ixi(str(touch(tmp_path / "IXI.ods")), str(images), str(tmp_path / "x.json"))


# ------------------------------------------------------------------------------------------------ BIDS


def make_bids(root: Path, rows: list[str], header="participant_id\tage\tsex\tsite\tdiagnosis",
              sessions: dict[str, int] | None = None) -> Path:
    """participants.tsv from ``rows`` and one T1w per participant (``sessions[id]`` sessions if given)."""
    write_text(root / "participants.tsv", [header, *rows])
    for row in rows:
        sub = row.split("\t")[0]
        n_sessions = (sessions or {}).get(sub, 0)
        if n_sessions:
            for ses in range(1, n_sessions + 1):
                touch(root / sub / f"ses-{ses}" / "anat" / f"{sub}_ses-{ses}_T1w.nii.gz")
        else:
            touch(root / sub / "anat" / f"{sub}_T1w.nii.gz")
    return root


def bids_rows(n: int, diagnosis=("CN", "AD")) -> list[str]:
    return [f"sub-{i:02d}\t{40 + 3 * i}\t{'MF'[i % 2]}\tsite{i % 2}\t{diagnosis[i % len(diagnosis)]}"
            for i in range(n)]


def test_bids_reads_diagnosis_site_and_keeps_sessions_of_a_subject_together(tmp_path):
    root = make_bids(tmp_path / "bids", bids_rows(12), sessions={"sub-03": 2})
    out = ingest_bids(str(root), str(tmp_path / "bids.json"), seed=5)
    splits = read_datalist(out)
    records = all_records(out)
    assert len(records) == 13
    rec = by_subject(records)["sub-01"][0]
    assert (rec["age"], rec["sex"], rec["site"], rec["label"]) == (43.0, "F", "site1", 1)
    assert by_subject(records)["sub-00"][0]["label"] == 0
    holding = [name for name, recs in splits.items() if any(r["subject"] == "sub-03" for r in recs)]
    assert len(holding) == 1 and len([r for r in splits[holding[0]] if r["subject"] == "sub-03"]) == 2
    assert json.loads(out.read_text())["diagnosis_column"] == "diagnosis"


def test_bids_reports_missing_images_unlisted_subjects_and_bad_values(tmp_path):
    rows = bids_rows(6) + ["sub-06\tn/a\tM\tsite0\tCN", "sub-07\t61\tF\tsite1\tMCI", "sub-08\t50\tF\tsite0\tAD"]
    root = make_bids(tmp_path / "bids", rows)
    (root / "sub-08" / "anat" / "sub-08_T1w.nii.gz").unlink()
    touch(root / "sub-99" / "anat" / "sub-99_T1w.nii.gz")
    out = tmp_path / "bids.json"
    ingest_bids(str(root), str(out), diagnosis_column="diagnosis")
    assert skipped_reasons(out) == {
        "sub-06": "age missing",
        "sub-07": "diagnosis not CN or AD: 'MCI'",
        "sub-08": "no T1 image found",
        "sub-99": "not listed in participants.tsv",
    }
    assert len(all_records(out)) == 6


@pytest.mark.parametrize("column, values, labels", [
    ("group", ("HC", "patient"), {0, 1}),
    ("dx", ("control", "Alzheimer's disease"), {0, 1}),
    ("group", ("A", "B"), set()),  # not a diagnosis: ignored, no labels
])
def test_bids_detects_a_diagnosis_column_only_when_its_values_are_diagnoses(tmp_path, column, values, labels):
    root = make_bids(tmp_path / "bids", bids_rows(6, values), header=f"participant_id\tage\tsex\tsite\t{column}")
    out = ingest_bids(str(root), str(tmp_path / "bids.json"))
    assert {rec["label"] for rec in all_records(out) if "label" in rec} == labels


def test_bids_without_optional_columns_and_bare_participant_ids(tmp_path):
    root = tmp_path / "bids"
    write_text(root / "participants.tsv", ["participant_id\tage", *(f"{i:02d}\t{30 + i}" for i in range(4))])
    for i in range(4):
        touch(root / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_run-1_T1w.nii")
    records = all_records(ingest_bids(str(root), str(tmp_path / "bids.json")))
    assert sorted(rec["subject"] for rec in records) == ["sub-00", "sub-01", "sub-02", "sub-03"]
    assert {(rec["sex"], rec["site"]) for rec in records} == {("U", "unknown")}


def test_bids_with_nothing_usable_names_the_dataset(tmp_path):
    root = make_bids(tmp_path / "bids", ["sub-01\tn/a\tM\tA\tCN"])
    with pytest.raises(InputError, match=f"{root.resolve()}: no usable scan.*bids_skipped.csv"):
        ingest_bids(str(root), str(tmp_path / "bids.json"))
    assert skipped_reasons(tmp_path / "bids.json") == {"sub-01": "age missing"}


def test_bids_folds_write_one_datalist_per_fold_testing_each_subject_once(tmp_path):
    root = make_bids(tmp_path / "bids", bids_rows(10))
    paths = ingest_bids(str(root), str(tmp_path / "cv.json"), folds=3, seed=2)
    assert [p.name for p in paths] == ["cv_fold0.json", "cv_fold1.json", "cv_fold2.json"]
    tested = [rec["subject"] for p in paths for rec in read_datalist(p)["test"]]
    assert sorted(tested) == [f"sub-{i:02d}" for i in range(10)]
    meta = json.loads(paths[1].read_text())
    assert (meta["fold"], meta["folds"]) == (1, 3)


def test_bids_split_is_deterministic_per_seed(tmp_path):
    root = make_bids(tmp_path / "bids", bids_rows(20))
    a = ingest_bids(str(root), str(tmp_path / "a.json"), seed=3).read_text()
    b = ingest_bids(str(root), str(tmp_path / "b.json"), seed=3).read_text()
    c = ingest_bids(str(root), str(tmp_path / "c.json"), seed=4).read_text()
    assert a.replace("a_skipped", "b_skipped") == b
    assert json.loads(a)["test"] != json.loads(c)["test"]


# ------------------------------------------------------------------------------------------------- CSV


def test_csv_with_custom_columns_relative_and_absolute_paths_and_multi_scan_subjects(tmp_path):
    data = tmp_path / "data"
    elsewhere = touch(tmp_path / "elsewhere" / "p5.nii.gz")
    rows = [f"scans/p{i}_{v}.nii.gz,{50 + i + v},p{i},{'CN' if i % 2 else 'AD'},f" for i in range(5) for v in (0, 1)]
    rows += [f"{elsewhere},70,p5,0,m", "scans/missing.nii.gz,50,p6,1,m", "scans/p7.nii.gz,50,,0,m"]
    for i in range(5):
        for v in (0, 1):
            touch(data / "scans" / f"p{i}_{v}.nii.gz")
    touch(data / "scans" / "p7.nii.gz")
    table = write_text(data / "table.csv", ["path,years,id,dx,gender", *rows])
    out = ingest_csv(str(table), str(tmp_path / "csv.json"), image_column="path", age_column="years",
                     subject_column="id", sex_column="gender", label_column="dx")
    subjects = by_subject(all_records(out))
    assert sorted(subjects) == ["p0", "p1", "p2", "p3", "p4", "p5"]
    assert [rec["age"] for rec in subjects["p2"]] == [52.0, 53.0]
    assert (subjects["p1"][0]["label"], subjects["p2"][0]["label"], subjects["p5"][0]["label"]) == (0, 1, 0)
    assert Path(subjects["p5"][0]["image"]) == elsewhere.resolve()
    assert subjects["p5"][0]["sex"] == "M" and subjects["p0"][0]["site"] == "unknown"
    reasons = skipped_reasons(tmp_path / "csv.json")
    assert reasons["p6"] == f"image not found: {data / 'scans' / 'missing.nii.gz'}"
    assert reasons[""] == "subject missing"


def test_csv_without_subject_column_makes_each_image_a_subject(tmp_path):
    lines = ["image,age"] + [f"{touch(tmp_path / f'x{i}.nii')},{20 + i}" for i in range(4)]
    out = ingest_csv(str(write_text(tmp_path / "t.tsv", [line.replace(",", "\t") for line in lines])),
                     str(tmp_path / "out" / "dl.json"), subject_column=None)
    assert sorted(rec["subject"] for rec in all_records(out)) == ["x0", "x1", "x2", "x3"]


def test_csv_missing_columns_are_named(tmp_path):
    table = write_text(tmp_path / "t.csv", ["image,age", "a.nii,30"])
    with pytest.raises(InputError, match=r"t\.csv: no column\(s\) \['subject', 'sex'\]"):
        ingest_csv(str(table), str(tmp_path / "dl.json"), sex_column="sex")
