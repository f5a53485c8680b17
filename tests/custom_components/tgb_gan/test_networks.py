"""Shapes, errors and building blocks of the TGB-GAN networks (tiny sizes; paper sizes on the meta device)."""
import pytest
import torch
from torch import nn

from custom_components.tgb_gan.networks import ResidualAgeRegressor, ResidualBlock3d, TGBGenerator, WGANCritic


def conv_params(c_in: int, c_out: int, kernel: int = 3) -> int:
    return c_in * c_out * kernel**3 + c_out


def test_generator_round_trip_shapes_and_non_negative_output():
    torch.manual_seed(0)
    gen = TGBGenerator(encoder_channels=(4, 8, 8), decoder_channels=(8, 4, 4))
    x = torch.rand(2, 1, 16, 16, 24)
    z = gen.encode(x)
    assert z.shape == (2, 8, 2, 2, 3)
    y = gen.decode(z)
    assert y.shape == x.shape
    assert (y >= 0).all()
    torch.testing.assert_close(gen(x), y)


@pytest.mark.parametrize("upsampling", ["transposed", "nearest"])
def test_generator_output_starts_alive_for_every_seed(upsampling):
    """The output ReLU must not start off everywhere: an all-zero output has all-zero gradients and never
    trains. With signed output weights some seeds started dead (the bundle's widths: 1 seed in 10)."""
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    for seed in range(20):
        torch.manual_seed(seed)
        gen = TGBGenerator(encoder_channels=(16, 32), decoder_channels=(32, 16), upsampling=upsampling)
        y = gen(x)
        assert (y > 0).float().mean() > 0.2, f"seed {seed}"
        (y - x).abs().mean().backward()
        assert gen.encoder[0][0].weight.grad.abs().sum() > 0, f"seed {seed}"


def test_generator_decode_doubles_size_per_level():
    gen = TGBGenerator(in_channels=2, encoder_channels=(4, 6), decoder_channels=(5, 3))
    assert gen.decode(torch.rand(1, 6, 3, 1, 2)).shape == (1, 2, 12, 4, 8)


def test_generator_rejects_sizes_not_divisible_by_two_to_the_depth():
    gen = TGBGenerator(encoder_channels=(2, 2, 2), decoder_channels=(2, 2, 2))
    with pytest.raises(ValueError, match=r"divisible by 8, got \[16, 12, 16\]"):
        gen.encode(torch.rand(1, 1, 16, 12, 16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"encoder_channels": (4, 8), "decoder_channels": (4,)}, "same number of levels"),
        ({"kernel_size": 4}, "odd"),
        ({"encoder_channels": ()}, "non-empty"),
    ],
)
def test_generator_rejects_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TGBGenerator(**kwargs)


def test_generator_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="expects \\(batch, 1, D, H, W\\)"):
        TGBGenerator(encoder_channels=(2,), decoder_channels=(2,)).encode(torch.rand(1, 2, 4, 4, 4))


def period_two_energy(volume: torch.Tensor) -> float:
    """Share of a volume's variance in its period-2 (checkerboard) components along any axis."""
    spectrum = torch.fft.fftn(volume - volume.mean()).abs() ** 2
    nyquist = [s // 2 for s in volume.shape]
    mask = torch.zeros(volume.shape, dtype=torch.bool)
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = nyquist[axis]
        mask[tuple(index)] = True
    return float(spectrum[mask].sum() / spectrum.sum())


@pytest.mark.parametrize("upsampling, low, high",
                         [("transposed", 0.3, 1.0), ("nearest", 0.0, 0.05), ("trilinear", 0.0, 0.05)])
def test_generator_upsampling_and_checkerboard(upsampling, low, high):
    """A smooth latent (a ramp per channel) decodes to a checkerboard through a stride-2 transposed
    convolution with a 3-wide kernel, and to a smooth image through resize-convolution (either interpolation)."""
    torch.manual_seed(0)
    gen = TGBGenerator(encoder_channels=(4, 8), decoder_channels=(8, 4), upsampling=upsampling)
    ramp = torch.linspace(0, 1, 6).view(1, 1, 6, 1, 1)
    code = (torch.rand(1, 8, 1, 1, 1) + torch.rand(1, 8, 1, 1, 1) * ramp).expand(1, 8, 6, 6, 6)
    with torch.no_grad():
        interior = gen.decode(code)[0, 0, 4:-4, 4:-4, 4:-4]
    assert interior.std() > 0
    assert low <= period_two_energy(interior) <= high


def test_generator_rejects_unknown_upsampling():
    with pytest.raises(ValueError, match="upsampling must be one of"):
        TGBGenerator(upsampling="pixelshuffle")


def test_paper_generator_shapes_and_parameter_count():
    with torch.device("meta"):
        gen = TGBGenerator()
        x = torch.empty(1, 1, 96, 96, 96)
        assert gen.encode(x).shape == (1, 512, 3, 3, 3)
        assert gen(x).shape == (1, 1, 96, 96, 96)
    enc = [1, 64, 128, 256, 512, 512]
    dec = [512, 256, 256, 128, 64, 32]
    expected = sum(conv_params(a, b) for a, b in zip(enc, enc[1:]))
    expected += sum(conv_params(a, b) for a, b in zip(dec, dec[1:]))
    expected += conv_params(32, 1, kernel=1)
    assert sum(p.numel() for p in gen.parameters()) == expected


def test_critic_scores_each_sample_alone_without_normalisation():
    torch.manual_seed(0)
    critic = WGANCritic(channels=(4, 8))
    x = torch.rand(3, 1, 8, 8, 8)
    scores = critic(x)
    assert scores.shape == (3,)
    torch.testing.assert_close(scores[1:2], critic(x[1:2]))
    torch.testing.assert_close(scores, critic.score_map(x).mean(dim=(1, 2, 3, 4)))
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in critic.modules())


