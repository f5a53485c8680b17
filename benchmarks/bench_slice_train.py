"""Training throughput and inference latency of the slice set network (sfcn2d encoder) on this machine.

Every variant trains the same network (MSE, Adam lr 1e-4, weight decay 1e-4, as the bundle) on one
fixed random batch; the variants are timed in this one process, round-robin, median of ``--repeats``.
"eager_fp32" is the baseline; the bundle's default CPU path (marked *) is channels-last, with bf16 autocast
where the CPU computes bf16 natively (``cpu_bf16``; ``compile`` is a train.json key, off by default); the
"instance_*" variants use the paper's instance norm. FLOPs of
one training step are counted by torch's FlopCounterMode (convolutions and matrix products) during the
baseline's warm-up step. The achieved rate is compared with a
large matrix multiply in the variant's precision, measured in the same run. Peak memory is the highest
resident set size of the process seen during the variant's training steps.

    python benchmarks/bench_slice_train.py --batch 8 --size 96 --repeats 5
    python benchmarks/bench_slice_train.py --check-mae --mae-variant compile  # validation MAE of both
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, interleaved_medians, matmul_flops_per_second, seconds  # noqa: E402

from custom_components.common.hardware import cpu_has_fast_bf16  # noqa: E402
from custom_components.slice_cnn.networks.slice_set import SliceSetNet  # noqa: E402


@dataclass(frozen=True)
class Variant:
    net_options: dict = field(default_factory=dict)
    compile: bool = False
    autocast: torch.dtype | None = None  # CPU autocast dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.autocast or torch.float32


BUNDLE_NET = {"sfcn_norm": "batch"}  # bundles/slice_cnn_brainage/configs/train.json
PAPER_NORM = {"sfcn_norm": "instance"}
VARIANTS = {
    "eager_fp32": Variant(),
    "channels_last": Variant({"channels_last": True}),
    "compile": Variant(compile=True),
    "bf16_autocast": Variant(autocast=torch.bfloat16),
    "channels_last_bf16": Variant({"channels_last": True}, autocast=torch.bfloat16),
    "instance_eager": Variant(PAPER_NORM),
    "instance_fused_compile": Variant({**PAPER_NORM, "fused_norm_pool": True}, compile=True),
}
BASELINE = "eager_fp32"
# the bundle's train.json on a CPU: channels_last, cpu_bf16 where bf16 is native, compile false
DEFAULT_PATH = "channels_last_bf16" if cpu_has_fast_bf16() else "channels_last"


class Runner:
    """One variant's model, optimiser and compiled callables; the step mirrors SupervisedTrainer's."""

    def __init__(self, variant: Variant, size: int | tuple[int, int, int], device: str | torch.device = "cpu") -> None:
        self.variant, self.device = variant, torch.device(device)
        torch.manual_seed(0)  # the same start for variants of the same architecture
        shape = (size,) * 3 if isinstance(size, int) else tuple(size)
        self.model = SliceSetNet(spatial_shape=shape, init_bias=50.0,
                                 **{**BUNDLE_NET, **variant.net_options}).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, weight_decay=1e-4)
        self.forward = torch.compile(self.model) if variant.compile else self.model
        self.peak_rss = 0

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant.autocast is None:
            return self.forward(x)
        with torch.autocast(self.device.type, dtype=self.variant.autocast):
            return self.forward(x).float()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model.train()
        with PeakRSS() as memory:
            self.optimizer.zero_grad(set_to_none=True)
            F.mse_loss(self._predict(x), y).backward()
            self.optimizer.step()
        self.peak_rss = max(self.peak_rss, memory.peak)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with torch.inference_mode():
            return self._predict(x)


def benchmark(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, args.size, args.size, args.size)
    y = 20 + 60 * torch.rand(args.batch, 1)
    names = [BASELINE] + [name for name in args.variants if name != BASELINE]
    runners = {name: Runner(VARIANTS[name], args.size) for name in names}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; batch {args.batch}, {args.size}^3 volumes, "
          f"median of {args.repeats} interleaved repeats", flush=True)
    with FlopCounterMode(display=False) as counter:
        runners[BASELINE].train_step(x, y)  # doubles as the baseline's warm-up
    flops = counter.get_total_flops()
    first = {BASELINE: float("nan")}
    for name in names[1:]:
        first[name] = seconds(lambda r=runners[name]: r.train_step(x, y))  # includes compilation
        print(f"  {name}: first training step {first[name]:.1f} s", flush=True)
    train = interleaved_medians({name: (lambda r=runner: r.train_step(x, y)) for name, runner in runners.items()},
                                args.repeats)
    for runner in runners.values():
        runner.infer(x)  # warm-up (and compilation of the eval graph)
    infer = interleaved_medians({name: (lambda r=runner: r.infer(x)) for name, runner in runners.items()},
                                args.repeats)
    matmul = {dtype: matmul_flops_per_second(dtype) for dtype in {VARIANTS[name].dtype for name in names}}

    rates = ", ".join(f"{str(dtype).removeprefix('torch.')} {rate / 1e9:.1f} GFLOP/s" for dtype, rate in matmul.items())
    print(f"FLOPs per training step (FlopCounterMode): {flops / 1e9:.1f} GFLOP; matmul rate: {rates}")
    header = ("variant", "train vol/s", "x eager", "infer s/batch", "x eager", "GFLOP/s", "of matmul",
              "peak RSS GB", "1st step s")
    print(("{:<16}" + "{:>14}" * (len(header) - 1)).format(*header))
    for name in names:
        rate = flops / train[name]
        print(("{:<16}" + "{:>14.3f}" * 2 + "{:>14.2f}" * 2 + "{:>14.1f}{:>14.2f}{:>14.2f}{:>14.1f}").format(
            name + (" *" if name == DEFAULT_PATH else ""),
            args.batch / train[name], train[BASELINE] / train[name],
            infer[name], infer[BASELINE] / infer[name],
            rate / 1e9, rate / matmul[VARIANTS[name].dtype],
            runners[name].peak_rss / 1e9, first[name]))
    print(f"* the bundle's default training path; x eager: speed-up over {BASELINE} (same process)")


def synthetic_cohort(count: int, size: int, generator: torch.Generator) -> list[dict]:
    """Noisy smooth volumes whose central dark blob (a 'ventricle') grows with age."""
    grid = torch.stack(torch.meshgrid(*(torch.linspace(-1, 1, size),) * 3, indexing="ij"))
    records = []
    for _ in range(count):
        age = 20 + 60 * torch.rand((), generator=generator)
        radius = 0.15 + 0.35 * (age - 20) / 60
        brain = (grid.square().sum(0) < 0.8).float()
        ventricle = (grid.square().sum(0).sqrt() < radius).float()
        image = brain - ventricle + 0.3 * torch.randn((size,) * 3, generator=generator)
        image = (image - image.mean()) / image.std()
        records.append({"image": image[None], "age": age.reshape(1)})
    return records


def check_mae(args: argparse.Namespace) -> None:
    """Train the baseline and ``--mae-variant`` with MONAI's SupervisedTrainer from the same start on a
    small synthetic cohort; print each path's validation MAE and how far their predictions differ."""
    from monai.data import DataLoader
    from monai.engines import SupervisedTrainer
    from monai.utils import set_determinism

    size, generator = args.mae_size, torch.Generator().manual_seed(1)
    train, val = synthetic_cohort(48, size, generator), synthetic_cohort(24, size, generator)
    val_x = torch.stack([r["image"] for r in val])
    val_age = torch.cat([r["age"] for r in val])
    mean_age = float(torch.cat([r["age"] for r in train]).mean())
    torch.manual_seed(0)
    start = SliceSetNet(spatial_shape=(size,) * 3, init_bias=mean_age, **BUNDLE_NET).state_dict()
    predictions = {}
    for name in (BASELINE, args.mae_variant):
        variant = VARIANTS[name]
        set_determinism(seed=0)  # same dropout masks and shuffling for both paths
        model = SliceSetNet(spatial_shape=(size,) * 3, **{**BUNDLE_NET, **variant.net_options})
        model.load_state_dict(copy.deepcopy(start))
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=args.mae_epochs,
            train_data_loader=DataLoader(train, batch_size=8, shuffle=True),
            network=model,
            optimizer=torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4),
            loss_function=torch.nn.MSELoss(),
            prepare_batch=lambda batch, device, non_blocking, **kw: (batch["image"], batch["age"]),
            compile=variant.compile,
        )
        elapsed = seconds(trainer.run)
        model.eval()
        with torch.inference_mode():
            predictions[name] = model(val_x).flatten()
        mae = (predictions[name] - val_age).abs().mean()
        print(f"{name:<15} val MAE {mae:.3f} years ({len(val)} volumes {size}^3, {args.mae_epochs} epochs "
              f"of {len(train)}, SupervisedTrainer compile={variant.compile}, {elapsed:.0f} s)", flush=True)
    difference = (predictions[BASELINE] - predictions[args.mae_variant]).abs().max()
    print(f"largest difference between the two paths' predictions: {difference:.4f} years "
          f"(prediction spread {predictions[BASELINE].std():.2f}, val MAE of predicting the mean "
          f"{(val_age - mean_age).abs().mean():.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=96, help="volume edge (96: the 2 mm grid)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--check-mae", action="store_true", help="train baseline and default path, print MAE")
    parser.add_argument("--mae-size", type=int, default=24)
    parser.add_argument("--mae-epochs", type=int, default=15)
    parser.add_argument("--mae-variant", choices=sorted(VARIANTS), default="compile",
                        help="the speed option whose validation MAE --check-mae compares with the baseline")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_mae:
        check_mae(args)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
