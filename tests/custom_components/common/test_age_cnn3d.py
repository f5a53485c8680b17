"""The default 3D age regressor: shapes, standardised output, memory layout, TorchScript, and that it learns."""
import numpy as np
import pytest
import torch

from custom_components.common.networks.age_cnn3d import AgeCNN3d


def test_output_shape_any_size_and_initial_mean():
    torch.manual_seed(0)
    net = AgeCNN3d(channels=(4, 8, 16), init_bias=50.0, output_scale=15.0).eval()
    for size in (16, 24):
        out = net(torch.rand(3, 1, size, size, size))
        assert out.shape == (3, 1)
    net.out.weight.data.zero_()
    assert torch.allclose(net(torch.rand(2, 1, 16, 16, 16)), torch.full((2, 1), 50.0))


def test_standardised_input_makes_the_output_independent_of_intensity_scale():
    torch.manual_seed(0)
    net = AgeCNN3d(channels=(4, 8)).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    torch.testing.assert_close(net(3.0 * x + 7.0), net(x), rtol=1e-4, atol=1e-4)
    raw = AgeCNN3d(channels=(4, 8), standardise_input=False).eval()
    raw.load_state_dict(net.state_dict())
    assert not torch.allclose(raw(3.0 * x + 7.0), raw(x), rtol=1e-3)


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    plain = AgeCNN3d(channels=(4, 8)).eval()
    fast = AgeCNN3d(channels=(4, 8), channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 16, 16, 16)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [({"channels": (8,)}, "at least two"), ({"blocks_per_stage": 0}, "blocks"),
                                             ({"dropout": 1.0}, "dropout")])
def test_rejects_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AgeCNN3d(**kwargs)


def test_rejects_wrong_input():
    with pytest.raises(ValueError, match=r"\(batch, 1, D, H, W\)"):
        AgeCNN3d(channels=(4, 8))(torch.rand(2, 2, 16, 16, 16))


def test_torchscript_matches_eager():
    net = AgeCNN3d(channels=(4, 8), blocks_per_stage=2, init_bias=40.0, output_scale=10.0).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    torch.testing.assert_close(torch.jit.script(net)(x), net(x))


def test_learns_an_age_dependent_blob_in_a_few_steps():
    """A dark 'ventricle' that grows with age: 80 Adam steps take the error far below the constant's."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(16) - 7.5] * 3, indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))

    def volumes(ages):
        vols = [(radius > 1.5 + age / 20).astype(np.float32) + 0.1 * rng.normal(size=radius.shape) for age in ages]
        return torch.tensor(np.stack(vols), dtype=torch.float32)[:, None], torch.tensor(ages, dtype=torch.float32)

    x, y = volumes(rng.uniform(20, 90, 48))
    x_test, y_test = volumes(rng.uniform(20, 90, 16))
    torch.manual_seed(0)
    net = AgeCNN3d(channels=(4, 8, 16), dropout=0.0, init_bias=float(y.mean()), output_scale=float(y.std()))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(80):
        idx = torch.randint(0, len(y), (8,))
        loss = torch.nn.functional.mse_loss(net(x[idx]).squeeze(1), y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.train()  # batch statistics of the test batch itself: no running-average lag in this check
    with torch.no_grad():
        mae = (net(x_test).squeeze(1) - y_test).abs().mean().item()
    constant = (y_test - y.mean()).abs().mean().item()
    assert mae < 0.4 * constant, (mae, constant)
