"""TaskGuidedGANTrainer on tiny 8^3 volumes: updates, d_train_steps, ablation, non-finite losses, handlers."""
import logging

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset, MetaTensor
from monai.handlers import CheckpointSaver, StatsHandler, from_engine

from custom_components.common.data import PrepareImageTarget
from custom_components.tgb_gan.engines import TaskGuidedGANTrainer, TGBGANKeys, WarmupBranchStatistics
from custom_components.tgb_gan.losses import TaskGuidedGANLoss
from custom_components.tgb_gan.networks import ResidualAgeRegressor, TGBGenerator, WGANCritic

SIZE = 8


def make_loader(n: int = 2, batch_size: int = 2, nan_key: str | None = None) -> DataLoader:
    rng = np.random.default_rng(0)
    items = [
        {"image": rng.random((1, SIZE, SIZE, SIZE), dtype=np.float32), "age": float(20 + 3 * i)} for i in range(n)
    ]
    if nan_key == "image":
        items[0]["image"][0, 0, 0, 0] = np.nan
    elif nan_key == "age":
        items[0]["age"] = float("nan")
    return DataLoader(Dataset(items), batch_size=batch_size, shuffle=False, num_workers=0)


def make_trainer(loader=None, age_weight=0.1, optimiser=torch.optim.Adam, lr=1e-3, **kwargs):
    torch.manual_seed(0)
    generator = TGBGenerator(encoder_channels=(4, 8), decoder_channels=(8, 4))
    critic = WGANCritic(channels=(4, 8))
    regressor = ResidualAgeRegressor(channels=(2, 4), hidden=(8,), spatial_shape=(SIZE,) * 3, init_bias=23.0)
    g_params = list(generator.parameters()) + list(regressor.parameters())
    warmup_lr = kwargs.pop("warmup_lr", None)
    if warmup_lr is not None:
        kwargs["warmup_optimizer"] = optimiser(generator.parameters(), lr=warmup_lr)
    return TaskGuidedGANTrainer(
        device="cpu",
        max_epochs=kwargs.pop("max_epochs", 1),
        train_data_loader=make_loader() if loader is None else loader,
        generator=generator,
        critic=critic,
        regressor=regressor,
        g_optimizer=optimiser(g_params, lr=lr),
        d_optimizer=optimiser(critic.parameters(), lr=lr),
        loss=TaskGuidedGANLoss(age_weight=age_weight),
        **kwargs,
    )


def snapshot(*networks):
    return [[p.detach().clone() for p in net.parameters()] for net in networks]


def changed(before, network) -> list[bool]:
    return [not torch.equal(b, p) for b, p in zip(before, network.parameters())]


def test_one_iteration_updates_all_three_networks_with_finite_losses():
    trainer = make_trainer()
    nets = (trainer.generator, trainer.critic, trainer.regressor)
    before = snapshot(*nets)
    trainer.run()
    assert trainer.state.iteration == 1
    for params, net in zip(before, nets):
        assert all(changed(params, net)), type(net).__name__
    out = trainer.state.output[0]
    losses = out[TGBGANKeys.LOSSES]
    assert set(losses) == {"g_loss", "adv", "l1", "age_mse", "d_loss", "wasserstein", "gp"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in losses.values())
    assert from_engine([TGBGANKeys.LOSS], first=True)(trainer.state.output) == losses["g_loss"]  # as MLflow reads it
    assert out[TGBGANKeys.RECONSTRUCTION].shape == out[TGBGANKeys.IMAGE].shape == (2, 1, SIZE, SIZE, SIZE)
    assert out[TGBGANKeys.PRED_AGE].shape == out[TGBGANKeys.AGE].shape == (2, 1)
    torch.testing.assert_close(out[TGBGANKeys.AGE], torch.tensor([[20.0], [23.0]]))
    assert trainer.network is trainer.generator


