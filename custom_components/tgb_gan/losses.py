"""The task-guided WGAN-GP loss of TGB-GAN (Li et al., MIUA 2021).

critic:    mean D(fake) - mean D(real) + gp_weight * GP
generator: adversarial_weight * (-mean D(fake)) + l1_weight * L1(fake, real) + age_weight * MSE(R(fake), age) / age_scale^2

The age term is on standardised ages (``age_scale`` = the training SD of age): an error of one SD costs
``age_weight`` whatever the cohort's age range. Unscaled, MSE in years^2 grows with the age variance, so
on a cohort aged 20-90 the paper's weight (tuned on subjects all under 30) swamps reconstruction.

``age_weight=0`` is the paper's "GAN without task branch" ablation: the age term is then not computed at
all, so the caller need not run the regressor.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP penalty: mean over samples of (||grad_x D(x_hat)||_2 - 1)^2.

    ``x_hat = w * real + (1 - w) * fake`` with one ``w ~ U(0, 1)`` per sample, drawn from ``generator``
    (torch's global RNG when None). The critic must score each sample from that sample alone (no batch
    norm), so the gradient of the summed scores gives every sample's own input gradient. The graph is kept
    (``create_graph=True``) so the penalty trains the critic. Under float16 autocast it is computed in
    float32 (second-order gradients overflow float16's range); bfloat16 autocast, which has float32's
    range, is kept: the penalty's double backward is a large part of a critic step, so leaving it in
    float32 forfeits much of the mixed-precision speed-up.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    device_type = real.device.type
    keep = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=keep):
        real, fake = real.detach().float(), fake.detach().float()
        weight_shape = (real.shape[0],) + (1,) * (real.ndim - 1)
        weight = torch.rand(weight_shape, generator=generator, device=real.device, dtype=real.dtype)
        interpolates = (weight * real + (1 - weight) * fake).requires_grad_(True)
        scores = critic(interpolates).float()
        (grad,) = torch.autograd.grad(scores.sum(), interpolates, create_graph=True)
        return ((grad.flatten(1).float().norm(2, dim=1) - 1) ** 2).mean()


class TaskGuidedGANLoss(nn.Module):
    """Critic and generator+branch objectives of TGB-GAN, with their components for logging.

    The defaults are the paper's. ``adversarial_weight`` scales the generator's adversarial term only; the
    critic's objective is left unweighted (scaling it would only rescale the critic's learning rate).

    Both methods return ``(total, terms)``: the total to back-propagate and a dict of detached scalars,
    critic: ``d_loss`` (the total), ``wasserstein`` (mean D(real) - mean D(fake)), ``gp``;
    generator: ``g_loss`` (the total), ``adv``, ``l1`` and, unless ``age_weight`` is 0, ``age_mse``
    (components unweighted).
    """

    def __init__(
        self,
        adversarial_weight: float = 1.0,
        gp_weight: float = 10.0,
        l1_weight: float = 10.0,
        age_weight: float = 0.1,
        age_scale: float = 1.0,
    ) -> None:
        super().__init__()
        weights = {
            "adversarial_weight": adversarial_weight,
            "gp_weight": gp_weight,
            "l1_weight": l1_weight,
            "age_weight": age_weight,
        }
        negative = {name: value for name, value in weights.items() if value < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        self.adversarial_weight = float(adversarial_weight)
        self.gp_weight = float(gp_weight)
        self.l1_weight = float(l1_weight)
        self.age_weight = float(age_weight)
        if not age_scale > 0:
            raise ValueError(f"age_scale must be positive (the training SD of age), got {age_scale}")
        self.age_scale = float(age_scale)

    @property
    def uses_age(self) -> bool:
        """False for the ablation without task branch: the regressor need not be run."""
        return self.age_weight > 0

    def critic_loss(
        self,
        critic: Callable[[torch.Tensor], torch.Tensor],
        real: torch.Tensor,
        fake: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Critic objective; ``fake`` is detached so only the critic receives gradients."""
        fake = fake.detach()
        wasserstein = critic(real).mean() - critic(fake).mean()
        gp = gradient_penalty(critic, real, fake, generator)
        total = -wasserstein + self.gp_weight * gp
        return total, {"d_loss": total.detach(), "wasserstein": wasserstein.detach(), "gp": gp.detach()}

    def reconstruction_loss(self, fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator's reconstruction term alone (the trainer's warm-up): ``l1_weight * L1``."""
        l1 = F.l1_loss(fake, real)
        total = self.l1_weight * l1
        return total, {"l1": l1.detach(), "g_loss": total.detach()}

    @staticmethod
    def _age_mse(predicted_age: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        if predicted_age.numel() != age.numel():
            raise ValueError(
                f"predicted_age and age hold different numbers of values: {predicted_age.numel()} vs {age.numel()}"
            )
        return F.mse_loss(predicted_age.reshape(-1).float(), age.reshape(-1).float())

    def branch_loss(self, predicted_age: torch.Tensor, age: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The branch's own objective while it learns age (the trainer's warm-up): MSE on standardised ages,
        ``MSE(R(x), age) / age_scale^2``, unweighted; terms ``branch_age_mse`` (in years^2) and ``branch_loss``."""
        age_mse = self._age_mse(predicted_age, age)
        total = age_mse / self.age_scale**2
        return total, {"branch_age_mse": age_mse.detach(), "branch_loss": total.detach()}

    def generator_loss(
        self,
        fake_scores: torch.Tensor,
        fake: torch.Tensor,
        real: torch.Tensor,
        predicted_age: torch.Tensor | None = None,
        age: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generator + task-branch objective from the critic's scores of ``fake`` and the branch's ages.

        ``predicted_age`` and ``age`` are required when ``uses_age`` and ignored otherwise.
        """
        total, terms = self.reconstruction_loss(fake, real)
        adv = -fake_scores.mean()
        total = total + self.adversarial_weight * adv
        terms["adv"] = adv.detach()
        if self.uses_age:
            if predicted_age is None or age is None:
                raise ValueError("age_weight > 0 needs predicted_age and age; set age_weight=0 for the ablation")
            age_mse = self._age_mse(predicted_age, age)
            total = total + self.age_weight * age_mse / self.age_scale**2
            terms["age_mse"] = age_mse.detach()
        terms["g_loss"] = total.detach()
        return total, terms
