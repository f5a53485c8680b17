"""Training engine for TGB-GAN: an image-to-image WGAN-GP whose generator output also feeds an age regressor."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from monai.utils import StrEnum
from torch import nn
from torch.optim import Optimizer

from brainage_core.options import as_bool
from custom_components.common.batch_norm import recompute_batch_norm_statistics
from custom_components.common.data import PrepareImageTarget
from custom_components.tgb_gan.losses import TaskGuidedGANLoss


class TGBGANKeys(StrEnum):
    """Keys of :class:`TaskGuidedGANTrainer`'s iteration output.

    ``engine.state.output`` is a one-item list holding the batch's dict (images not split per sample): the
    shape of MONAI's decollated output, so ``monai.handlers.from_engine(keys, first=True)`` reads it, as
    MONAI's experiment tracking does (``--tracking mlflow`` logs ``from_engine(['loss'], first=True)``).
    ``LOSS`` is the generator's total loss (a Python float); ``LOSSES`` a dict of Python floats (``g_loss``,
    ``adv``, ``l1``, ``age_mse`` unless ablated, ``d_loss``, ``wasserstein``, ``gp`` of the last critic
    update) for StatsHandler and TensorBoardStatsHandler: ``from_engine(['losses'], first=True)``.
    """

    IMAGE = "image"
    RECONSTRUCTION = "reconstruction"
    AGE = "age"
    PRED_AGE = "pred_age"
    LOSS = "loss"
    LOSSES = "losses"


@contextmanager
def _parameters_frozen(*modules: nn.Module):
    """Stop gradients flowing into the modules' parameters (they still flow through them to their input)."""
    params = [p for module in modules for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(params, flags):
            param.requires_grad_(flag)


class TaskGuidedGANTrainer(Trainer):
    """Trainer of TGB-GAN: per iteration ``d_train_steps`` critic updates, then one generator+regressor update.

    The generator reconstructs the batch's images; the critic is trained with WGAN-GP on real images versus
    reconstructions (detached, the same ones for all critic updates of the iteration, as in MONAI's
    GanTrainer); then the generator and the age regressor (both in ``g_optimizer``) are trained together
    on ``loss.generator_loss``. With ``loss.age_weight == 0`` (the ablation) the regressor is never run,
    so its parameters get no gradient and ``g_optimizer`` leaves them untouched.

    Why :class:`monai.engines.Trainer` and not ``AdversarialTrainer``: AdversarialTrainer updates the
    generator before the discriminator, once each, takes separate logits-only loss callables and has no
    third network or gradient penalty; its whole iteration would be replaced. Trainer gives the same
    Workflow machinery (handlers, metrics, events, ``get_stats``) without unused constructor arguments.

    Safety: every loss is checked before its backward pass; a non-finite one raises ``FloatingPointError``
    naming the epoch, iteration and loss terms, so no optimiser ever steps on it. Ignite then fires
    ``EXCEPTION_RAISED``, where ``CheckpointSaver(save_final=True)`` saves the weights of the last finite step
    (attach it before StatsHandler: StatsHandler re-raises and later exception handlers are skipped).

    AMP: on CUDA, ``amp`` runs autocast + one GradScaler per optimiser (``g_scaler`` and ``d_scaler``; save
    them with the checkpoint when resuming matters). On a CPU, ``cpu_bf16`` runs bfloat16 autocast (no
    scaler: bfloat16 has float32's range); worth it only on CPUs with bf16 units
    (:func:`custom_components.common.hardware.cpu_has_fast_bf16`). ``amp=True`` off CUDA is accepted with a
    warning. The gradient penalty stays in bfloat16 autocast and leaves float16 for float32
    (:func:`custom_components.tgb_gan.losses.gradient_penalty`).

    Random draws (gradient-penalty interpolation weights, regressor dropout) use torch's global RNG, which
    the bundle seeds (``monai.utils.set_determinism``).

    Events: ``FORWARD_COMPLETED`` after the generator's forward pass, ``INNER_ITERATION_STARTED`` /
    ``INNER_ITERATION_COMPLETED`` around every critic update, ``LOSS_COMPLETED`` after the generator loss,
    ``MODEL_COMPLETED`` at the end. ``network`` is the generator, for handlers that look up
    ``engine.network``.

    Args (beyond those of :class:`monai.engines.SupervisedTrainer`, which mean the same here):
        generator, critic, regressor: the three networks (``regressor`` may be None only for the ablation).
        g_optimizer: optimiser over the generator's and the regressor's parameters.
        d_optimizer: optimiser over the critic's parameters.
        loss: the task-guided loss; its ``age_weight`` selects TGB-GAN or the ablation.
        d_train_steps: critic updates per iteration.
        warmup_iterations: the first iterations train the generator on the reconstruction term alone (no
            critic update, no age term), so the adversarial and age terms start from a generator that
            reconstructs; from scratch the full loss does not learn to reconstruct (figures: the Performance
            section of ``bundles/tgb_gan_augment/docs/README.md``).
        warmup_optimizer: the optimiser of the warm-up steps (its own learning rate and moments, so a fast
            reconstruction warm-up does not disturb the adversarial phase's Adam state); defaults to
            ``g_optimizer``.
        branch_optimizer: when given (and the loss has an age term), the branch learns age during the warm-up:
            every warm-up iteration also trains it, with this optimiser, on the batch's real volumes and their
            reconstructions (detached) together, on the loss's standardised age term; at the end of the
            warm-up its batch-norm statistics are recomputed over the whole training loader (real volumes
            and reconstructions, the final warm-up weights). Seeing both makes it read age the same way in
            real and reconstructed volumes instead of reading the reconstruction's smoothing as age; with
            ``train_regressor`` False it is then the fixed task loss of the adversarial phase, with no
            separate pre-training run.
        warmup_lr_schedulers: schedulers stepped once after every warm-up iteration (e.g. the branch's).
        grad_clip_norm: when given, clip each optimiser's gradients to this total 2-norm before stepping.
        train_regressor: False keeps the branch fixed: in eval mode (its saved batch-norm statistics) and
            without gradients to its parameters, while the age term still trains the generator through it.
            A branch trained on real images then acts as a fixed task loss that penalises reconstructions
            losing what it reads age from; a branch trained with the generator (True, the paper's) can
            instead adapt to whatever the generator outputs.
        channels_last: put the three networks' weights and every batch in the channels-last-3d memory
            layout, which pays with bf16 autocast on a CPU with bf16 units (``benchmarks/bench_gan_train.py``);
            the computed values are the same.
        lr_schedulers: learning-rate schedulers stepped once after every adversarial iteration (never during
            the warm-up), so their iteration count starts where the adversarial phase starts. A scheduler
            stepped per epoch by a handler would instead decay the rates through the warm-up, before the
            critic and the age term are ever trained.
        prepare_batch: returns ``(images, ages)``; defaults to :class:`~custom_components.common.data.PrepareImageTarget` with keys
            ``image`` and ``age``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        generator: nn.Module,
        critic: nn.Module,
        regressor: nn.Module | None,
        g_optimizer: Optimizer,
        d_optimizer: Optimizer,
        loss: TaskGuidedGANLoss,
        d_train_steps: int = 1,
        warmup_iterations: int = 0,
        warmup_optimizer: Optimizer | None = None,
        branch_optimizer: Optimizer | None = None,
        warmup_lr_schedulers: Sequence | None = None,
        grad_clip_norm: float | None = None,
        train_regressor: bool = True,
        channels_last: bool = False,
        lr_schedulers: Sequence | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        cpu_bf16: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        if isinstance(d_train_steps, bool) or not isinstance(d_train_steps, int) or d_train_steps < 1:
            raise ValueError(f"d_train_steps must be a positive integer, got {d_train_steps!r}")
        if isinstance(warmup_iterations, bool) or not isinstance(warmup_iterations, int) or warmup_iterations < 0:
            raise ValueError(f"warmup_iterations must be a non-negative integer, got {warmup_iterations!r}")
        if grad_clip_norm is not None and not grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be positive or None, got {grad_clip_norm!r}")
        if regressor is None and loss.uses_age:
            raise ValueError("a regressor is needed when loss.age_weight > 0 (set age_weight=0 for the ablation)")
        device = torch.device(device)
        use_amp = as_bool(amp, "amp") and device.type == "cuda"
        if amp and not use_amp:
            warnings.warn(f"amp=True has no effect on device '{device}': training runs in float32", stacklevel=2)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=PrepareImageTarget("age", required=False) if prepare_batch is None else prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=use_amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=False,  # the output is already one-item-list shaped (see TGBGANKeys)
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.generator = generator
        self.network = generator
        self.critic = critic
        self.regressor = regressor
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.loss_function = loss
        self.d_train_steps = d_train_steps
        self.warmup_iterations = warmup_iterations
        per_epoch = epoch_length or (len(train_data_loader) if hasattr(train_data_loader, "__len__") else None)
        total = None if per_epoch is None else max_epochs * per_epoch
        if warmup_iterations and total is not None and warmup_iterations >= total:
            warnings.warn(f"warmup_iterations={warmup_iterations} covers all {total} training iterations: the critic "
                          "and the age term are never trained; lower warmup_iterations or train longer", stacklevel=2)
        self.warmup_optimizer = g_optimizer if warmup_optimizer is None else warmup_optimizer
        self.branch_optimizer = branch_optimizer if regressor is not None and loss.uses_age else None
        self.warmup_lr_schedulers = list(warmup_lr_schedulers or [])
        if self.branch_optimizer is not None and warmup_iterations == 0:
            warnings.warn("branch_optimizer is given but warmup_iterations is 0: the branch learns age only during "
                          "the warm-up, so it keeps its initial weights", stacklevel=2)
        self.grad_clip_norm = grad_clip_norm
        self.lr_schedulers = list(lr_schedulers or [])
        self.train_regressor = as_bool(train_regressor, "train_regressor")
        self.channels_last = as_bool(channels_last, "channels_last")
        if self.channels_last:
            for net in (generator, critic, regressor):
                if net is not None:
                    net.to(memory_format=torch.channels_last_3d)
        self.optim_set_to_none = optim_set_to_none
        self.cpu_bf16 = as_bool(cpu_bf16, "cpu_bf16") and device.type == "cpu"
        self.g_scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.d_scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def _autocast(self):
        if self.cpu_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast(self.state.device.type, enabled=self.amp, **self.amp_kwargs)

    def _step(
        self, name: str, loss: torch.Tensor, terms: Mapping[str, torch.Tensor], optimizer: Optimizer, scaler
    ) -> None:
        """Check ``loss`` is finite, then backward, optional clipping and one optimiser step."""
        if not torch.isfinite(loss):
            values = ", ".join(f"{key}={float(value):.6g}" for key, value in terms.items())
            raise FloatingPointError(
                f"non-finite {name} loss at epoch {self.state.epoch}, iteration {self.state.iteration}: {values}. "
                "Training stopped before this optimiser step: the weights are those of the last finite step."
            )
        optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        scaler.scale(loss).backward()
        if self.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()

    def _iteration(self, engine: TaskGuidedGANTrainer, batchdata: Mapping[str, Any]) -> list[dict[str, Any]]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        real, age = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if engine.channels_last:
            real = real.contiguous(memory_format=torch.channels_last_3d)
        loss = engine.loss_function
        for net in (engine.generator, engine.critic, engine.regressor):
            if net is not None:
                net.train()
        warmup = engine.state.iteration <= engine.warmup_iterations
        branch_learns = warmup and engine.branch_optimizer is not None
        if engine.regressor is not None and not engine.train_regressor and not branch_learns:
            engine.regressor.eval()

        with engine._autocast():
            fake = engine.generator(real)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        if warmup:
            g_total, g_terms = loss.reconstruction_loss(fake, real)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            engine._step("generator", g_total, g_terms, engine.warmup_optimizer, engine.g_scaler)
            pred_age = engine._branch_warmup_step(real, fake, age, g_terms) if branch_learns else None
            for scheduler in engine.warmup_lr_schedulers:
                scheduler.step()
            if branch_learns and engine.state.iteration == engine.warmup_iterations:
                engine.settle_branch_statistics()
            return engine._finish(real, fake, g_terms, age, pred_age)

        for _ in range(engine.d_train_steps):
            engine.fire_event(IterationEvents.INNER_ITERATION_STARTED)
            with engine._autocast():
                d_total, d_terms = loss.critic_loss(engine.critic, real, fake)
            engine._step("critic", d_total, d_terms, engine.d_optimizer, engine.d_scaler)
            engine.fire_event(IterationEvents.INNER_ITERATION_COMPLETED)

        frozen = [engine.critic] + ([engine.regressor] if loss.uses_age and not engine.train_regressor else [])
        with engine._autocast(), _parameters_frozen(*frozen):
            fake_scores = engine.critic(fake)
            pred_age = engine.regressor(fake) if loss.uses_age else None
            g_total, g_terms = loss.generator_loss(fake_scores, fake, real, pred_age, age)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine._step("generator", g_total, g_terms, engine.g_optimizer, engine.g_scaler)
        for scheduler in engine.lr_schedulers:
            scheduler.step()
        return engine._finish(real, fake, {**g_terms, **d_terms}, age, pred_age)

    def _branch_warmup_step(self, real: torch.Tensor, fake: torch.Tensor, age: torch.Tensor | None,
                            terms: dict) -> torch.Tensor:
        """One branch update on the real volumes and their detached reconstructions; adds ``branch_age_mse``
        to ``terms`` and returns the branch's ages for the real volumes."""
        if age is None:
            raise ValueError("the branch learns age during the warm-up, but the batch has no ages")
        pair = torch.cat([real, fake.detach()])
        with self._autocast():
            predicted = self.regressor(pair)
            branch_total, branch_terms = self.loss_function.branch_loss(predicted, torch.cat([age, age]))
        self._step("branch", branch_total, branch_terms, self.branch_optimizer, self.g_scaler)
        terms.update(branch_terms)
        return predicted[: real.shape[0]].detach()

    @torch.no_grad()
    def settle_branch_statistics(self) -> None:
        """Recompute the branch's batch-norm statistics with its final warm-up weights over the training
        loader (real volumes and their reconstructions), so the fixed branch of the adversarial phase
        normalises as it was trained, not with running averages of moving weights."""
        def images():
            for batchdata in self.data_loader:
                real, _ = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
                if self.channels_last:
                    real = real.contiguous(memory_format=torch.channels_last_3d)
                with self._autocast():
                    fake = self.generator(real)
                yield torch.cat([real, fake.to(real.dtype)])

        def forward(batch: torch.Tensor, network: nn.Module) -> torch.Tensor:
            with self._autocast():
                return network(batch)

        recompute_batch_norm_statistics(self.regressor, images(), inferer=forward)

    def _finish(self, real: torch.Tensor, fake: torch.Tensor, terms: Mapping[str, torch.Tensor],
                age: torch.Tensor | None = None, pred_age: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """Set the iteration's output (images, loss values, ages when known), fire MODEL_COMPLETED, return it."""
        output: dict[str, Any] = {
            TGBGANKeys.IMAGE: real,
            TGBGANKeys.RECONSTRUCTION: fake.detach(),
            TGBGANKeys.LOSS: float(terms["g_loss"]),
            TGBGANKeys.LOSSES: {key: float(value) for key, value in terms.items()},
        }
        if age is not None:
            output[TGBGANKeys.AGE] = age
        if pred_age is not None:
            output[TGBGANKeys.PRED_AGE] = pred_age.detach()
        self.state.output = [output]
        self.fire_event(IterationEvents.MODEL_COMPLETED)
        return self.state.output


class WarmupBranchStatistics:
    """Ignite handler for :class:`TaskGuidedGANTrainer`: every ``interval`` epochs that end inside the warm-up,
    while the branch learns age, recompute its batch-norm statistics with its current weights (as the trainer
    does at the warm-up's end), so that epoch's validation of the branch does not read running averages of
    weights that have since moved (the stale statistics that made the slice bundle's validation swing).

    Attach it before the ValidationHandler (first in ``train#handlers``), with the validation interval.
    """

    def __init__(self, interval: int = 1) -> None:
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.interval = int(interval)

    def attach(self, engine: TaskGuidedGANTrainer) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: TaskGuidedGANTrainer) -> None:
        if engine.branch_optimizer is not None and engine.state.iteration < engine.warmup_iterations:
            engine.settle_branch_statistics()
