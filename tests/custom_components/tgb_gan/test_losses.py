"""The WGAN-GP gradient penalty against hand-computed cases, and the task-guided loss and its ablation."""
import pytest
import torch
from torch import nn

from custom_components.tgb_gan.losses import TaskGuidedGANLoss, gradient_penalty
from custom_components.tgb_gan.networks import WGANCritic


class LinearCritic(nn.Module):
    """D(x) = sum(w * x) per sample: its input gradient is w everywhere, so GP = (||w|| - 1)^2."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x):
        return (x * self.weight).flatten(1).sum(dim=1)


class QuadraticCritic(nn.Module):
    """D(x) = 0.5 * ||x||^2 per sample: its input gradient is x itself."""

    def forward(self, x):
        return 0.5 * x.pow(2).flatten(1).sum(dim=1)


def test_gradient_penalty_of_a_linear_critic_and_its_gradient():
    torch.manual_seed(0)
    weight = torch.randn(1, 2, 2, 2)
    critic = LinearCritic(weight)
    real, fake = torch.rand(3, 1, 2, 2, 2), torch.rand(3, 1, 2, 2, 2)
    norm = weight.norm()
    gp = gradient_penalty(critic, real, fake)
    torch.testing.assert_close(gp, (norm - 1) ** 2)
    gp.backward()  # the graph is kept, so the penalty trains the critic: d/dw = 2 (||w|| - 1) w / ||w||
    torch.testing.assert_close(critic.weight.grad, 2 * (norm - 1) * weight / norm)


def test_gradient_penalty_is_zero_for_a_unit_norm_linear_critic():
    weight = torch.ones(1, 2, 2, 2) / 8**0.5
    gp = gradient_penalty(LinearCritic(weight), torch.rand(2, 1, 2, 2, 2), torch.rand(2, 1, 2, 2, 2))
    assert gp.item() == pytest.approx(0.0, abs=1e-12)


def test_gradient_penalty_interpolates_per_sample_with_the_given_generator():
    real, fake = torch.rand(4, 1, 3, 3, 3), torch.rand(4, 1, 3, 3, 3)
    gp = gradient_penalty(QuadraticCritic(), real, fake, torch.Generator().manual_seed(7))
    w = torch.rand(4, 1, 1, 1, 1, generator=torch.Generator().manual_seed(7))
    assert w.unique().numel() == 4  # one weight per sample
    x_hat = w * real + (1 - w) * fake
    expected = ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    torch.testing.assert_close(gp, expected)


def test_gradient_penalty_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        gradient_penalty(QuadraticCritic(), torch.rand(2, 1, 2, 2, 2), torch.rand(1, 1, 2, 2, 2))


def test_critic_loss_is_wasserstein_estimate_plus_weighted_penalty_and_ignores_fake_gradients():
    torch.manual_seed(1)
    weight = torch.randn(1, 2, 2, 2)
    critic = LinearCritic(weight)
    real = torch.rand(2, 1, 2, 2, 2)
    fake = torch.rand(2, 1, 2, 2, 2, requires_grad=True)
    total, terms = TaskGuidedGANLoss(gp_weight=10.0).critic_loss(critic, real, fake)
    d_real, d_fake = critic(real).mean(), critic(fake).mean()
    expected_gp = (weight.norm() - 1) ** 2
    torch.testing.assert_close(total, d_fake - d_real + 10.0 * expected_gp)
    torch.testing.assert_close(terms["wasserstein"], (d_real - d_fake).detach())
    torch.testing.assert_close(terms["gp"], expected_gp)
    assert terms["d_loss"] == total.detach()
    total.backward()
    assert fake.grad is None and critic.weight.grad is not None


def test_generator_loss_combines_weighted_terms():
    scores = torch.tensor([0.5, -1.5])
    real, fake = torch.zeros(2, 1, 2, 2, 2), torch.full((2, 1, 2, 2, 2), 0.25)
    predicted, age = torch.tensor([[20.0], [30.0]]), torch.tensor([[22.0], [30.0]])
    loss = TaskGuidedGANLoss(adversarial_weight=2.0, l1_weight=10.0, age_weight=0.1)
    total, terms = loss.generator_loss(scores, fake, real, predicted, age)
    # adv = -mean(scores) = 0.5; l1 = 0.25; mse = (4 + 0) / 2 = 2
    assert terms["adv"].item() == pytest.approx(0.5)
    assert terms["l1"].item() == pytest.approx(0.25)
    assert terms["age_mse"].item() == pytest.approx(2.0)
    assert total.item() == pytest.approx(2.0 * 0.5 + 10.0 * 0.25 + 0.1 * 2.0)
    assert terms["g_loss"].item() == pytest.approx(total.item())


def test_age_term_is_on_standardised_ages():
    scores, real, fake = torch.zeros(2), torch.zeros(2, 1, 2, 2, 2), torch.zeros(2, 1, 2, 2, 2)
    predicted, age = torch.tensor([[20.0], [30.0]]), torch.tensor([[30.0], [30.0]])
    total, terms = TaskGuidedGANLoss(age_weight=2.0, age_scale=10.0).generator_loss(scores, fake, real, predicted, age)
    assert terms["age_mse"].item() == pytest.approx(50.0)  # logged in years^2
    assert total.item() == pytest.approx(2.0 * 50.0 / 100.0)
    with pytest.raises(ValueError, match="age_scale"):
        TaskGuidedGANLoss(age_scale=0.0)


def test_ablation_removes_the_age_term():
    scores, real = torch.tensor([1.0, 2.0]), torch.zeros(2, 1, 2, 2, 2)
    fake = torch.ones(2, 1, 2, 2, 2, requires_grad=True)
    predicted = torch.tensor([[50.0], [60.0]], requires_grad=True)
    ablated = TaskGuidedGANLoss(age_weight=0.0)
    assert not ablated.uses_age and TaskGuidedGANLoss().uses_age
    total, terms = ablated.generator_loss(scores, fake, real, predicted, torch.tensor([20.0, 30.0]))
    assert "age_mse" not in terms
    assert total.item() == pytest.approx(-1.5 + 10.0 * 1.0)
    total.backward()
    assert fake.grad is not None and predicted.grad is None  # the predicted ages are not part of the graph
    total_without_ages, _ = ablated.generator_loss(scores, fake, real)
    assert total_without_ages.item() == total.item()


def test_task_guided_loss_needs_ages_and_non_negative_weights():
    with pytest.raises(ValueError, match="needs predicted_age and age"):
        TaskGuidedGANLoss().generator_loss(torch.zeros(1), torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="different numbers"):
        TaskGuidedGANLoss().generator_loss(
            torch.zeros(2), torch.zeros(2, 1, 2, 2, 2), torch.zeros(2, 1, 2, 2, 2), torch.zeros(2, 1), torch.zeros(3)
        )
    with pytest.raises(ValueError, match="gp_weight"):
        TaskGuidedGANLoss(gp_weight=-1.0)


def test_gradient_penalty_keeps_bf16_autocast_and_matches_float32():
    torch.manual_seed(0)
    critic = WGANCritic(channels=(4, 8))
    real, fake = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
    exact = gradient_penalty(critic, real, fake, torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = gradient_penalty(critic, real, fake, torch.Generator().manual_seed(1))
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert mixed.item() == pytest.approx(exact.item(), rel=0.05)
    assert mixed.item() != exact.item()  # computed in bfloat16, not silently in float32
    with torch.autocast("cpu", dtype=torch.float16):
        assert gradient_penalty(critic, real, fake, torch.Generator().manual_seed(1)).item() == pytest.approx(exact.item(), rel=1e-5)
