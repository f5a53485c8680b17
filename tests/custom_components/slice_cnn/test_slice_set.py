import pytest
import torch

from custom_components.slice_cnn.networks.slice_aggregators import AGGREGATIONS
from custom_components.slice_cnn.networks.slice_encoders import SFCN2DBlock, SFCN2DEncoder, build_resnet_backbone
from custom_components.slice_cnn.networks.slice_set import SLICE_AXES, SliceSetNet

SHAPE = (12, 10, 8)  # X, Y, Z: distinct sizes so that a wrong slicing axis shows
TINY = dict(sfcn_channels=(4, 8), sfcn_feature_dim=8, embed_dim=8, num_heads=2, transformer_layers=1)


def tiny_net(seed=0, **options):
    torch.manual_seed(seed)
    return SliceSetNet(**{**TINY, "spatial_shape": SHAPE, **options})


def volumes(batch=2, shape=SHAPE, seed=1):
    return torch.randn((batch, 1, *shape), generator=torch.Generator().manual_seed(seed))


def encoder_batch_shapes(model, x):
    """Shapes of the image batches the 2D encoder receives during one forward."""
    seen = []
    original = model.encoder.features

    def spy(images):
        seen.append(tuple(images.shape))
        return original(images)

    model.encoder.features = spy
    try:
        model(x)
    finally:
        del model.encoder.features
    return seen


# ---------------------------------------------------------------- shapes and slicing


# every aggregation x axis with sfcn2d; the ResNets (slow to build) on every axis and a spread of aggregations:
# encoder, aggregation and slicing are independent stages, so this covers each of them in each position
SHAPE_CASES = [("sfcn2d", aggregation, axis) for aggregation in AGGREGATIONS for axis in SLICE_AXES] + [
    ("resnet18", "attention", "sagittal"),
    ("resnet18", "transformer", "coronal"),
    ("resnet34", "max", "axial"),
]


@pytest.mark.parametrize("encoder, aggregation, axis", SHAPE_CASES)
def test_output_shape_and_slicing(encoder, aggregation, axis):
    model = tiny_net(encoder=encoder, aggregation=aggregation, slice_axis=axis, position_embedding=True,
                     out_channels=2).eval()
    x = volumes()
    with torch.no_grad():
        assert model(x).shape == (2, 2)
        # all B*S slices reach the encoder as one batch of 2D images cut across the chosen axis
        slice_dim = SLICE_AXES[axis]
        in_plane = [size for dim, size in enumerate(SHAPE) if dim != slice_dim]
        assert encoder_batch_shapes(model, x) == [(2 * SHAPE[slice_dim], 1, *in_plane)]
    assert model.position.weight.shape == (SHAPE[slice_dim], model.encoder.feature_dim)


def test_sfcn2d_has_about_one_million_parameters():
    assert sum(p.numel() for p in SFCN2DEncoder().parameters()) == pytest.approx(1.0e6, rel=0.02)


@pytest.mark.parametrize("size", [(48, 48), (16, 16), (3, 2)])
def test_sfcn2d_trains_on_small_slices_without_degenerate_instance_norm(size):
    # five 2x max-pools would leave 1x1 maps here; InstanceNorm on 1x1 raises in training mode
    torch.manual_seed(0)
    encoder = SFCN2DEncoder(channels=(4, 4, 4, 4, 4), feature_dim=8, embed_dim=4).train()
    features = encoder.features(torch.randn(6, 1, *size))
    assert features.shape == (6, 8) and torch.isfinite(features).all()
    assert features.std(dim=0).max() > 0  # not all images mapped to the same (zero) vector


def test_paper_grid_91x109x91_sizes_the_position_embedding_per_axis():
    expected = {"sagittal": 91, "coronal": 109, "axial": 91}
    for axis, num_slices in expected.items():
        model = SliceSetNet(slice_axis=axis, position_embedding=True, spatial_shape=(91, 109, 91))
        assert model.position.weight.shape == (num_slices, 64)


