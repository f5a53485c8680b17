"""Data plumbing for the bundles: which records to read, and the (input, target) pair engines consume."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.data import load_decathlon_datalist
from monai.engines import PrepareBatch

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class PrepareImageTarget(PrepareBatch):
    """``(batch["image"], batch[target_key] as float (B, 1))``: age for brain age, ``label`` for AD.

    Datalists keep age and diagnosis under their own names; this picks the one the bundle predicts, so
    the same datalist serves both tasks without renaming keys.
    """

    def __init__(self, target_key: str = "age", image_key: str = "image") -> None:
        self.target_key, self.image_key = target_key, image_key

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        if self.target_key not in batchdata:
            raise KeyError(f"batch has no {self.target_key!r} entry (keys: {sorted(batchdata)}); check target_key")
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        target = torch.as_tensor(batchdata[self.target_key]).float().reshape(-1, 1)
        return image, target.to(device=device, non_blocking=non_blocking, **kwargs)


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
