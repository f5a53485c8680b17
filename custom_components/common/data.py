"""Data plumbing for the bundles: which records to read, and the (input, target) pair engines consume."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.data import load_decathlon_datalist
from monai.engines import PrepareBatch
from monai.utils import convert_to_tensor

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class PrepareImageTarget(PrepareBatch):
    """``(image, target)`` from a dict batch: ``batch[image_key]`` as a plain tensor and
    ``batch[target_key]`` as float32 (B, 1), both on ``device``.

    The target is age for brain age and the GAN's task branch, ``label`` for AD: datalists keep age and
    diagnosis under their own names and this picks the one the engine trains on. With ``required=False``
    a batch without the target gives ``None`` (the GAN ablation needs no ages). Images lose their MetaTensor
    metadata, which training does not need and which complicates the gradient penalty's double backward.
    """

    def __init__(self, target_key: str = "age", image_key: str = "image", required: bool = True) -> None:
        self.target_key, self.image_key, self.required = target_key, image_key, required

    def __call__(self, batchdata: Mapping[str, Any], device=None, non_blocking: bool = False, **kwargs):
        if not isinstance(batchdata, Mapping) or self.image_key not in batchdata:
            found = sorted(batchdata) if isinstance(batchdata, Mapping) else type(batchdata).__name__
            raise KeyError(f"expected a dict batch with key '{self.image_key}', got {found}")
        image = convert_to_tensor(batchdata[self.image_key], track_meta=False)
        image = image.to(device=device, non_blocking=non_blocking, **kwargs)
        if self.target_key not in batchdata:
            if self.required:
                raise KeyError(f"batch has no '{self.target_key}' entry (keys: {sorted(batchdata)}); check target_key")
            return image, None
        target = convert_to_tensor(batchdata[self.target_key], dtype=torch.float32, wrap_sequence=True, track_meta=False)
        if target.numel() != image.shape[0]:
            raise ValueError(
                f"expected one '{self.target_key}' per image: {target.numel()} values for {image.shape[0]} images"
            )
        return image, target.reshape(-1, 1).to(device=device, non_blocking=non_blocking, **kwargs)


def inference_records(input_dir: str | None = None, datalist_file: str | None = None, split: str = "test") -> list[dict]:
    """Records to predict: every NIfTI in ``input_dir`` (subject = file name), else one datalist split.

    Records from a folder carry no age; from a datalist they keep theirs, so gaps can be reported.
    """
    if input_dir:
        folder = Path(input_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"input_dir {folder} is not a folder")
        files = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"no .nii or .nii.gz files in {folder}")
        return [{"image": str(p), "subject": p.name.split(".nii")[0]} for p in files]
    if not datalist_file or not os.path.isfile(datalist_file):
        raise FileNotFoundError(f"give input_dir or an existing datalist_file (got {datalist_file!r})")
    return load_decathlon_datalist(datalist_file, is_segmentation=True, data_list_key=split)