def count_steps(optimizer) -> list:
    calls = []
    step = optimizer.step

    def counted_step(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    optimizer.step = counted_step
    return calls


def test_d_train_steps_runs_that_many_critic_updates_per_generator_update():
    trainer = make_trainer(d_train_steps=2)
    d_calls, g_calls = count_steps(trainer.d_optimizer), count_steps(trainer.g_optimizer)
    trainer.run()
    assert (len(d_calls), len(g_calls)) == (2, 1)


def test_ablation_never_runs_or_updates_the_regressor():
    trainer = make_trainer(age_weight=0.0)
    calls = []
    trainer.regressor.register_forward_hook(lambda *args: calls.append(1))
    before = snapshot(trainer.regressor, trainer.generator)
    trainer.run()
    assert calls == []
    assert not any(changed(before[0], trainer.regressor))
    assert any(changed(before[1], trainer.generator))
    assert "age_mse" not in trainer.state.output[0][TGBGANKeys.LOSSES]
    assert TGBGANKeys.PRED_AGE not in trainer.state.output[0]


def test_warmup_iterations_train_the_generator_on_reconstruction_alone_then_the_full_loss():
    trainer = make_trainer(loader=make_loader(n=6), warmup_iterations=2, warmup_lr=1e-2)
    d_calls, g_calls = count_steps(trainer.d_optimizer), count_steps(trainer.g_optimizer)
    warm_calls = count_steps(trainer.warmup_optimizer)
    critic_before, regressor_before = snapshot(trainer.critic, trainer.regressor)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: seen.append((len(d_calls), set(e.state.output[0][TGBGANKeys.LOSSES]))))
    trainer.run()
    assert seen[:2] == [(0, {"l1", "g_loss"}), (0, {"l1", "g_loss"})]  # no critic step, no age term
    assert seen[2] == (1, {"g_loss", "adv", "l1", "age_mse", "d_loss", "wasserstein", "gp"})
    assert len(warm_calls) == 2 and len(g_calls) == 1 and all(changed(critic_before, trainer.critic))
    assert any(changed(regressor_before, trainer.regressor))
    with pytest.raises(ValueError, match="warmup_iterations"):
        make_trainer(warmup_iterations=-1)
    with pytest.warns(UserWarning, match="warmup_iterations=3 covers all 3 training iterations"):
        make_trainer(loader=make_loader(n=6), warmup_iterations=3)


def test_non_finite_critic_loss_stops_before_any_update():
    trainer = make_trainer(loader=make_loader(nan_key="image"))
    nets = (trainer.generator, trainer.critic, trainer.regressor)
    before = snapshot(*nets)
    with pytest.raises(FloatingPointError, match="non-finite critic loss at epoch 1, iteration 1: d_loss=nan"):
        trainer.run()
    for params, net in zip(before, nets):
        assert not any(changed(params, net))


def test_non_finite_generator_loss_keeps_generator_and_regressor_and_saves_final_checkpoint(tmp_path):
    trainer = make_trainer(loader=make_loader(nan_key="age"))
    before = snapshot(trainer.generator, trainer.regressor)
    saver = CheckpointSaver(str(tmp_path), {"generator": trainer.generator}, save_final=True)
    saver.attach(trainer)
    with pytest.raises(FloatingPointError, match="non-finite generator loss at epoch 1, iteration 1"):
        trainer.run()
    assert not any(changed(before[0], trainer.generator))
    assert not any(changed(before[1], trainer.regressor))
    (checkpoint,) = tmp_path.glob("*.pt")
    saved = torch.load(checkpoint, weights_only=True)
    for b, (name, _) in zip(before[0], trainer.generator.named_parameters()):
        torch.testing.assert_close(saved[name], b)


def run_and_record_losses(**kwargs) -> list[dict]:
    trainer = make_trainer(loader=make_loader(n=4), **kwargs)
    history = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: history.append(e.state.output[0][TGBGANKeys.LOSSES]))
    trainer.run()
    return history


def test_same_seed_gives_identical_losses():
    first, second = run_and_record_losses(max_epochs=2), run_and_record_losses(max_epochs=2)
    assert len(first) == 4
    assert first == second
    assert first[0] != first[-1]


def update_norm(before, networks) -> torch.Tensor:
    after = [p for net in networks for p in net.parameters()]
    return torch.cat([(p - b).flatten() for b, p in zip(before, after)]).norm()