def test_wrong_input_shape_is_refused_with_a_clear_error():
    model = tiny_net(position_embedding=True)
    with pytest.raises(ValueError, match=r"\[12, 10, 9\] differs from spatial_shape \[12, 10, 8\]"):
        model(volumes(shape=(12, 10, 9)))
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y, Z\)"):
        model(torch.zeros(2, 2, *SHAPE))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(position_embedding=True, spatial_shape=None), "needs spatial_shape"),
        (dict(spatial_shape=(12, 10)), "three positive sizes"),
        (dict(encoder="vgg"), "unknown encoder 'vgg'"),
        (dict(aggregation="sum"), "unknown aggregation 'sum'"),
        (dict(slice_axis="oblique"), "unknown slice_axis 'oblique'"),
        (dict(aggregation="attention", num_heads=3), "multiple of num_heads=3"),
        (dict(encoder="resnet18", in_channel_mode="gray"), "unknown in_channel_mode 'gray'"),
        (dict(pretrained_weights="weights.pt"), "ResNet encoders only"),
        (dict(slice_dropout=1.0), "slice_dropout"),
        (dict(slice_stride=0), "slice_stride"),
        (dict(slice_fraction=0.0), "slice_fraction"),
    ],
)
def test_invalid_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        tiny_net(**options)


def test_last_bias_starts_at_init_bias():
    assert torch.equal(tiny_net(init_bias=55.5).head[-1].bias, torch.tensor([55.5]))
    assert torch.equal(tiny_net(out_channels=2).head[-1].bias, torch.zeros(2))


# ---------------------------------------------------------------- aggregation


def test_attention_weights_are_a_distribution_over_slices():
    model = tiny_net(aggregation="attention").eval()
    prediction, weights = model.forward_with_attention(volumes())
    assert prediction.shape == (2, 1) and weights.shape == (2, 2, SHAPE[0])
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 2))
    with pytest.raises(ValueError, match="only with aggregation='attention'"):
        tiny_net(aggregation="mean").forward_with_attention(volumes())


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_slice_order_matters_only_with_position_embedding(aggregation):
    x = volumes()
    permuted = x[:, :, torch.randperm(SHAPE[0], generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        plain = tiny_net(aggregation=aggregation).eval()
        torch.testing.assert_close(plain(permuted), plain(x), atol=1e-5, rtol=1e-5)
        positioned = tiny_net(aggregation=aggregation, position_embedding=True).eval()
        assert (positioned(permuted) - positioned(x)).abs().max() > 1e-4


# ---------------------------------------------------------------- missing slices


def test_slice_dropout_acts_in_training_only():
    model = tiny_net(slice_dropout=0.5, position_embedding=True)
    x = volumes()
    assert encoder_batch_shapes(model.train(), x) == [(2 * 6, 1, 10, 8)]
    assert encoder_batch_shapes(model.eval(), x) == [(2 * 12, 1, 10, 8)]


def test_eval_stride_keeps_every_kth_slice_with_its_own_position():
    model = tiny_net(slice_stride=3, position_embedding=True, aggregation="attention").eval()
    x = volumes()
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        prediction, weights = model.forward_with_attention(x)
        assert weights.shape == (2, 2, 4)  # slices 0, 3, 6, 9
        dropped = torch.ones(SHAPE[0], dtype=torch.bool)
        dropped[::3] = False
        x_changed = x.clone()
        x_changed[:, :, dropped] = 5.0
        position = model.position.weight
        position[dropped] += torch.randn(position[dropped].shape, generator=noise)
        torch.testing.assert_close(model(x_changed), prediction)  # dropped slices and positions are unused
        position[3] += torch.randn(position.shape[1], generator=noise)
        assert (model(x) - prediction).abs().max() > 1e-4  # kept slice 3 uses position 3


def test_eval_fraction_draws_a_seeded_random_subset():
    model = tiny_net(slice_fraction=0.5).eval()
    x = volumes()
    assert encoder_batch_shapes(model, x) == [(2 * 6, 1, 10, 8)]
    with torch.no_grad():
        outputs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])


