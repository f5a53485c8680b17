"""``cache_on_device`` (on by default on CUDA, MONAI's fast-training recipe): the cached, deterministic part of
each bundle's training and validation transforms ends with ``ToDeviced``, so batches are collated from
device-resident volumes and the slice bundle's random augmentations run on the device. The transforms and
their random draws stay the same, so training gives the same network (checked here on the CPU device)."""
from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.transforms import Randomizable, ToDeviced
from reliability_helpers import BUNDLES, TINY_RUNS, make_cohort


def _trained(bundle: str, root, cohort, cache_on_device: bool) -> tuple[dict, list[list[str]]]:
    configs = BUNDLES / bundle / "configs"
    workflow = ConfigWorkflow(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
                              bundle_root=str(root), dataset_dir=str(cohort), cache_on_device=cache_on_device,
                              **{**TINY_RUNS[bundle][0], "train#trainer#max_epochs": 2})
    workflow.initialize()
    pipelines = [workflow.parser.get_parsed_content(f"{split}#dataset").transform.transforms
                 for split in ("train", "validate")]
    workflow.run()
    workflow.finalize()
    names = [[type(t).__name__ for t in pipeline] for pipeline in pipelines]
    for pipeline in pipelines:  # the device copy is cached: it comes before the first random transform
        first_random = next((i for i, t in enumerate(pipeline) if isinstance(t, Randomizable)), len(pipeline))
        assert all(i < first_random for i, t in enumerate(pipeline) if isinstance(t, ToDeviced))
    state = {k: v.detach().clone() for k, v in workflow.parser.get_parsed_content("network").state_dict().items()}
    return state, names


@pytest.mark.parametrize("bundle", sorted(TINY_RUNS))
def test_cache_on_device_keeps_the_transforms_and_the_trained_network(bundle, tmp_path):
    cohort = make_cohort(tmp_path / "cohort")
    plain, plain_names = _trained(bundle, tmp_path / "plain", cohort, cache_on_device=False)
    cached, cached_names = _trained(bundle, tmp_path / "cached", cohort, cache_on_device=True)
    for without, with_copy in zip(plain_names, cached_names):
        assert "ToDeviced" not in without and with_copy.count("ToDeviced") == 1
        assert [name for name in with_copy if name != "ToDeviced"] == without
    assert plain.keys() == cached.keys()
    for key in plain:
        assert torch.equal(plain[key], cached[key]), key
