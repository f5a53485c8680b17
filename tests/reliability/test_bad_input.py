"""Bad input: every case gets one clear message naming the file or row and the problem, found up front.

Datalists and images go through ``brainage_core.checks`` (the CLI ``python -m data_prep validate`` and the
bundles' ``initialize`` step), config mistakes through its clean error messages, checkpoint mistakes through
``brainage_core.checkpoints``.
"""
from __future__ import annotations

import copy
import gzip
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from reliability_helpers import AFFINE, BUNDLES, GAN_TINY, SIZE, SLICE_TINY, ball, bundle_command

from brainage_core.checks import user_error_message, validate_datalist
from brainage_core.datalist import read_datalist
from brainage_core.volumes import InputError, save_nifti
from custom_components.tgb_gan.networks import TGBGenerator
from data_prep.__main__ import main as data_prep_main

RNG = np.random.default_rng(1)


def _datalist(tmp_path: Path, cohort: Path, change) -> Path:
    """The cohort's datalist with ``change(splits)`` applied, written to ``tmp_path`` (absolute image paths)."""
    splits = copy.deepcopy(read_datalist(cohort / "datalist.json"))
    change(splits)
    path = tmp_path / "datalist.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits))
    return path


def _problems(err: pytest.ExceptionInfo) -> list[str]:
    return [line[4:] for line in str(err.value).splitlines()[1:]]


def _set(split, row, key, value):
    def change(splits):
        splits[split][row][key] = value
    return change


def _drop(split, row, key):
    def change(splits):
        del splits[split][row][key]
    return change


def _rename_key(split, row, old, new):
    def change(splits):
        splits[split][row][new] = splits[split][row].pop(old)
    return change


def _rename_split(old, new):
    def change(splits):
        splits[new] = splits.pop(old)
    return change


DATALIST_CASES = {
    "missing file": (_set("training", 0, "image", "images/missing.nii.gz"), "training[0] (subject sub00): {folder}/images/missing.nii.gz: file not found"),
    "duplicate subject": (_set("training", 1, "subject", "sub00"), "training[1] (subject sub00): subject sub00 is listed twice in 'training' (also at training[0])"),
    "subject in two splits": (_set("validation", 0, "subject", "sub00"), "validation[0] (subject sub00): subject sub00 is in two splits ('training' row 0 and 'validation'): a subject's scans must all be in one split"),
    "missing age": (_drop("training", 2, "age"), "training[2] (subject sub03): no 'age' key (keys: image, label, subject)"),
    "non-numeric age": (_set("training", 2, "age", "forty"), "training[2] (subject sub03): age 'forty' is not a number"),
    "negative age": (_set("training", 2, "age", -3.0), "training[2] (subject sub03): age -3.0 is negative"),
    "age not finite": (_set("training", 2, "age", float("nan")), "training[2] (subject sub03): age nan is not a finite number"),
    "empty split": (lambda s: s.update(validation=[]), "split 'validation' is empty"),
    "wrong record keys": (_rename_key("training", 3, "image", "img"), "training[3] (subject sub05): no 'image' key (keys: age, label, subject, img)"),
    "wrong split name": (_rename_split("training", "train"), "no 'training' split (the datalist has: validation, test, train)"),
}


@pytest.mark.parametrize("case", DATALIST_CASES)
def test_bad_datalist_is_reported_with_row_and_problem(tmp_path, cohort, case):
    change, expected = DATALIST_CASES[case]
    path = _datalist(tmp_path, cohort, change)
    with pytest.raises(InputError) as err:
        validate_datalist(path, ["training", "validation"], target_key="age", image_size=[SIZE] * 3)
    assert str(err.value).startswith(f"{path}: 1 problem(s) found before the run started:")
    assert _problems(err) == [expected.format(folder=path.parent)]


def test_image_outside_the_dataset_folder_is_reported_when_a_root_is_given(tmp_path, cohort):
    outside = save_nifti(ball(30, RNG), AFFINE, tmp_path / "elsewhere" / "x.nii.gz")
    path = _datalist(tmp_path, cohort, _set("training", 0, "image", str(outside)))
    validate_datalist(path, ["training"])  # no root given: fine
    with pytest.raises(InputError) as err:
        validate_datalist(path, ["training"], dataset_root=cohort)
    assert _problems(err) == [f"training[0] (subject sub00): image {outside} lies outside the dataset folder {cohort}"]


