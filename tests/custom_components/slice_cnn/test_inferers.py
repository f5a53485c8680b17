"""CPU bfloat16 autocast of the bundles' forward passes, and the CPU check that switches it on."""
from __future__ import annotations

import torch
from torch import nn

from custom_components.common.hardware import cpu_has_fast_bf16
from custom_components.slice_cnn.inferers import CpuAutocastInferer
from custom_components.slice_cnn.networks.slice_set import SliceSetNet


class _DtypeProbe(nn.Module):
    """A convolution that records the dtype it computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.seen: list[torch.dtype] = []

    def forward(self, x):
        y = self.conv(x)
        self.seen.append(y.dtype)
        return y


def test_enabled_inferer_computes_in_bfloat16_and_returns_float32():
    probe = _DtypeProbe()
    x = torch.randn(2, 1, 8, 8)
    out = CpuAutocastInferer(enabled=True)(x, probe)
    assert probe.seen == [torch.bfloat16] and out.dtype == torch.float32
    plain = CpuAutocastInferer(enabled=False)(x, probe)
    assert probe.seen[-1] == torch.float32
    torch.testing.assert_close(plain, probe(x))


def test_slice_network_predicts_ages_in_bfloat16_close_to_float32():
    """The fast path (bf16 autocast, channels-last) against the plain one, same weights: within 2 % of the
    spread of ages, and predictions not rounded to bfloat16's steps (the output layer stays float32)."""
    torch.manual_seed(0)
    plain = SliceSetNet(spatial_shape=(24, 24, 24), init_bias=50.0, output_scale=15.0, sfcn_norm="batch").eval()
    fast = SliceSetNet(spatial_shape=(24, 24, 24), init_bias=50.0, output_scale=15.0, sfcn_norm="batch",
                       channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(6, 1, 24, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = plain(x)
        out = CpuAutocastInferer(enabled=True)(x, fast)
    assert out.dtype == torch.float32
    assert (out - reference).abs().max() < 0.02 * 15.0
    assert not torch.equal(out, out.bfloat16().float())  # not on bfloat16's grid of values


def test_fast_bf16_is_read_from_the_cpu_flags_and_the_users_instruction_set_caps(tmp_path, monkeypatch):
    amx, avx2 = tmp_path / "amx", tmp_path / "avx2"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert cpu_has_fast_bf16(amx) and not cpu_has_fast_bf16(avx2)
    assert not cpu_has_fast_bf16(tmp_path / "missing")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # oneDNN capped below its bf16 kernels
    assert not cpu_has_fast_bf16(amx)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_has_fast_bf16(amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert not cpu_has_fast_bf16(amx)