def test_critic_activation_switch():
    assert sum(isinstance(m, nn.LeakyReLU) for m in WGANCritic(channels=(2, 2), negative_slope=0.2).modules()) == 2
    assert not any(isinstance(m, nn.LeakyReLU) for m in WGANCritic(channels=(2, 2)).modules())
    with pytest.raises(ValueError, match="negative_slope"):
        WGANCritic(negative_slope=-0.1)


def test_paper_critic_score_map_is_6_cubed():
    with torch.device("meta"):
        critic = WGANCritic()
        x = torch.empty(2, 1, 96, 96, 96)
        assert critic.score_map(x).shape == (2, 1, 6, 6, 6)
        assert critic(x).shape == (2,)


def test_residual_block_adds_zero_padded_identity():
    block = ResidualBlock3d(2, 3)
    for conv in (block.conv1, block.conv2):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    x = torch.randn(1, 2, 4, 4, 4)
    y = block(x)
    torch.testing.assert_close(y[:, :2], torch.relu(x))
    assert (y[:, 2] == 0).all()
    with pytest.raises(ValueError, match="cannot shrink"):
        ResidualBlock3d(4, 2)


def test_regressor_shape_and_initial_bias():
    torch.manual_seed(0)
    reg = ResidualAgeRegressor(channels=(2, 4), hidden=(8,), spatial_shape=(8, 8, 12), init_bias=25.0)
    assert reg.head[1].in_features == 4 * 2 * 2 * 3
    assert reg.out.bias.item() == 25.0
    nn.init.zeros_(reg.out.weight)
    out = reg(torch.rand(2, 1, 8, 8, 12))
    torch.testing.assert_close(out, torch.full((2, 1), 25.0))


def test_regressor_rejects_other_input_sizes_and_too_small_shapes():
    reg = ResidualAgeRegressor(channels=(2, 4), hidden=(8,), spatial_shape=(8, 8, 8))
    with pytest.raises(ValueError, match=r"built for spatial_shape \[8, 8, 8\]"):
        reg(torch.rand(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="too small"):
        ResidualAgeRegressor(channels=(2, 4, 8), spatial_shape=(8, 8, 4))
    with pytest.raises(ValueError, match="dropout"):
        ResidualAgeRegressor(dropout=1.0)


def test_paper_regressor_on_meta_device():
    with torch.device("meta"):
        reg = ResidualAgeRegressor()
        assert reg(torch.empty(2, 1, 96, 96, 96)).shape == (2, 1)
    assert [m.out_features for m in reg.modules() if isinstance(m, nn.Linear)] == [2048, 512, 64, 1]
    assert reg.head[1].in_features == 256 * 3 * 3 * 3


def test_all_three_networks_are_torchscript_scriptable():
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    nets = [TGBGenerator(encoder_channels=(4, 8), decoder_channels=(8, 4)), WGANCritic(channels=(4, 8)),
            ResidualAgeRegressor(channels=(2, 4), hidden=(8,), spatial_shape=(16, 16, 16))]
    for net in nets:
        net.eval()
        scripted = torch.jit.script(net)
        torch.testing.assert_close(scripted(x), net(x))
    generator = torch.jit.script(nets[0])
    torch.testing.assert_close(generator.decode(generator.encode(x)), nets[0](x))