def test_every_problem_is_listed_at_once_and_nothing_is_evaluated(tmp_path, cohort):
    marker = tmp_path / "evaluated"
    attack = f"__import__('pathlib').Path('{marker}').touch()"

    def change(splits):
        splits["training"][0]["age"] = attack
        splits["training"][1]["image"] = "nowhere.nii.gz"
        splits["validation"][0]["subject"] = "sub03"
    path = _datalist(tmp_path, cohort, change)
    with pytest.raises(InputError) as err:
        validate_datalist(path, ["training", "validation"], target_key="age")
    assert len(_problems(err)) == 3
    assert _problems(err)[0].startswith("training[0] (subject sub00): age \"__import__(")
    assert _problems(err)[0].endswith("is not a number")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ images


def _nifti(path: Path, data, affine=AFFINE, dtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data) if dtype is None else np.asarray(data).astype(dtype), affine), path)
    return path


def _rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[4 * c, -4 * s, 0, 0], [4 * s, 4 * c, 0, 0], [0, 0, 4, 0], [0, 0, 0, 1.0]])


def _truncated(path: Path) -> Path:
    _nifti(path, ball(30, RNG))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_nifti(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(b"subject,age\nsub00,40\n"))
    return path


VOLUME = ball(40, RNG)
IMAGE_CASES = {
    "not NIfTI": (_not_nifti, "not a readable NIfTI image"),
    "truncated gzip": (_truncated, "not a readable NIfTI image (EOFError"),
    "2D": (lambda p: _nifti(p, VOLUME[:, :, 0]), "image of shape (16, 16); a single 3D volume is needed"),
    "4D, several volumes": (lambda p: _nifti(p, np.stack([VOLUME] * 3, -1)), "4D image with 3 volumes; a single 3D volume is needed"),
    "other shape": (lambda p: _nifti(p, VOLUME[:, :, :12]), "shape (16, 16, 12) (in RAS) differs from the model's image_size (16, 16, 16); set on_shape_mismatch to 'resample'"),
    "NaN voxels": (lambda p: _nifti(p, np.where(VOLUME > 0.5, np.nan, VOLUME)), "NaN or Inf voxels"),
    "Inf voxels": (lambda p: _nifti(p, np.where(VOLUME > 0.5, np.inf, VOLUME)), "NaN or Inf voxels"),
    "constant": (lambda p: _nifti(p, np.zeros((SIZE,) * 3, np.float32)), "image is empty (all voxels equal 0.0)"),
    "complex voxels": (lambda p: _nifti(p, VOLUME, dtype=np.complex64), "voxel type complex64 is not supported; integer or float voxels are needed"),
    "oblique affine": (lambda p: _nifti(p, VOLUME, _rotation_z(15)), "oblique voxel axes (15.0 degrees from the nearest RAS axes); put it on the canonical grid first (python -m data_prep preprocess)"),
    "anisotropic voxels": (lambda p: _nifti(p, VOLUME, np.diag([4.0, 4.0, 8.0, 1.0])), "anisotropic voxels (4.00 x 4.00 x 8.00 mm)"),
}


def _one_image_datalist(tmp_path: Path, make) -> tuple[Path, Path]:
    image = make(tmp_path / "images" / "scan.nii.gz")
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "images/scan.nii.gz", "age": 50.0, "subject": "s1"}]}))
    return path, image


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_bad_image_is_reported_with_file_and_problem(tmp_path, case):
    make, expected = IMAGE_CASES[case]
    path, image = _one_image_datalist(tmp_path, make)
    with pytest.raises(InputError) as err:
        validate_datalist(path, image_size=[SIZE] * 3)
    (problem,) = _problems(err)
    assert problem.startswith(f"training[0] (subject s1): {image}: ") and expected in problem, problem


