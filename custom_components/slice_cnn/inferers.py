"""Inferers of the bundles beyond MONAI's."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer

from brainage_core.options import as_bool


class CpuAutocastInferer(Inferer):
    """Run the network under CPU autocast to ``dtype`` (bfloat16) when ``enabled``, and return float32.

    MONAI's engines autocast on CUDA only (their ``amp``); this gives CPUs with bfloat16 instructions the
    same gain (``custom_components.common.hardware``). Disabled, or when the input is not on the CPU, it is the
    plain forward pass.
    """

    def __init__(self, enabled: bool = False, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.enabled, self.dtype = as_bool(enabled, "enabled"), dtype

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        if not self.enabled or inputs.device.type != "cpu":
            return network(inputs, *args, **kwargs)
        with torch.autocast("cpu", dtype=self.dtype):
            output = network(inputs, *args, **kwargs)
        return output.float()