def test_gradient_clipping_bounds_each_update():
    clip = 1e-4
    trainer = make_trainer(optimiser=torch.optim.SGD, lr=1.0, grad_clip_norm=clip)
    g_nets, d_nets = (trainer.generator, trainer.regressor), (trainer.critic,)
    g_before, d_before = sum(snapshot(*g_nets), []), sum(snapshot(*d_nets), [])
    trainer.run()
    for before, nets in ((g_before, g_nets), (d_before, d_nets)):
        assert 0 < update_norm(before, nets) <= clip * (1 + 1e-4)


def test_lr_schedulers_count_from_the_end_of_the_warm_up():
    lrs = []
    trainer = make_trainer(loader=make_loader(n=6, batch_size=2), max_epochs=2, warmup_iterations=4, warmup_lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.g_optimizer, step_size=1, gamma=0.5)
    trainer.lr_schedulers = [scheduler]
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: lrs.append(e.g_optimizer.param_groups[0]["lr"]))
    trainer.run()
    # iterations 1-4 warm up at the full rate untouched; 5 is the first adversarial one; then one step each
    assert lrs == pytest.approx([1e-3] * 5 + [5e-4])
    assert scheduler.last_epoch == 2


class RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_stats_handler_logs_every_loss():
    trainer = make_trainer()
    recorder = RecordingHandler()
    StatsHandler(name="tgb_test", output_transform=from_engine(["losses"], first=True)).attach(trainer)
    logger = logging.getLogger("tgb_test")
    logger.addHandler(recorder)
    try:
        trainer.run()
    finally:
        logger.removeHandler(recorder)
    logged = " ".join(recorder.messages)
    for key in ("g_loss", "d_loss", "gp", "l1", "adv", "age_mse", "wasserstein"):
        assert f"{key}: " in logged


def test_amp_on_cpu_falls_back_to_float32_with_a_warning():
    with pytest.warns(UserWarning, match="amp=True has no effect"):
        trainer = make_trainer(amp=True)
    assert not trainer.amp
    trainer.run()
    assert trainer.state.output[0][TGBGANKeys.RECONSTRUCTION].dtype == torch.float32


def test_invalid_trainer_arguments():
    with pytest.raises(ValueError, match="d_train_steps"):
        make_trainer(d_train_steps=0)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        make_trainer(grad_clip_norm=0.0)
    generator, critic = TGBGenerator(encoder_channels=(2,), decoder_channels=(2,)), WGANCritic(channels=(2,))
    sgd = torch.optim.SGD(critic.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="regressor is needed"):
        TaskGuidedGANTrainer("cpu", 1, make_loader(), generator, critic, None, sgd, sgd, TaskGuidedGANLoss())


def test_trainer_builds_from_a_bundle_config_and_the_ablation_is_a_command_line_override():
    tgb = "custom_components.tgb_gan.networks"
    config = {
        "generator": {"_target_": f"{tgb}.TGBGenerator", "encoder_channels": [4, 8], "decoder_channels": [8, 4]},
        "critic": {"_target_": f"{tgb}.WGANCritic", "channels": [4, 8]},
        "regressor": {"_target_": f"{tgb}.ResidualAgeRegressor", "channels": [2, 4], "hidden": [8],
                      "spatial_shape": [SIZE] * 3},
        "g_optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-4,
                        "params": "$list(@generator.parameters()) + list(@regressor.parameters())"},
        "d_optimizer": {"_target_": "torch.optim.Adam", "params": "$@critic.parameters()", "lr": 1e-4},
        "loss": {"_target_": "custom_components.tgb_gan.losses.TaskGuidedGANLoss", "age_weight": 0.1},
        "trainer": {
            "_target_": "custom_components.tgb_gan.engines.TaskGuidedGANTrainer",
            "device": "cpu", "max_epochs": 1, "train_data_loader": "@loader",
            "generator": "@generator", "critic": "@critic", "regressor": "@regressor",
            "g_optimizer": "@g_optimizer", "d_optimizer": "@d_optimizer", "loss": "@loss", "d_train_steps": 2,
            "prepare_batch": {"_target_": "custom_components.common.data.PrepareImageTarget", "target_key": "age"},
            "train_handlers": [{"_target_": "StatsHandler", "output_transform": "$monai.handlers.from_engine(['losses'], first=True)"}],
        },
    }
    parser = ConfigParser(config)
    parser.update({"loader": make_loader(), "loss#age_weight": 0})  # as `--loss#age_weight 0` would
    trainer = parser.get_parsed_content("trainer")
    assert isinstance(trainer, TaskGuidedGANTrainer) and trainer.d_train_steps == 2
    trainer.run()
    assert "age_mse" not in trainer.state.output[0][TGBGANKeys.LOSSES]


