"""TGB-GAN training throughput on this machine: one critic step (with gradient penalty) and one
generator + task-branch step per iteration, as custom_components.tgb_gan.engines.TaskGuidedGANTrainer does.

Variants are timed in one process, round-robin, median of ``--repeats``; "eager_fp32" is the baseline.
"bf16_autocast" is the trainer's ``cpu_bf16`` path (gradient penalty included, in bfloat16); the bundle
switches it on where the CPU has bf16 units, and the script prints whether this one has. The gradient penalty differentiates through the critic
twice, which torch.compile does not support, so "compile" compiles the generator and the branch only.
Peak memory is the highest resident set size seen during the variant's steps.

    python benchmarks/bench_gan_train.py --size 96 --batch 4 --repeats 3   # the paper's model and size
    python benchmarks/bench_gan_train.py --size 48 --batch 4 --demo-widths  # the bundle's 48^3 model
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, interleaved_medians, seconds  # noqa: E402

from custom_components.common.hardware import cpu_has_fast_bf16  # noqa: E402
from custom_components.common.networks.age_cnn3d import AgeCNN3d  # noqa: E402
from custom_components.tgb_gan.losses import TaskGuidedGANLoss  # noqa: E402
from custom_components.tgb_gan.networks import UPSAMPLING, ResidualAgeRegressor, TGBGenerator, WGANCritic  # noqa: E402

# the paper's three networks; the bundle's defaults (bundles/tgb_gan_augment/configs/train.json) with the
# default branch, AgeCNN3d
PAPER = {"encoder": (64, 128, 256, 512, 512), "decoder": (256, 256, 128, 64, 32), "critic": (64, 128, 256, 512),
         "branch": (16, 32, 64, 128, 256), "hidden": (2048, 512, 64)}
DEMO = {"encoder": (16, 32, 64, 64), "decoder": (64, 32, 16, 8), "critic": (16, 32, 64, 64),
        "branch": (16, 32, 64, 128), "hidden": None}


@dataclass(frozen=True)
class Variant:
    channels_last: bool = False
    compile: bool = False
    autocast: torch.dtype | None = None


VARIANTS = {
    "eager_fp32": Variant(),
    "channels_last": Variant(channels_last=True),
    "compile": Variant(compile=True),
    "bf16_autocast": Variant(autocast=torch.bfloat16),
    "bf16_channels_last": Variant(channels_last=True, autocast=torch.bfloat16),
}
BASELINE = "eager_fp32"


class Runner:
    """One variant's three networks and two optimisers, started from the same weights."""

    def __init__(self, variant: Variant, widths: dict, size: int, state: dict | None,
                 device: str | torch.device = "cpu", upsampling: str = "transposed") -> None:
        self.variant, self.device = variant, torch.device(device)
        self.generator = TGBGenerator(1, widths["encoder"], widths["decoder"], upsampling=upsampling)
        self.critic = WGANCritic(1, widths["critic"])
        self.branch = (AgeCNN3d(1, widths["branch"], init_bias=50.0, output_scale=18.0) if widths["hidden"] is None
                       else ResidualAgeRegressor(1, widths["branch"], widths["hidden"], 0.1, (size,) * 3, 50.0, 18.0))
        self.nets = (self.generator, self.critic, self.branch)
        if state is not None:
            for net, weights in zip(self.nets, state):
                net.load_state_dict(weights)
        for net in self.nets:
            net.to(self.device, memory_format=torch.channels_last_3d if variant.channels_last else torch.preserve_format)
        self.g_forward = torch.compile(self.generator) if variant.compile else self.generator
        self.b_forward = torch.compile(self.branch) if variant.compile else self.branch
        self.g_opt = torch.optim.Adam([*self.generator.parameters(), *self.branch.parameters()], lr=1e-4)
        self.d_opt = torch.optim.Adam(self.critic.parameters(), lr=1e-4)
        self.loss = TaskGuidedGANLoss(age_weight=1.0, age_scale=18.0)
        self.peak_rss = 0

    def state(self) -> tuple[dict, ...]:
        return tuple(net.state_dict() for net in self.nets)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.variant.autocast, enabled=self.variant.autocast is not None)

    def train_step(self, real: torch.Tensor, age: torch.Tensor) -> None:
        if self.variant.channels_last:
            real = real.contiguous(memory_format=torch.channels_last_3d)
        with PeakRSS() as memory:
            with self._autocast():
                fake = self.g_forward(real)
                d_total, _ = self.loss.critic_loss(self.critic, real, fake)
            self.d_opt.zero_grad(set_to_none=True)
            d_total.backward()
            self.d_opt.step()
            with self._autocast():
                g_total, _ = self.loss.generator_loss(self.critic(fake), fake, real, self.b_forward(fake), age)
            self.g_opt.zero_grad(set_to_none=True)
            g_total.backward()
            self.g_opt.step()
        self.peak_rss = max(self.peak_rss, memory.peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demo-widths", action="store_true", help="the bundle's small model, not the paper's")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--upsampling", choices=UPSAMPLING, default="transposed",
                        help="the generator's decoder (the paper's transposed convolutions, or the bundle's nearest)")
    args = parser.parse_args()

    torch.manual_seed(0)
    widths = DEMO if args.demo_widths else PAPER
    real = torch.rand(args.batch, 1, args.size, args.size, args.size)
    age = 20 + 60 * torch.rand(args.batch, 1)
    names = [BASELINE] + [name for name in args.variants if name != BASELINE]
    runners = {BASELINE: Runner(VARIANTS[BASELINE], widths, args.size, None, upsampling=args.upsampling)}
    start = runners[BASELINE].state()
    runners.update({name: Runner(VARIANTS[name], widths, args.size, start, upsampling=args.upsampling)
                    for name in names[1:]})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, bf16 units: {cpu_has_fast_bf16()}; {'demo' if args.demo_widths else 'paper'} widths, "
          f"{args.upsampling} upsampling, batch {args.batch}, {args.size}^3, median of {args.repeats} interleaved repeats", flush=True)
    first = {name: seconds(lambda r=runner: r.train_step(real, age)) for name, runner in runners.items()}
    for name, value in first.items():
        print(f"  {name}: first step {value:.1f} s (warm-up, compilation)", flush=True)
    step = interleaved_medians({name: (lambda r=runner: r.train_step(real, age)) for name, runner in runners.items()},
                               args.repeats)
    header = ("variant", "step s", "vol/s", "x eager", "peak RSS GB")
    print(("{:<16}" + "{:>12}" * (len(header) - 1)).format(*header))
    for name in names:
        print(f"{name:<16}{step[name]:>12.2f}{args.batch / step[name]:>12.3f}"
              f"{step[BASELINE] / step[name]:>12.2f}{runners[name].peak_rss / 1e9:>12.2f}")
    print(f"x eager: speed-up over {BASELINE} in this process; the trainer's CPU path is bf16_autocast where "
          f"the CPU has bf16 units, {BASELINE} elsewhere")


if __name__ == "__main__":
    main()
