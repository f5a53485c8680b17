"""Fuzzing of what users hand the bundles: generated datalists (types, keys, values, paths, encodings) and
NIfTI files (shapes, dtypes, affines, scaling, NaN/Inf, empty or cut-off files). Each is accepted, or
refused with an InputError whose lines each name a problem; never another exception. Deterministic
(``derandomize``): the same cases every run."""
from __future__ import annotations

import gzip
import json
import math
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brainage_core.checks import check_bundle_inputs, load_split, validate_datalist
from brainage_core.volumes import InputError

SIZE = (6, 6, 6)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GOOD = np.random.default_rng(0).random(SIZE).astype(np.float32) + 0.5

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["45", "n/a", "1e400", "-3", "NaN", "  ", "é", "\x00"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                      max_leaves=6)
image_refs = st.sampled_from(["good.nii.gz", "missing.nii.gz", "folder", "notes.txt", "../outside.nii.gz", "", ".", "good.nii.gz/x"])
records = st.one_of(
    st.fixed_dictionaries({"image": image_refs, "age": scalars}, optional={"subject": scalars, "label": scalars}),
    st.dictionaries(st.sampled_from(["image", "age", "label", "subject", "extra", ""]), values, max_size=4),
    values,
)
datalists = st.one_of(
    st.dictionaries(st.sampled_from(["training", "validation", "test", "Training", ""]),
                    st.one_of(st.lists(records, max_size=4), values), max_size=3),
    values,
)


def _dataset(root: Path) -> Path:
    (root / "folder").mkdir(parents=True)
    (root / "notes.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(GOOD, np.diag([4.0, 4.0, 4.0, 1.0])), root / "good.nii.gz")
    return root


def _refused_cleanly(call) -> None:
    """``call()`` returns, or raises an InputError of non-empty lines; any other exception fails the test."""
    try:
        call()
    except InputError as err:
        lines = str(err).splitlines()
        assert lines and all(line.strip() for line in lines), repr(str(err))


@FUZZ
@given(content=datalists, encoding=st.sampled_from(["json", "latin-1 text", "truncated", "empty"]))
def test_generated_datalists_are_accepted_or_refused_cleanly(content, encoding):
    with tempfile.TemporaryDirectory() as tmp:
        root = _dataset(Path(tmp))
        path = root / "datalist.json"
        text = json.dumps(content, allow_nan=True)
        data = {"json": text.encode(), "latin-1 text": ("{\"training\": [\"é" + text).encode("latin-1", "replace"),
                "truncated": text.encode()[: max(1, len(text) // 2)], "empty": b""}[encoding]
        path.write_bytes(data)
        _refused_cleanly(lambda: validate_datalist(path, ["training"], target_key="age", image_size=SIZE))
        _refused_cleanly(lambda: load_split(path, "training"))


@FUZZ
@given(records=st.lists(records, max_size=4), splits=st.booleans())
def test_generated_records_passed_in_memory_are_accepted_or_refused_cleanly(records, splits):
    with tempfile.TemporaryDirectory() as tmp:
        root = _dataset(Path(tmp))
        rows = [{**r, "image": str(root / r["image"])} if isinstance(r, dict) and isinstance(r.get("image"), str) else r
                for r in records]
        data = {"training": rows, "validation": rows[:1]} if splits else rows
        _refused_cleanly(lambda: check_bundle_inputs(data, "age", SIZE, "refuse", [str(root / "out")], 1))


dtypes = st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32, np.float64, np.complex64])
shapes = st.one_of(st.just(SIZE), st.just(SIZE), st.lists(st.integers(0, 7), min_size=0, max_size=5).map(tuple))
affine_entries = st.floats(-10, 10) | st.sampled_from([0.0, math.nan, math.inf, 4.0])


def _with_header_fields(nii: bytes, slope: float | None, affine: list[list[float]] | None) -> bytes:
    """An uncompressed NIfTI-1 file with its scaling slope and sform written into the header bytes, past
    the checks nibabel makes when it writes (fields at their NIfTI-1 offsets: scl_slope 112, qform_code
    252, sform_code 254, srow_x/y/z 280)."""
    header = bytearray(nii)
    if slope is not None:
        header[112:116] = np.float32(slope).tobytes()
    if affine is not None:
        header[252:256] = np.array([0, 1], dtype=np.int16).tobytes()
        header[280:328] = np.array(affine[:3], dtype=np.float32).tobytes()
    return bytes(header)


@FUZZ
@given(shape=shapes, dtype=dtypes, fill=st.sampled_from(["random"] * 4 + ["constant", "nan", "inf", "huge"]),
       affine=st.one_of(st.none(), st.none(), st.lists(st.lists(affine_entries, min_size=4, max_size=4), min_size=4, max_size=4)),
       slope=st.sampled_from([None] * 6 + [0.0, 2.0, -1.0, math.nan, math.inf]),
       damage=st.sampled_from(["none"] * 6 + ["truncated", "garbage", "empty", "bad gzip", "extension", "uncompressed"]))
def test_generated_nifti_files_are_accepted_or_refused_cleanly(shape, dtype, fill, affine, slope, damage):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.nii"
        data = np.random.default_rng(1).random(shape) * 100
        data = {"random": data, "constant": np.ones(shape), "nan": np.full(shape, np.nan),
                "inf": np.full(shape, np.inf), "huge": np.full(shape, 1e300)}[fill]
        with np.errstate(all="ignore"):
            image = nib.Nifti1Image(data.astype(dtype), np.diag([4.0, 4.0, 4.0, 1.0]), dtype=dtype)
        if damage == "extension":
            image.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"x" * 100_000))
        nib.save(image, path)
        nii = _with_header_fields(path.read_bytes(), slope, affine)
        packed = gzip.compress(nii, mtime=0)
        damaged = {"none": packed, "truncated": gzip.compress(nii[:300], mtime=0), "garbage": b"\x00\xffNIfTI?" * 50,
                   "empty": b"", "bad gzip": packed[:20] + b"\x00" * 40 + packed[60:], "extension": packed,
                   "uncompressed": nii}[damage]
        path.unlink()
        path = path.with_suffix(".nii" if damage == "uncompressed" else ".nii.gz")
        path.write_bytes(damaged)
        _refused_cleanly(lambda: check_bundle_inputs([{"image": str(path), "age": 50.0}], "age", SIZE, "refuse",
                                                     [str(Path(tmp) / "out")], 1))
