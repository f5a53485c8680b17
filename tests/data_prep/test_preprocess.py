"""Preprocessing of real raw heads (the IXI sample) and of bad inputs, through the batch entry points."""
import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from brainage_core.datalist import read_datalist, write_datalist
from brainage_core.grid import canonical_grid
from brainage_core.volumes import InputError, normalise_intensity
from data_prep.preprocess import (
    MAX_MISALIGNMENT_MM,
    MIN_TEMPLATE_CORRELATION,
    preprocess_command,
    preprocess_datalist,
    qc_failure,
    residual_misalignment_mm,
    template_on_grid,
)
from data_prep.qc import normalised_correlation

RESOLUTION = 4.0  # 48^3: the fast grid; registration itself runs on the scans' own 2 mm voxels
SUBJECTS = ("IXI012-HH-1211", "IXI015-HH-1258")


def _datalist(path, images_by_subject):
    records = [{"image": str(image), "age": 30.0, "sex": "M", "site": "HH", "subject": subject}
               for subject, image in images_by_subject.items()]
    return write_datalist(path, {"training": records[:1], "validation": records[1:], "test": []})


@pytest.fixture(scope="module")
def ixi_run(ixi_sample, tmp_path_factory):
    """Both IXI heads preprocessed once, in this process (workers=1)."""
    root = tmp_path_factory.mktemp("ixi")
    datalist = _datalist(root / "raw.json", {s: ixi_sample / f"{s}_T1.nii.gz" for s in SUBJECTS})
    out = root / "out"
    summary = preprocess_datalist(datalist, out, resolution=RESOLUTION, workers=1)
    return datalist, out, summary