@pytest.mark.parametrize("case, make, note", [
    ("integer voxels", lambda p: _nifti(p, VOLUME * 1000, dtype=np.int16), None),
    ("non-RAS (LAS) affine", lambda p: _nifti(p, VOLUME, np.diag([-4.0, 4.0, 4.0, 1.0])),
     "stored as LAS, reoriented to RAS when loaded"),
    ("other shape, resample", lambda p: _nifti(p, VOLUME[:, :, :12]), "shape (16, 16, 12) (in RAS) differs from the "
     "model's image_size (16, 16, 16); resized on loading (on_shape_mismatch = 'resample')"),
])
def test_acceptable_images_pass_with_a_note(tmp_path, case, make, note):
    path, image = _one_image_datalist(tmp_path, make)
    report = validate_datalist(path, image_size=[SIZE] * 3, on_shape_mismatch="resample")
    assert report.problems == []
    assert report.notes == ([] if note is None else [f"{image}: {note}"])


def test_cli_lists_problems_and_exits_2(tmp_path, cohort, capsys):
    path = _datalist(tmp_path, cohort, _set("training", 2, "age", "forty"))
    assert data_prep_main(["validate", "--datalist", str(path), "--image_size", "16,16,16"]) == 2
    assert "training[2] (subject sub03): age 'forty' is not a number" in capsys.readouterr().err
    good = _datalist(tmp_path, cohort, lambda s: None)
    assert data_prep_main(["validate", "--datalist", str(good), "--image_size", "16,16,16"]) == 0
    assert "OK (training 8, validation 2, test 2 records; 0 problems)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- bundle configs


def _workflow(bundle: str, configs: list[str], bundle_root: Path, dataset_dir: Path, **override) -> ConfigWorkflow:
    files = [str(BUNDLES / bundle / "configs" / f"{name}.json") for name in configs]
    tiny = SLICE_TINY if bundle == "slice_cnn_brainage" else GAN_TINY
    if "train" not in configs:  # inference configs have no critic or regressor to shrink
        tiny = {key: value for key, value in tiny.items() if not key.startswith(("critic", "regressor"))}
    return ConfigWorkflow(config_file=files, workflow_type=None, bundle_root=str(bundle_root),
                          dataset_dir=str(dataset_dir), **{**tiny, **override})


def _initialize_and_run(workflow: ConfigWorkflow) -> None:
    workflow.initialize()
    workflow.run()


def _user_error(call) -> str:
    """The message a user sees for the error ``call`` raises (``brainage_core.checks.clean_excepthook``)."""
    with pytest.raises(Exception) as err:
        call()
    message = user_error_message(err.value)
    assert message is not None, f"no clean message for {err.value!r}"
    return message


@pytest.mark.parametrize("bundle", ["slice_cnn_brainage", "tgb_gan_augment"])
def test_bundle_train_checks_the_datalist_before_loading_any_data(tmp_path, cohort, bundle):
    bad = _datalist(tmp_path / "data", cohort, _set("validation", 0, "age", "n/a"))
    workflow = _workflow(bundle, ["train"], tmp_path / "root", bad.parent)
    message = _user_error(workflow.initialize)
    assert message.startswith(f"{bad}: 1 problem(s) found before the run started:")
    assert "validation[0] (subject sub01): age 'n/a' is not a number" in message


@pytest.mark.parametrize("policy", ["refuse", "resample"])
def test_shape_mismatch_is_refused_or_resampled_by_config(tmp_path, cohort, policy):
    """The cohort's 16^3 images against a 12^3 model grid."""
    workflow = _workflow("slice_cnn_brainage", ["train"], tmp_path, cohort, image_size=[12, 12, 12],
                         on_shape_mismatch=policy, **{"train#trainer#max_epochs": 1})
    if policy == "refuse":
        assert "differs from the model's image_size (12, 12, 12); set on_shape_mismatch to 'resample'" in _user_error(workflow.initialize)
        return
    workflow.initialize()
    workflow.run()
    batch = next(iter(workflow.parser.get_parsed_content("train#dataloader")))
    assert tuple(batch["image"].shape[2:]) == (12, 12, 12)
    assert workflow.parser.get_parsed_content("train#trainer").state.epoch == 1


@pytest.mark.parametrize("option, value, expected", [
    ("network_def#aggregation", "median", "unknown aggregation 'median'; expected one of"),
    ("network_def#encoder", "vgg16", "unknown encoder 'vgg16'; expected 'sfcn2d' or one of"),
])
def test_unknown_component_name_gives_a_clean_message_before_any_data_is_loaded(tmp_path, cohort, option, value, expected):
    workflow = _workflow("slice_cnn_brainage", ["train"], tmp_path, cohort, **{option: value})
    message = _user_error(workflow.initialize)  # the network is built in initialize, before the datasets
    assert expected in message and message.endswith("(while building custom_components.slice_cnn.networks.slice_set.SliceSetNet)")


