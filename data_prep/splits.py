"""Seeded subject-level splits of datalist records: training/validation/test, or k folds.

Records are grouped by ``subject`` first, so the scans of one subject always land in the same split.
Each subject is summarised by its mean age and its diagnosis (AD if any of its scans is labelled AD).

Stratification: subjects are grouped by label, then into equal-count age bins within each label (ranks,
so bins stay equal-sized however ages tie). The subjects are laid out stratum after stratum, each stratum
shuffled, and the positions of that sequence are dealt to the splits by an even, quota-tracking pattern
(like dealing cards), rotated by a random offset. Every split therefore gets its exact overall count and
each stratum is shared out between the splits in proportion, down to rounding; small cohorts still get a
subject in every split that asks for one.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from brainage_core.datalist import SPLITS
from brainage_core.volumes import InputError

Subject = tuple[str, list[dict]]


def split_records(records: Sequence[dict], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
                  n_age_bins: int = 5) -> dict[str, list[dict]]:
    """Split records into ``training``/``validation``/``test`` by subject, stratified by age and label.

    ``fractions`` are subject fractions (not scan fractions) in that order; a zero fraction gives an empty
    split. Every split with a positive fraction gets at least one subject, so InputError is raised when
    there are fewer subjects than such splits.
    """
    fractions = _check_fractions(fractions, len(SPLITS))
    rng = np.random.default_rng(seed)
    return _split_subjects(_group_by_subject(records), fractions, rng, n_age_bins)


def kfold_records(records: Sequence[dict], k: int = 5, seed: int = 0, val_fraction: float = 0.15,
                  n_age_bins: int = 5) -> list[dict[str, list[dict]]]:
    """Return ``k`` datalists; fold ``i`` tests on the ``i``-th of k stratified subject folds.

    The other ``k - 1`` folds are split again, stratified, into training and validation, with
    ``val_fraction`` the validation share of those remaining subjects. Every subject is in exactly one
    test set across the folds.
    """
    if not isinstance(k, int) or k < 2:
        raise InputError(f"k-fold needs an integer k >= 2, got {k!r}")
    inner = _check_fractions((1.0 - val_fraction, val_fraction, 0.0), len(SPLITS))
    subjects = _group_by_subject(records)
    rng = np.random.default_rng(seed)
    fold_of = _assign(subjects, [1.0 / k] * k, rng, n_age_bins)
    datalists = []
    for fold in range(k):
        rest = [subj for subj, f in zip(subjects, fold_of) if f != fold]
        split = _split_subjects(rest, inner, rng, n_age_bins)
        split["test"] = [rec for subj, f in zip(subjects, fold_of) if f == fold for rec in subj[1]]
        datalists.append(split)
    return datalists


def _split_subjects(subjects: list[Subject], fractions: list[float], rng: np.random.Generator,
                    n_age_bins: int) -> dict[str, list[dict]]:
    split_of = _assign(subjects, fractions, rng, n_age_bins)
    return {
        name: [rec for subj, s in zip(subjects, split_of) if s == i for rec in subj[1]]
        for i, name in enumerate(SPLITS)
    }


def _check_fractions(fractions: Sequence[float], n: int) -> list[float]:
    fractions = [float(f) for f in fractions]
    if len(fractions) != n or any(not math.isfinite(f) or f < 0 for f in fractions):
        raise InputError(f"fractions must be {n} non-negative numbers, got {fractions}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise InputError(f"fractions must sum to 1, got {fractions} (sum {sum(fractions):g})")
    return fractions


def _group_by_subject(records: Sequence[dict]) -> list[Subject]:
    """Records grouped by subject id, in sorted id order so the input order does not change the split."""
    groups: dict[str, list[dict]] = {}
    for i, rec in enumerate(records):
        if "subject" not in rec or "age" not in rec:
            raise InputError(f"record {i} ({rec.get('image', 'no image')}) lacks a 'subject' or 'age' key")
        groups.setdefault(str(rec["subject"]), []).append(rec)
    return sorted(groups.items())


def _subject_label(recs: list[dict]) -> int:
    """1 (AD) if any scan is labelled AD, 0 if labelled CN only, -1 when no scan has a label."""
    return max((int(rec["label"]) for rec in recs if rec.get("label") is not None), default=-1)


def _assign(subjects: list[Subject], fractions: list[float], rng: np.random.Generator,
            n_age_bins: int) -> np.ndarray:
    """Index of the part (0 .. len(fractions) - 1) each subject goes to, stratified by label and age."""
    counts = _part_sizes(len(subjects), fractions)
    order = _stratified_order(subjects, rng, n_age_bins)
    pattern = np.roll(_deal(counts), rng.integers(len(subjects)))
    part_of = np.empty(len(subjects), dtype=int)
    part_of[order] = pattern
    return part_of


def _part_sizes(n: int, fractions: list[float]) -> np.ndarray:
    """Largest-remainder counts, then at least one subject for each part with a positive fraction."""
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n < len(wanted):
        raise InputError(f"{n} subject(s) cannot fill {len(wanted)} non-empty splits; "
                         f"need at least {len(wanted)} subjects, or a zero fraction for a split "
                         f"that may stay empty (fractions {fractions})")
    exact = np.array(fractions) * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    for i in wanted:
        if counts[i] == 0:
            counts[i] = 1
            counts[np.argmax(counts)] -= 1
    return counts


def _deal(counts: np.ndarray) -> np.ndarray:
    """A sequence holding part ``i`` ``counts[i]`` times, each part spread evenly along it."""
    n = int(counts.sum())
    dealt = np.zeros(len(counts))
    sequence = np.empty(n, dtype=int)
    for pos in range(n):
        part = int(np.argmax(counts * (pos + 1) / n - dealt))
        sequence[pos] = part
        dealt[part] += 1
    return sequence


def _stratified_order(subjects: list[Subject], rng: np.random.Generator, n_age_bins: int) -> np.ndarray:
    """Subject indices ordered by (label, age bin), shuffled within each stratum."""
    if not isinstance(n_age_bins, int) or n_age_bins < 1:
        raise InputError(f"n_age_bins must be an integer >= 1, got {n_age_bins!r}")
    ages = np.array([np.mean([float(rec["age"]) for rec in recs]) for _, recs in subjects])
    labels = np.array([_subject_label(recs) for _, recs in subjects])
    shuffled = rng.permutation(len(subjects))
    age_bin = np.empty(len(subjects), dtype=int)
    for label in np.unique(labels):
        members = shuffled[labels[shuffled] == label]
        by_age = members[np.argsort(ages[members], kind="stable")]
        age_bin[by_age] = np.arange(len(by_age)) * n_age_bins // len(by_age)
    return shuffled[np.lexsort((age_bin[shuffled], labels[shuffled]))]