@pytest.mark.slow
def test_ixi_heads_become_brains_on_the_canonical_grid(ixi_run):
    _, out, summary = ixi_run
    assert sorted(summary.processed) == sorted(SUBJECTS) and not summary.failures
    grid = canonical_grid(RESOLUTION)
    template = template_on_grid(RESOLUTION)
    shell = template.mask & ~ndi.binary_erosion(template.mask)
    deep = ndi.distance_transform_edt(template.mask, sampling=RESOLUTION) > 15
    for subject in SUBJECTS:
        img = nib.load(out / "images" / f"{subject}.nii.gz")
        data = img.get_fdata()
        assert img.shape == grid.shape
        np.testing.assert_allclose(img.affine, grid.affine)
        assert normalised_correlation(data, template.image, template.brain) > MIN_TEMPLATE_CORRELATION
        # skull stripped: nothing outside the (grown) template brain mask
        assert np.count_nonzero(data[~template.mask]) == 0
        # and no bright scalp at the mask's edge: measured edge/deep-brain median ratio 0.58-0.61 here;
        # scalp fat, brighter than white matter, would push it above 1
        assert np.median(data[shell]) < 0.75 * np.median(data[deep])
        # normalised: the 99th percentile of the brain is 1
        assert np.percentile(data[template.mask], 99) == pytest.approx(1.0, abs=0.01)
        assert (out / "qc" / f"{subject}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_ixi_qc_table_and_new_datalist(ixi_run):
    raw, out, _ = ixi_run
    qc = pd.read_csv(out / "qc.csv").set_index("subject")
    assert sorted(qc.index) == sorted(SUBJECTS)
    assert (qc["template_correlation"] > MIN_TEMPLATE_CORRELATION).all()
    assert (qc["registration_metric"] < -0.2).all()  # good fits scored about -0.26, failed ones -0.10
    assert qc["brain_volume_ml"].between(1000, 2200).all()
    # registered well: the QC re-registration moves them by a fraction of a voxel, and flags neither
    assert (qc["misalignment_mm"] < MAX_MISALIGNMENT_MM / 2).all() and qc["qc_warning"].isna().all()
    assert (qc["registration_starts"] == 3).all()  # passed QC from the upright starts: no retry
    assert (qc["seconds"] > 0).all()
    assert pd.read_csv(out / "failures.csv").empty
    before, after = read_datalist(raw), read_datalist(out / "datalist.json")
    assert {k: len(v) for k, v in after.items()} == {k: len(v) for k, v in before.items()}
    for record in after["training"] + after["validation"]:
        assert record["image"] == str(out / "images" / f"{record['subject']}.nii.gz")
        assert record["age"] == 30.0


@pytest.mark.slow
def test_rerun_skips_finished_scans(ixi_run):
    datalist, out, _ = ixi_run
    volumes = [out / "images" / f"{s}.nii.gz" for s in SUBJECTS]
    mtimes = [os.stat(v).st_mtime_ns for v in volumes]
    summary = preprocess_datalist(datalist, out, resolution=RESOLUTION, workers=1)
    assert summary.processed == [] and sorted(summary.resumed) == sorted(SUBJECTS)
    assert [os.stat(v).st_mtime_ns for v in volumes] == mtimes
    assert len(pd.read_csv(out / "qc.csv")) == 2


def _bad_inputs(folder):
    """One unusable file per failure mode, written with nibabel."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    head = rng.random((20, 20, 20), dtype=np.float32) + 1.0
    files = {}

    def save(name, data):
        files[name] = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), files[name])

    save("four_d", np.stack([head] * 3, axis=-1))
    save("two_d", head[:, :, 0])
    with_nan = head.copy()
    with_nan[5, 5, 5] = np.nan
    save("nan_voxels", with_nan)
    save("constant", np.full((20, 20, 20), 7.0, dtype=np.float32))
    save("truncated", head)
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:200])
    return files


EXPECTED_REASONS = {"four_d": "3 volumes", "two_d": "not a 3D volume", "nan_voxels": "NaN",
                    "constant": "empty", "truncated": "not a readable NIfTI"}


def _not_a_brain(folder):
    """A readable 3D volume that is no head: a bright cube. It registers, badly (correlation about 0.34)."""
    cube = np.zeros((60, 60, 60), np.float32)
    cube[10:50, 10:50, 10:50] = 100.0
    cube += np.random.default_rng(0).uniform(0, 5, cube.shape).astype(np.float32)
    path = folder / "not_a_brain.nii.gz"
    nib.save(nib.Nifti1Image(cube, np.diag([3.0, 3.0, 3.0, 1.0])), path)
    return path


@pytest.mark.slow
def test_bad_inputs_fail_alone_and_the_command_exits_non_zero(ixi_sample, tmp_path, capsys):
    files = {**_bad_inputs(tmp_path), "not_a_brain": _not_a_brain(tmp_path)}
    good = "IXI015-HH-1258"
    datalist = _datalist(tmp_path / "raw.json", {good: ixi_sample / f"{good}_T1.nii.gz", **files})
    out = tmp_path / "out"
    # a temporary file left by a crash mid-write must not count as the finished volume
    (out / "images").mkdir(parents=True)
    (out / "images" / f".{good}.nii.gz.x1y2.part.nii.gz").write_bytes(b"half a volume")
    with pytest.raises(SystemExit) as exit_info:
        preprocess_command(str(datalist), str(out), resolution=RESOLUTION, workers=1)
    assert exit_info.value.code == 1
    failures = pd.read_csv(out / "failures.csv").set_index("subject")
    assert sorted(failures.index) == sorted(files)
    for name, reason in {**EXPECTED_REASONS, "not_a_brain": "registration failed: correlation"}.items():
        assert reason in failures.loc[name, "reason"]
        assert failures.loc[name, "file"] == str(files[name])
    # the scan that registered but failed QC has its picture, to see why; the unreadable ones have none
    assert failures.loc["not_a_brain", "qc_picture"] == str(out / "qc" / "not_a_brain.png")
    assert (out / "qc" / "not_a_brain.png").read_bytes()[:4] == b"\x89PNG"
    assert failures.drop(index="not_a_brain")["qc_picture"].isna().all()
    assert nib.load(out / "images" / f"{good}.nii.gz").shape == canonical_grid(RESOLUTION).shape
    kept = [rec["subject"] for recs in read_datalist(out / "datalist.json").values() for rec in recs]
    assert kept == [good]
    printed = capsys.readouterr().out
    assert "1 scan(s) processed" in printed and "6 failed" in printed and "FAILED two_d" in printed


def test_worker_processes_record_failures(tmp_path):
    """The process pool path: failures come back from the workers and nothing is written for them."""
    files = _bad_inputs(tmp_path)
    picked = {name: files[name] for name in ("four_d", "truncated")}
    out = tmp_path / "out"
    summary = preprocess_datalist(_datalist(tmp_path / "raw.json", picked), out, resolution=RESOLUTION, workers=2)
    assert sorted(f["subject"] for f in summary.failures) == sorted(picked)
    assert not (out / "images").exists()
    assert json.loads((out / "datalist.json").read_text())["training"] == []


def test_each_scan_of_a_subject_is_its_own_job(tmp_path):
    files = _bad_inputs(tmp_path)
    records = [{"image": str(files[name]), "age": 30.0, "sex": "M", "site": "HH", "subject": "s1"}
               for name in ("four_d", "two_d")]
    summary = preprocess_datalist(write_datalist(tmp_path / "raw.json", {"training": records}), tmp_path / "out",
                                  resolution=RESOLUTION, workers=1)
    assert sorted(f["file"] for f in summary.failures) == sorted([str(files["four_d"]), str(files["two_d"])])


def test_scans_that_would_share_an_output_are_refused(tmp_path):
    scans = [tmp_path / folder / "T1.nii.gz" for folder in ("a", "b")]
    records = [{"image": str(p), "age": 30.0, "sex": "M", "site": "HH", "subject": "s1"} for p in scans]
    datalist = write_datalist(tmp_path / "raw.json", {"training": records})
    with pytest.raises(InputError, match="would both be written as s1_T1"):
        preprocess_datalist(datalist, tmp_path / "out", resolution=RESOLUTION, workers=1)


@pytest.mark.parametrize("option, message", [({"dtype": "int8"}, "dtype 'int8'"), ({"workers": 0}, "workers"),
                                             ({"resolution": 0.7}, "0.7")])
def test_bad_options_are_input_errors(tmp_path, option, message):
    with pytest.raises(InputError, match=message):
        preprocess_datalist(tmp_path / "raw.json", tmp_path / "out", **option)


def test_missing_datalist_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="raw.json: datalist not found"):
        preprocess_datalist(tmp_path / "raw.json", tmp_path / "out")


def _moved(degrees_about_z: float, shift_mm) -> np.ndarray:
    """A rigid move of template space about the template brain's centre."""
    template = template_on_grid(4.0)
    centre = template.grid.world_coordinates()[:, template.brain].mean(axis=1)
    angle = np.deg2rad(degrees_about_z)
    move = np.eye(4)
    move[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    move[:3, 3] = centre - move[:3, :3] @ centre + np.asarray(shift_mm, float)
    return move


@pytest.mark.parametrize("degrees, shift_mm, low, high", [(0, (0, 0, 0), 0.0, 0.8), (0, (0, 8, 0), 7.0, 9.0),
                                                          (0, (5, 0, -5), 6.0, 8.2), (8, (0, 0, 0), 4.5, 7.5)])
def test_residual_misalignment_measures_how_far_a_head_sits_off_the_template(degrees, shift_mm, low, high):
    """The template head itself, placed exactly, shifted or rotated about z: the QC re-registration gives
    the mean displacement of the brain (8 degrees about the brain's centre move it about 6 mm)."""
    from nilearn import datasets

    head = datasets.load_mni152_template(resolution=2)
    data = np.asarray(head.dataobj, dtype=np.float32)
    assert low <= residual_misalignment_mm(data, _moved(degrees, shift_mm) @ head.affine) <= high


def test_a_registration_failing_qc_is_retried_from_turned_starts_and_the_better_kept(monkeypatch):
    """The template head as the scan: the upright starts (stubbed) leave it 10 mm off, the turned ones find
    it; register_scan keeps the second and counts every start."""
    from data_prep import preprocess

    template = template_on_grid(4.0)
    head = nib.Nifti1Image(template.image, template.grid.affine)
    calls = []

    def register(image, affine, mask, turns):
        calls.append(len(turns))
        matrix = np.eye(4)
        matrix[0, 3] = 10.0 if len(turns) == 1 else 0.0
        return preprocess.Registration(matrix=matrix, metric=-0.3)

    monkeypatch.setattr(preprocess, "register_to_template", register)
    scan = preprocess.register_scan(head, template)
    assert calls == [1, len(preprocess.RETRY_TURNS_DEG)]
    assert scan.qc["misalignment_mm"] < 1.0 and scan.qc["qc_warning"] == ""
    assert scan.qc["registration_starts"] == 3 * (1 + len(preprocess.RETRY_TURNS_DEG))
    np.testing.assert_allclose(scan.registration.matrix, np.eye(4))

    def retry_fails(image, affine, mask, turns):
        if len(turns) > 1:
            raise preprocess.RegistrationError("elastix failed")
        return register(image, affine, mask, turns)

    monkeypatch.setattr(preprocess, "register_to_template", retry_fails)
    kept = preprocess.register_scan(head, template)  # the first result stands, its QC warning with it
    assert kept.registration.matrix[0, 3] == 10.0 and "misalignment" in kept.qc["qc_warning"]


def test_qc_warnings_fail_a_scan_or_flag_it_as_chosen():
    good = {"template_correlation": 0.7, "registration_metric": -0.3, "qc_warning": ""}
    shifted = {**good, "qc_warning": "residual misalignment 7.0 mm is above 3 mm"}
    assert qc_failure(good) == qc_failure(good, "flag") == ""
    assert qc_failure(shifted) == shifted["qc_warning"] and qc_failure(shifted, "flag") == ""
    assert "registration failed" in qc_failure({**good, "template_correlation": 0.2}, "flag")
    with pytest.raises(InputError, match="on_qc_warning"):
        preprocess_datalist("raw.json", "out", on_qc_warning="ignore")


def test_normalisation_scales_the_brain_and_zeroes_the_rest():
    rng = np.random.default_rng(1)
    image = rng.uniform(10, 20, size=(10, 10, 10)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[2:8, 2:8, 2:8] = True
    out = normalise_intensity(image, mask)
    assert np.all(out[~mask] == 0)
    assert np.percentile(out[mask], 99) == pytest.approx(1.0)
    np.testing.assert_allclose(out[mask] / image[mask], out[mask][0] / image[mask][0], rtol=1e-6)