# ---------------------------------------------------------------- training and export


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_a_few_adam_steps_fit_a_tiny_regression(aggregation):
    model = tiny_net(aggregation=aggregation, dropout=0.0, position_embedding=True, spatial_shape=(8, 8, 8)).train()
    x = volumes(batch=4, shape=(8, 8, 8), seed=3)
    target = torch.randn(4, 1, generator=torch.Generator().manual_seed(4))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "options",
    [dict(aggregation=a, position_embedding=True) for a in AGGREGATIONS]
    + [dict(encoder="resnet18", aggregation="attention", in_channel_mode="sum", channels_last=True)]
    + [dict(aggregation="mean", fused_norm_pool=True)],
)
@pytest.mark.filterwarnings("ignore:'norm' was found in ScriptModule constants")  # inside torch's TransformerEncoder
def test_torchscript_export_gives_the_same_predictions(options):
    model = tiny_net(**options).eval()
    scripted = torch.jit.script(model)
    x = volumes()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        model.slice_stride = scripted.slice_stride = 2  # evaluation subsetting stays adjustable
        torch.testing.assert_close(scripted(x), model(x))
        if options["aggregation"] == "attention":
            for exported, direct in zip(scripted.forward_with_attention(x), model.forward_with_attention(x)):
                torch.testing.assert_close(exported, direct)


def test_channels_last_changes_layout_not_result():
    reference = tiny_net().eval()
    fast = tiny_net(channels_last=True).eval()
    fast.load_state_dict(reference.state_dict())
    assert fast.encoder.blocks[1].conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fast(volumes()), reference(volumes()), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("height, width", [(13, 10), (2, 3), (1, 2)])  # odd sizes; (1, 2) skips the pool
def test_fused_norm_pool_block_equals_the_plain_block_with_gradients(height, width):
    torch.manual_seed(0)
    plain = SFCN2DBlock(3, 5).double()
    fused = SFCN2DBlock(3, 5, fused_norm_pool=True).double()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, height, width, dtype=torch.float64)
    upstream = torch.randn_like(plain(x))
    results = []
    for block in (plain, fused):
        inputs = x.clone().requires_grad_()
        out = block(inputs)
        out.backward(upstream)
        results.append([out, inputs.grad, block.conv.weight.grad, block.conv.bias.grad])
    for fused_result, plain_result in zip(results[1], results[0]):
        torch.testing.assert_close(fused_result, plain_result, atol=1e-10, rtol=1e-9)


def test_fused_norm_pool_network_computes_the_same_function_and_gradients():
    plain = tiny_net(dropout=0.0, position_embedding=True).double().train()
    fused = tiny_net(dropout=0.0, position_embedding=True, fused_norm_pool=True).double().train()
    assert fused.state_dict().keys() == plain.state_dict().keys()
    fused.load_state_dict(plain.state_dict())
    x = volumes().double()
    plain(x).sum().backward()
    fused_out = fused(x)
    fused_out.sum().backward()
    torch.testing.assert_close(fused_out, plain(x), atol=1e-10, rtol=1e-9)
    for (name, p_fused), p_plain in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p_fused.grad, p_plain.grad, atol=1e-10, rtol=1e-8, msg=name)


# ---------------------------------------------------------------- ImageNet weights from a local file