def test_prepare_batch_returns_plain_image_and_column_of_ages():
    prepare = PrepareImageTarget(image_key="img", target_key="years", required=False)
    image, age = prepare({"img": MetaTensor(torch.zeros(2, 1, 2, 2, 2)), "years": [30, 40.5]}, "cpu")
    assert type(image) is torch.Tensor
    assert age.dtype == torch.float32 and age.tolist() == [[30.0], [40.5]]
    assert prepare({"img": torch.zeros(1, 1, 2, 2, 2)})[1] is None
    with pytest.raises(KeyError, match="key 'img'"):
        prepare({"image": torch.zeros(1)})
    with pytest.raises(ValueError, match="one 'years' per image"):
        prepare({"img": torch.zeros(2, 1, 2, 2, 2), "years": [1.0]})
    with pytest.raises(KeyError, match="no 'label' entry"):
        PrepareImageTarget("label")({"image": torch.zeros(1, 1, 2, 2, 2), "age": [50.0]})


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_bf16_autocast_trains_all_three_networks(channels_last):
    trainer = make_trainer(cpu_bf16=True, channels_last=channels_last)
    nets = (trainer.generator, trainer.critic, trainer.regressor)
    before = snapshot(*nets)
    trainer.run()
    assert trainer.cpu_bf16 and all(np.isfinite(v) for v in trainer.state.output[0][TGBGANKeys.LOSSES].values())
    assert trainer.state.output[0][TGBGANKeys.RECONSTRUCTION].dtype == torch.bfloat16
    weight = trainer.generator.encoder[1][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
    for params, net in zip(before, nets):
        assert all(changed(params, net)), type(net).__name__


def test_cpu_bf16_channels_last_training_stays_finite_run_after_run():
    """The same seeded bf16 channels-last step, repeated: before the critic's score convolution was kept
    contiguous, its weight gradient came out NaN in about a third of these runs."""
    for _ in range(8):
        trainer = make_trainer(cpu_bf16=True, channels_last=True)
        trainer.run()
        assert all(torch.isfinite(p).all() for p in trainer.critic.parameters())


@pytest.mark.parametrize("train_regressor", [False, "false"])  # "false": how `--train_branch false` arrives
def test_fixed_branch_trains_the_generator_through_it_and_stays_as_it_was(train_regressor):
    trainer = make_trainer(train_regressor=train_regressor)
    trainer.regressor.eval()
    before_branch, before_generator = snapshot(trainer.regressor), snapshot(trainer.generator)
    buffers = [b.clone() for b in trainer.regressor.buffers()]
    trainer.run()
    assert not any(changed(before_branch[0], trainer.regressor))
    assert all(torch.equal(a, b) for a, b in zip(buffers, trainer.regressor.buffers()))
    assert not trainer.regressor.training
    assert all(changed(before_generator[0], trainer.generator))
    assert "age_mse" in trainer.state.output[0][TGBGANKeys.LOSSES]


def mean_layer_input(regressor, layer, generator, loader) -> torch.Tensor:
    """Per-channel mean of ``layer``'s input, averaged over batches, when the regressor (in eval mode) reads
    every batch's real volumes and their reconstructions: what recomputed batch-norm statistics should hold."""
    inputs = []
    handle = layer.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    regressor.eval()
    with torch.no_grad():
        for batch in loader:
            real = torch.as_tensor(batch["image"])
            regressor(torch.cat([real, generator(real)]))
    handle.remove()
    return torch.stack([x.mean(dim=(0, 2, 3, 4)) for x in inputs]).mean(0)


def test_branch_learns_age_in_the_warm_up_then_stays_fixed_with_statistics_of_its_final_weights():
    """The default recipe: during the L1 warm-up the branch learns age on real volumes and their
    reconstructions; at the warm-up's end its batch-norm statistics are recomputed with those weights over
    the training loader; in the adversarial phase it is a fixed task loss."""
    from custom_components.common.batch_norm import batch_norm_layers
    from custom_components.common.networks.age_cnn3d import AgeCNN3d

    torch.manual_seed(0)
    loader = make_loader(n=8, batch_size=4)  # 2 iterations per epoch
    regressor = AgeCNN3d(channels=(4, 8), init_bias=30.0, output_scale=10.0, dropout=0.0)
    branch_optimizer = torch.optim.Adam(regressor.parameters(), lr=1e-2)
    trainer = make_trainer(loader=loader, max_epochs=2, warmup_iterations=2, train_regressor=False,
                           branch_optimizer=branch_optimizer,
                           warmup_lr_schedulers=[torch.optim.lr_scheduler.StepLR(branch_optimizer, 1, 0.5)])
    trainer.regressor = regressor
    trainer.g_optimizer = torch.optim.Adam(trainer.generator.parameters(), lr=1e-3)
    start = snapshot(regressor)[0]
    first_bn = batch_norm_layers(regressor)[0]
    after_warmup = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        losses = engine.state.output[0][TGBGANKeys.LOSSES]
        in_warmup = engine.state.iteration <= 2
        assert ("branch_loss" in losses) == in_warmup and ("age_mse" in losses) != in_warmup
        if engine.state.iteration == 2:  # the warm-up's end: the statistics were just recomputed
            after_warmup["params"] = snapshot(regressor)[0]
            after_warmup["buffers"] = [b.clone() for b in regressor.buffers()]
            after_warmup["expected_mean"] = mean_layer_input(regressor, first_bn, engine.generator, loader)

    trainer.run()
    assert any(changed(start, regressor))  # it learned in the warm-up
    assert branch_optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)  # its scheduler stepped twice
    assert not any(changed(after_warmup["params"], regressor))  # and stayed fixed afterwards
    assert all(torch.equal(a, b) for a, b in zip(after_warmup["buffers"], regressor.buffers()))
    assert not regressor.training
    # the recomputed statistics: the final warm-up weights over real volumes + reconstructions of every batch
    torch.testing.assert_close(first_bn.running_mean, after_warmup["expected_mean"], rtol=1e-4, atol=1e-5)
    assert int(first_bn.num_batches_tracked) == len(loader)


