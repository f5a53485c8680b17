"""Subject-level, stratified, seeded splits and k folds."""
import numpy as np
import pytest

from brainage_core.volumes import InputError
from data_prep.splits import kfold_records, split_records

FRACTIONS = {"training": 0.7, "validation": 0.15, "test": 0.15}


def cohort(n, seed=0, labels=False, scans=1):
    """``n`` subjects aged 20-90 (30 % AD when ``labels``), each with ``scans`` records."""
    rng = np.random.default_rng(seed)
    ages = rng.uniform(20, 90, n)
    is_ad = rng.random(n) < 0.3
    records = []
    for i in range(n):
        for scan in range(scans):
            rec = {"image": f"s{i:03d}_scan{scan}.nii.gz", "age": float(ages[i]) + scan, "subject": f"s{i:03d}"}
            if labels:
                rec["label"] = int(is_ad[i])
            records.append(rec)
    return records


def subjects(records):
    return {rec["subject"] for rec in records}


def images(split):
    return sorted(rec["image"] for recs in split.values() for rec in recs)


def assert_partition(split, records):
    """Every record exactly once, and no subject in two splits."""
    assert images(split) == sorted(rec["image"] for rec in records)
    names = list(split)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not subjects(split[a]) & subjects(split[b]), (a, b)


def test_split_is_a_subject_partition_with_multi_scan_subjects():
    records = cohort(40, scans=3)
    split = split_records(records, seed=3)
    assert set(split) == {"training", "validation", "test"}
    assert_partition(split, records)
    for recs in split.values():
        for subject in subjects(recs):
            assert sum(rec["subject"] == subject for rec in recs) == 3


def test_split_sizes_follow_fractions_in_subjects():
    split = split_records(cohort(100, scans=2), seed=0)
    assert {name: len(subjects(recs)) for name, recs in split.items()} == {
        "training": 70, "validation": 15, "test": 15}


@pytest.mark.parametrize("seed", range(5))
def test_split_balances_age_quintiles(seed):
    # A plain random 30-subject test set misses the +-1 band in some quintile most of the time.
    records = cohort(200, seed=seed)
    ages = np.array([rec["age"] for rec in records])
    edges = np.quantile(ages, [0.2, 0.4, 0.6, 0.8])
    split = split_records(records, seed=seed)
    for name, recs in split.items():
        counts = np.bincount(np.searchsorted(edges, [rec["age"] for rec in recs]), minlength=5)
        assert np.all(np.abs(counts - FRACTIONS[name] * 40) <= 1), (name, counts)


@pytest.mark.parametrize("seed", range(5))
def test_split_stratifies_diagnosis_and_age_within_diagnosis(seed):
    records = cohort(200, seed=seed, labels=True)
    split = split_records(records, seed=seed)
    for label in (0, 1):
        group = sorted((rec for rec in records if rec["label"] == label), key=lambda rec: rec["age"])
        age_bin = {rec["subject"]: rank * 5 // len(group) for rank, rec in enumerate(group)}  # equal-count bins
        for name, recs in split.items():
            bins = [age_bin[rec["subject"]] for rec in recs if rec["label"] == label]
            assert abs(len(bins) - FRACTIONS[name] * len(group)) <= 1
            counts = np.bincount(bins, minlength=5)
            # the dealing pattern keeps each part within 1 of its quota at every prefix, so within 2 in a bin
            assert np.all(np.abs(counts - FRACTIONS[name] * len(group) / 5) < 2), (label, name, counts)


def test_split_is_deterministic_per_seed_and_ignores_input_order():
    records = cohort(50, labels=True)
    shuffled = [records[i] for i in np.random.default_rng(1).permutation(len(records))]
    a, b = split_records(records, seed=7), split_records(shuffled, seed=7)
    assert {k: sorted(subjects(v)) for k, v in a.items()} == {k: sorted(subjects(v)) for k, v in b.items()}
    c = split_records(records, seed=8)
    assert subjects(a["test"]) != subjects(c["test"])


@pytest.mark.parametrize("n", [3, 4, 5])
def test_tiny_cohorts_fill_every_split(n):
    split = split_records(cohort(n), seed=0)
    assert all(len(recs) >= 1 for recs in split.values())
    assert_partition(split, cohort(n))


def test_too_few_subjects_is_a_clear_error_unless_a_split_may_be_empty():
    records = cohort(4, scans=2)[:4]  # two subjects, two scans each
    with pytest.raises(InputError, match="2 subject.*at least 3 subjects"):
        split_records(records)
    split = split_records(records, fractions=(0.5, 0.0, 0.5))
    assert split["validation"] == []
    assert len(subjects(split["training"])) == len(subjects(split["test"])) == 1


@pytest.mark.parametrize("fractions", [(0.7, 0.2, 0.2), (0.5, 0.5), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_rejected(fractions):
    with pytest.raises(InputError, match="fractions"):
        split_records(cohort(10), fractions=fractions)


def test_records_without_subject_are_rejected():
    with pytest.raises(InputError, match="record 1"):
        split_records([{"subject": "a", "age": 3.0}, {"age": 4.0, "image": "b.nii"}])


def test_kfold_tests_every_subject_once_and_partitions_each_fold():
    records = cohort(53, labels=True, scans=2)
    folds = kfold_records(records, k=5, seed=2)
    assert len(folds) == 5
    tested = [subjects(fold["test"]) for fold in folds]
    assert sorted(s for t in tested for s in t) == sorted(subjects(records))
    assert max(map(len, tested)) - min(map(len, tested)) <= 1
    for fold in folds:
        assert_partition(fold, records)
        rest = len(subjects(records)) - len(subjects(fold["test"]))
        assert abs(len(subjects(fold["validation"])) - 0.15 * rest) <= 1


def test_kfold_is_deterministic_and_works_at_k_equals_n():
    records = cohort(5)
    assert kfold_records(records, k=5, seed=4) == kfold_records(records, k=5, seed=4)
    assert all(len(fold["test"]) == 1 and fold["validation"] for fold in kfold_records(records, k=5))


@pytest.mark.parametrize("k", [1, 6])
def test_kfold_rejects_impossible_k(k):
    with pytest.raises(InputError):
        kfold_records(cohort(5), k=k)
