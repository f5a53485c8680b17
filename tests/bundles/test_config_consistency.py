"""Pins each bundle's configs to each other: what inference must share with training (the preprocessing
and the network definition), and the one voxel grid (``image_size``) every config of a bundle states.

Reads the raw config dicts (``ConfigParser.get``), instantiates nothing.
"""
import json
import shutil
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from brainage_core.grid import DEFAULT_RESOLUTION_MM, canonical_grid

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
# per bundle: the intensity transforms that follow the loading transforms in train.json's preprocessing
SCALING = {"slice_cnn_brainage": "normalising_transforms", "tgb_gan_augment": "scaling_transforms"}
# network arguments that only shape training (the output statistics travel with the weights as buffers)
TRAIN_ONLY_NETWORK_ARGS = {"init_bias", "output_scale", "pretrained_weights", "slice_dropout"}
INPUT_CHECK = "custom_components.common.input_reference.InputCheckd"


def _raw(config_dir: Path, name: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(config_dir / name))
    return parser


def _image_sizes(config_dir: Path) -> dict[str, list]:
    """Every literal ``image_size`` in the bundle's configs, and the image input's ``spatial_shape`` in
    metadata.json, keyed by where it was found (references such as ``@image_size`` are not restatements)."""
    found = {}

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if key.rsplit("#", 1)[-1] == "image_size" and isinstance(value, list):
                    found[f"{where}#{key}"] = value
                walk(value, f"{where}#{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}#{i}")

    for path in sorted(config_dir.glob("*.json")):
        config = json.loads(path.read_text())
        if path.name == "metadata.json":
            found["metadata.json#network_data_format#inputs#image#spatial_shape"] = (
                config["network_data_format"]["inputs"]["image"]["spatial_shape"])
        else:
            walk(config, path.name)
    return found


def consistency_problems(config_dir: Path, bundle: str) -> list[str]:
    """What differs between the bundle's train.json and inference.json (and the other configs' grid)."""
    train, inference = _raw(config_dir, "train.json"), _raw(config_dir, "inference.json")
    loading, scaling = train.get("loading_transforms"), train.get(SCALING[bundle])
    problems = []
    if train.get("preprocessing_transforms") != f"$@loading_transforms + @{SCALING[bundle]}":
        problems.append(f"train.json's preprocessing is not loading_transforms + {SCALING[bundle]}")
    # inference: training's loading transforms, the input check, then training's intensity transforms
    shared = [t for t in inference.get("preprocessing#transforms") if t.get("_target_") != INPUT_CHECK]
    if shared != loading + scaling:
        problems.append(f"inference.json's preprocessing differs from train.json's loading_transforms + "
                        f"{SCALING[bundle]}: {shared} != {loading + scaling}")
    train_net = {k: v for k, v in train.get("network_def").items() if k not in TRAIN_ONLY_NETWORK_ARGS}
    if inference.get("network_def") != train_net:
        problems.append(f"network_def differs: inference {inference.get('network_def')} != train {train_net}")
    sizes = _image_sizes(config_dir)
    reference = sizes["train.json#image_size"]
    problems += [f"{where} = {size} != train.json's image_size {reference}"
                 for where, size in sizes.items() if size != reference]
    if bundle == "tgb_gan_augment":  # the augmentation study trains and loads generators of train.json's shape
        evaluate = _raw(config_dir, "evaluate.json")
        for key in ("encoder_channels", "decoder_channels"):
            if evaluate.get(f"gan_{key}") != train.get(f"network_def#{key}"):
                problems.append(f"evaluate.json's gan_{key} != train.json's network_def#{key}")
    return problems


@pytest.mark.parametrize("bundle", sorted(SCALING))
def test_train_and_inference_configs_agree(bundle):
    assert consistency_problems(BUNDLES / bundle / "configs", bundle) == []


@pytest.mark.parametrize("bundle", sorted(SCALING))
def test_every_image_size_is_the_default_grid(bundle):
    """The simulator's default cohort (``DEFAULT_RESOLUTION_MM``) is what every config expects."""
    shape = list(canonical_grid(DEFAULT_RESOLUTION_MM).shape)
    sizes = _image_sizes(BUNDLES / bundle / "configs")
    assert "inference.json#image_size" in sizes and sizes == dict.fromkeys(sizes, shape)


@pytest.mark.parametrize("bundle", sorted(SCALING))
def test_a_mismatch_is_reported(bundle, tmp_path):
    config_dir = shutil.copytree(BUNDLES / bundle / "configs", tmp_path / "configs")
    path = config_dir / "inference.json"
    config = json.loads(path.read_text())
    orientation = next(t for t in config["preprocessing"]["transforms"] if t["_target_"] == "Orientationd")
    orientation["axcodes"] = "LPS"
    config["network_def"]["in_channels" if bundle == "tgb_gan_augment" else "embed_dim"] = 2
    config["image_size"] = [32, 32, 32]
    path.write_text(json.dumps(config, indent=4) + "\n")
    problems = consistency_problems(config_dir, bundle)
    assert len(problems) == 3, problems
    assert "preprocessing" in problems[0] and "network_def" in problems[1] and "inference.json#image_size" in problems[2]