def test_pretrained_weights_with_wrong_keys_and_shapes(tmp_path, cohort):
    weights = tmp_path / "resnet18.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3), "layer9.weight": torch.zeros(1)}, weights)
    workflow = _workflow("slice_cnn_brainage", ["train"], tmp_path, cohort, **{
        "network_def#encoder": "resnet18", "network_def#pretrained_weights": str(weights)})
    message = _user_error(workflow.initialize)
    assert f"pretrained ResNet weights in {weights} do not fit the 2D ResNet" in message
    assert "unexpected keys: layer9.weight" in message
    assert "conv1.weight: file (64, 3, 3, 3) vs model (64, 3, 7, 7)" in message


def _slice_network(tmp_path, cohort, **override):
    workflow = _workflow("slice_cnn_brainage", ["train"], tmp_path, cohort, **override)
    workflow.initialize()
    return workflow.parser.get_parsed_content("network_def"), workflow.parser.get_parsed_content("bias_correction")


def test_position_embedding_with_another_slice_count_than_the_checkpoint(tmp_path, cohort):
    network, bias = _slice_network(tmp_path / "a", cohort, **{"network_def#position_embedding": True,
                                                                 "network_def#spatial_shape": [20, SIZE, SIZE]})
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    torch.save(network.state_dict(), root / "models" / "model.pt")
    torch.save(bias.state_dict(), root / "models" / "bias_correction.pt")
    workflow = _workflow("slice_cnn_brainage", ["train", "evaluate"], root, cohort,
                         **{"network_def#position_embedding": True})
    message = _user_error(lambda: _initialize_and_run(workflow))
    assert message.startswith(f"{root / 'models' / 'model.pt'} does not fit the configured networks")
    assert "\n  - model: position.weight has shape (20, " in message
    assert ("(the position embedding has one row per slice: trained with 20 slices, this config gives 16; "
            "check image_size and slice_axis)") in message


def test_checkpoint_of_the_other_bundle_is_refused_by_name(tmp_path, cohort):
    gan_root, slice_root = tmp_path / "gan", tmp_path / "slice"
    for root in (gan_root, slice_root):
        (root / "models").mkdir(parents=True)
    generator = TGBGenerator(encoder_channels=(4, 8), decoder_channels=(8, 4))
    torch.save(generator.state_dict(), slice_root / "models" / "model.pt")  # the GAN's model.pt, in the slice bundle
    message = _user_error(lambda: _initialize_and_run(_workflow("slice_cnn_brainage", ["train", "evaluate"], slice_root, cohort)))
    assert message.startswith(f"{slice_root / 'models' / 'model.pt'} does not fit the configured networks")
    assert "\n  - model: missing encoder.blocks.0.conv.bias, " in message
    assert "\n  - model: unexpected decoder.0.0.bias, " in message
    network, _ = _slice_network(tmp_path / "a", cohort)
    torch.save(network.state_dict(), gan_root / "models" / "model.pt")  # the slice model.pt, in the GAN bundle
    workflow = _workflow("tgb_gan_augment", ["inference"], gan_root, cohort, output_dir=str(tmp_path / "out"))
    message = _user_error(lambda: _initialize_and_run(workflow))
    assert message.startswith(f"{gan_root / 'models' / 'model.pt'} does not fit the configured networks")
    assert "\n  - generator: missing decoder.0.1.bias, " in message  # nearest upsampling: (Upsample, Conv3d) per block


def test_bundle_run_prints_one_clean_error_without_traceback(tmp_path, cohort):
    bad = _datalist(tmp_path / "data", cohort, _set("training", 0, "image", "gone.nii.gz"))
    command = bundle_command("slice_cnn_brainage", ["train"], tmp_path / "root", bad.parent, **SLICE_TINY)
    result = subprocess.run(command, cwd=BUNDLES / "slice_cnn_brainage", capture_output=True, text=True, timeout=240)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (f"error: {bad}: 1 problem(s) found before the run started:\n"
            f"  - training[0] (subject sub00): {bad.parent / 'gone.nii.gz'}: file not found\n"
            "(BRAINAGE_TRACEBACK=1 shows the full traceback)") in result.stderr