def torchvision_resnet_shapes(layers):
    """Key -> shape of torchvision's ResNet-18/34 state dict, written from the architecture alone."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def batch_norm(prefix, width):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (width,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    batch_norm("bn1", 64)
    in_width = 64
    for stage, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (width, in_width if block == 0 else width, 3, 3)
            batch_norm(f"{prefix}.bn1", width)
            shapes[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
            batch_norm(f"{prefix}.bn2", width)
            if block == 0 and in_width != width:
                shapes[f"{prefix}.downsample.0.weight"] = (width, in_width, 1, 1)
                batch_norm(f"{prefix}.downsample.1", width)
        in_width = width
    shapes.update({"fc.weight": (1000, 512), "fc.bias": (1000,)})
    return shapes


def random_state_dict(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.05
    return state


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    state = random_state_dict(torchvision_resnet_shapes((2, 2, 2, 2)))
    path = tmp_path_factory.mktemp("weights") / "resnet18_imagenet.pt"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("name, layers", [("resnet18", (2, 2, 2, 2)), ("resnet34", (3, 4, 6, 3))])
def test_monai_2d_resnet_has_the_torchvision_layout(name, layers):
    expected = {k: v for k, v in torchvision_resnet_shapes(layers).items() if not k.startswith("fc.")}
    actual = {k: tuple(v.shape) for k, v in build_resnet_backbone(name, in_channels=3).state_dict().items()}
    assert actual == expected


def test_pretrained_weights_load_strictly_and_sum_mode_sums_rgb_kernels(resnet18_file):
    path, state = resnet18_file
    repeat = tiny_net(encoder="resnet18", pretrained_weights=path).eval()
    for key, value in repeat.encoder.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    summed = tiny_net(encoder="resnet18", pretrained_weights=path, in_channel_mode="sum").eval()
    conv1 = summed.encoder.backbone.conv1.weight
    assert conv1.shape == (64, 1, 7, 7)
    assert torch.equal(conv1, state["conv1.weight"].sum(dim=1, keepdim=True))
    # the same network apart from conv1: a grey slice repeated to RGB equals the summed kernel on it
    summed.load_state_dict({k: v for k, v in repeat.state_dict().items() if k != "encoder.backbone.conv1.weight"},
                           strict=False)
    with torch.no_grad():
        torch.testing.assert_close(summed(volumes()), repeat(volumes()), atol=1e-4, rtol=1e-4)


def test_pretrained_weights_that_do_not_fit_are_named(resnet18_file, tmp_path):
    _, state = resnet18_file
    renamed = dict(state)
    renamed["layer1.0.conv1.kernel"] = renamed.pop("layer1.0.conv1.weight")
    torch.save(renamed, tmp_path / "renamed.pt")
    names = r"missing keys: layer1\.0\.conv1\.weight; unexpected keys: layer1\.0\.conv1\.kernel$"
    with pytest.raises(ValueError, match=names):
        tiny_net(encoder="resnet18", pretrained_weights=tmp_path / "renamed.pt")
    reshaped = dict(state)
    reshaped["layer2.0.downsample.0.weight"] = torch.zeros(128, 64, 3, 3)
    torch.save(reshaped, tmp_path / "reshaped.pt")
    mismatch = r"shape mismatches: layer2\.0\.downsample\.0\.weight: file \(128, 64, 3, 3\) vs model \(128, 64, 1, 1\)$"
    with pytest.raises(ValueError, match=mismatch):
        tiny_net(encoder="resnet18", pretrained_weights=tmp_path / "reshaped.pt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        tiny_net(encoder="resnet18", pretrained_weights=tmp_path / "absent.pt")


def test_sfcn_norm_choice_builds_batch_or_instance_norm_and_refuses_fused_batch_norm():
    batch = SliceSetNet(spatial_shape=[8, 8, 8], sfcn_channels=[4, 8], sfcn_norm="batch")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in batch.modules())
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in batch.modules())
    batch.train()
    batch(torch.randn(2, 1, 8, 8, 8)).sum().backward()
    assert float(batch.encoder.blocks[0].norm.running_var.mean()) != 1.0  # statistics were tracked
    with pytest.raises(ValueError, match="instance norm only"):
        SliceSetNet(spatial_shape=[8, 8, 8], sfcn_norm="batch", fused_norm_pool=True)
    with pytest.raises(ValueError, match="unknown sfcn norm 'group'"):
        SliceSetNet(spatial_shape=[8, 8, 8], sfcn_norm="group")