@pytest.mark.parametrize("with_handler", [True, False])
def test_warm_up_validation_sees_the_branch_with_statistics_of_its_current_weights(with_handler):
    """WarmupBranchStatistics: at the end of an epoch inside the warm-up, the learning branch's batch-norm
    statistics are those of its current weights over real volumes + reconstructions (what the epoch's
    validation then uses); without it they are running averages of weights that have moved."""
    from custom_components.common.batch_norm import batch_norm_layers
    from custom_components.common.networks.age_cnn3d import AgeCNN3d

    torch.manual_seed(0)
    loader = make_loader(n=8, batch_size=4)  # 2 iterations per epoch; the warm-up ends in epoch 2
    regressor = AgeCNN3d(channels=(4, 8), init_bias=30.0, output_scale=10.0, dropout=0.0)
    branch_optimizer = torch.optim.Adam(regressor.parameters(), lr=1e-2)
    trainer = make_trainer(loader=loader, max_epochs=1, warmup_iterations=4, train_regressor=False,
                           branch_optimizer=branch_optimizer,
                           train_handlers=[WarmupBranchStatistics()] if with_handler else None)
    trainer.regressor = regressor
    trainer.g_optimizer = torch.optim.Adam(trainer.generator.parameters(), lr=1e-3)
    first_bn = batch_norm_layers(regressor)[0]
    seen = {}

    @trainer.on(Events.EPOCH_COMPLETED)  # attached after the handler, as a ValidationHandler would be
    def check(engine):
        seen["expected"] = mean_layer_input(regressor, first_bn, engine.generator, loader)
        seen["running"] = first_bn.running_mean.clone()

    trainer.run()
    close = torch.allclose(seen["running"], seen["expected"], rtol=1e-4, atol=1e-5)
    assert close == with_handler


def test_warm_up_branch_statistics_rejects_a_bad_interval():
    with pytest.raises(ValueError, match="interval must be >= 1"):
        WarmupBranchStatistics(interval=0)

