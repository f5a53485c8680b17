"""The canonical grid, volume checks, atomic writes and datalists."""
import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from brainage_core.datalist import read_datalist, write_datalist
from brainage_core.grid import canonical_grid
from brainage_core.volumes import InputError, atomic_path, load_volume, save_nifti


@pytest.mark.parametrize("res, n", [(1, 192), (2, 96), (4, 48)])
def test_grid_shape_and_centre(res, n):
    g = canonical_grid(res)
    assert g.shape == (n, n, n)
    centre = g.world_coordinates().reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(centre, [0.0, -17.0, 5.0], atol=1e-9)
    # RAS+: increasing voxel index moves right, anterior, superior
    assert np.all(np.diag(g.affine)[:3] == res)
    np.testing.assert_allclose(g.voxel_of(g.affine[:3, 3]), 0.0, atol=1e-12)


def test_grid_covers_template_brain():
    g = canonical_grid(2)
    lo, hi = g.affine[:3, 3], g.affine[:3, 3] + 2 * (np.array(g.shape) - 1)
    assert np.all(lo < [-72, -107, -72]) and np.all(hi > [72, 73, 82])


def test_grid_rejects_resolution_that_does_not_tile():
    with pytest.raises(ValueError, match="0.7"):
        canonical_grid(0.7)


def test_save_and_load_roundtrip(tmp_path):
    g = canonical_grid(4)
    data = np.random.default_rng(0).random(g.shape).astype(np.float32)
    path = save_nifti(data, g.affine, tmp_path / "a" / "vol.nii.gz")
    img = load_volume(path)
    np.testing.assert_allclose(img.get_fdata(), data, rtol=1e-6)
    np.testing.assert_allclose(img.affine, g.affine)
    assert nib.load(path).header.get_sform(coded=True)[1] == 1
    assert [p.name for p in path.parent.iterdir()] == ["vol.nii.gz"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_atomic_path_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"not an image"), "not a readable NIfTI"),
        (lambda p: p.write_bytes(gzip.compress(b"\0" * 400)[:30]), "not a readable NIfTI"),
        (lambda p: _write(p, np.ones((8, 8, 8, 3), np.float32) * np.arange(3)), "4D image with 3 volumes"),
        (lambda p: _write(p, np.random.rand(8, 8).astype(np.float32)), "not a 3D volume"),
        (lambda p: _write(p, np.full((8, 8, 8), np.nan, np.float32)), "NaN or Inf"),
        (lambda p: _write(p, np.zeros((8, 8, 8), np.int16)), "empty"),
    ],
    ids=["garbage", "truncated-gzip", "4d", "2d", "nan", "constant"],
)
def test_load_volume_names_file_and_problem(tmp_path, make, message):
    path = tmp_path / "bad.nii.gz"
    make(path)
    with pytest.raises(InputError, match=message) as err:
        load_volume(path)
    assert str(path) in str(err.value)


def test_load_volume_accepts_single_volume_4d_and_integers(tmp_path):
    data = np.arange(512, dtype=np.int16).reshape(8, 8, 8, 1)
    img = load_volume(_write(tmp_path / "ok.nii.gz", data))
    assert img.shape == (8, 8, 8)
    assert np.asanyarray(img.dataobj).dtype == np.float32
    np.testing.assert_array_equal(img.get_fdata(), data[..., 0])


def test_datalist_paths_relative_inside_and_absolute_outside(tmp_path):
    inside = tmp_path / "ds" / "images" / "s1.nii.gz"
    outside = tmp_path / "elsewhere" / "s2.nii.gz"
    path = write_datalist(
        tmp_path / "ds" / "datalist.json",
        {"training": [{"image": str(inside), "age": 30.0, "subject": "s1"}],
         "test": [{"image": str(outside), "age": 40.0, "subject": "s2"}]},
        source="unit test",
    )
    raw = json.loads(path.read_text())
    assert raw["training"][0]["image"] == "images/s1.nii.gz"
    assert raw["test"][0]["image"] == str(outside)
    assert raw["source"] == "unit test"
    back = read_datalist(path)
    assert back["training"][0]["image"] == str(inside) and back["test"][0]["image"] == str(outside)
    assert "source" not in back
