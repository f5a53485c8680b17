"""``python -m data_prep validate``: the checks of ``brainage_core.checks`` on a datalist and its images,
from the command line, before a run."""
from __future__ import annotations

from brainage_core.checks import validate_datalist
from brainage_core.options import as_names


def validate_command(datalist: str, dataset_dir: str | None = None, image_size=None, on_shape_mismatch: str = "refuse",
                     target_key: str | None = "age", splits=None, check_voxels: bool = True) -> None:
    """Check a datalist and every image it lists before a run; list every problem at once.

    Args:
        datalist: datalist JSON.
        dataset_dir: dataset folder; images outside it are reported.
        image_size: the model's grid, e.g. 48,48,48 (images of another shape are reported).
        on_shape_mismatch: refuse (report other shapes) or resample (the bundle resizes them; a note).
        target_key: age, label, or none (records need not carry a target).
        splits: splits to check, e.g. training,validation (default: all).
        check_voxels: also decode every image (truncated files, NaN/Inf, constant images).

    Exits with status 2 and one line per problem when any is found.
    """
    report = validate_datalist(datalist, None if splits is None else as_names(splits),
                               None if str(target_key).lower() in ("none", "") else target_key,
                               image_size, on_shape_mismatch, dataset_dir, check_voxels)
    print(report)
