"""Where a training run's time goes: the model alone against the whole bundle, both bundles, fp32 and bf16.

In one process, on ``--device`` (cuda, or cpu to prepare and to measure this machine):

- model only: volumes/s of bare training steps on one batch already on the device (the slice bundle's
  default network, Adam + MSE; the reference-equivalent network, sfcn2d "encoder1" with instance norm +
  mean pooling on the reference implementation's 91x109x91 input; the GAN trainer's critic + generator
  step with the bundle's networks), median of ``--repeats`` timed runs of ``--steps`` steps;
- whole bundle: ``configs/train.json`` run as ``monai.bundle run`` builds it (every handler: validation,
  precise batch norm, reports, checkpoints, resume file) on a synthetic cohort written here, epochs/s and
  training volumes/s over the epochs after the first, and its ratio to the model-only rate;
- on cpu, the per-iteration overhead: the slice bundle's training loop with a trivial network (a linear
  layer on each volume's mean, whose step takes well under a millisecond), so its seconds per iteration
  are all overhead: with ``augment false`` (every transform cached: the fixed cost of loader, collation,
  step bookkeeping and per-iteration handlers) and at the default ``augment true`` (plus the random
  augmentation transforms, run per volume in the main process with ``num_workers 0``).

"bf16" is autocast to bfloat16: on CUDA the bundles' ``amp`` with ``amp_dtype bfloat16``, on a CPU their
``cpu_bf16`` path (bf16 autocast + channels-last, on by default only where the CPU has bf16 units).
Writes ``<out>/bench_gpu.json`` and ``<out>/bench_gpu.md``.

    python benchmarks/bench_gpu.py --device cuda --out runs/bench_gpu              # on a GPU, a few minutes
    python benchmarks/bench_gpu.py --device cpu --toy --out runs/bench_gpu_cpu      # the test's toy size
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))  # this checkout's packages, also for the two benchmarks imported here
import bench_gan_train  # noqa: E402
import bench_slice_train  # noqa: E402

from brainage_core.datalist import write_datalist  # noqa: E402
from brainage_core.volumes import save_nifti  # noqa: E402
from custom_components.common.hardware import cpu_has_fast_bf16  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
REFERENCE_SHAPE = (91, 109, 91)  # the reference implementation's input (2 mm MNI crop)
SLICE_CHANNELS_LAST = {"channels_last": True}  # train.json's network_def
GAN_WIDTHS = bench_gan_train.DEMO  # the bundle's train.json networks
GAN_UPSAMPLING = json.loads((REPO / "bundles/tgb_gan_augment/configs/train.json").read_text())["network_def"]["upsampling"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_per_second(step, device: torch.device, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the rate of ``steps`` consecutive calls (one synchronisation per run)."""
    step()
    synchronize(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates)


def model_only(args, device: torch.device) -> dict:
    """Volumes/s of bare training steps of each model, per precision."""
    shape = (args.size,) * 3
    models = {
        "slice, bundle default (sfcn2d, batch norm, mean)": ("slice", shape, SLICE_CHANNELS_LAST),
        "slice, reference-equivalent (encoder1, instance norm, mean, 91x109x91)":
            ("slice", tuple(max(8, s * args.size // 96) for s in REFERENCE_SHAPE), {"sfcn_norm": "instance"}),
        "tgb_gan, bundle's networks (critic + generator step)": ("gan", shape, {}),
    }
    results = {}
    for name, (kind, model_shape, options) in models.items():
        for precision, dtype in PRECISIONS.items():
            torch.manual_seed(0)
            if kind == "slice":
                runner = bench_slice_train.Runner(bench_slice_train.Variant(
                    {**options, **({"sfcn_channels": args.tiny_channels} if args.toy else {})}, autocast=dtype),
                    model_shape, device)
                x = torch.randn(args.batch, 1, *model_shape, device=device)
                y = 20 + 60 * torch.rand(args.batch, 1, device=device)
            else:
                widths = {**GAN_WIDTHS, **({key: tuple(v[:2]) for key, v in GAN_WIDTHS.items() if v} if args.toy else {})}
                runner = bench_gan_train.Runner(bench_gan_train.Variant(autocast=dtype), widths, args.size, None, device,
                                                GAN_UPSAMPLING)
                x = torch.rand(args.gan_batch, 1, *model_shape, device=device)
                y = 20 + 60 * torch.rand(args.gan_batch, 1, device=device)
            batch = x.shape[0]
            rate = steps_per_second(lambda r=runner, x=x, y=y: r.train_step(x, y), device, args.steps, args.repeats)
            results[f"{name} | {precision}"] = {"volumes_per_second": batch * rate, "batch": batch,
                                                "shape": list(model_shape)}
            print(f"  model only: {name}, {precision}: {batch * rate:.1f} volumes/s", flush=True)
    return results


def synthetic_cohort(root: Path, n: int, size: int) -> Path:
    """``n`` smooth noisy balls on a ``size``^3 grid (4 mm voxels at 48^3), ages 20-80, split 70/15/15."""
    rng = np.random.default_rng(0)
    grid = np.indices((size,) * 3).astype(np.float32) / (size - 1) * 2 - 1
    radius = np.sqrt((grid**2).sum(0))
    records = []
    for i, age in enumerate(np.linspace(20, 80, n)):
        volume = (radius < 0.8) * (1.0 - 0.5 * (radius < 0.1 + 0.3 * (age - 20) / 60)) + 0.05 * rng.random(radius.shape)
        path = save_nifti(volume.astype(np.float32), np.diag([192.0 / size] * 3 + [1.0]), root / f"sub{i:03d}.nii.gz")
        records.append({"image": str(path), "age": float(age), "subject": f"sub{i:03d}"})
    n_val = max(2, n * 15 // 100)
    return write_datalist(root / "datalist.json", {"training": records[2 * n_val:], "validation": records[:n_val],
                                                   "test": records[n_val:2 * n_val]})


def whole_bundle(bundle: str, datalist: Path, overrides: dict, epochs: int) -> dict:
    """Run the bundle's train.json for ``epochs``; epoch and training-loop timings after the first epoch."""
    from monai.bundle import ConfigWorkflow

    configs = REPO / "bundles" / bundle / "configs"
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as root:
        workflow = ConfigWorkflow(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
                                  bundle_root=root, datalist_file=str(datalist), resume=False,
                                  **{"train#trainer#max_epochs": epochs, **overrides})
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        marks: dict[str, list] = {"start": [], "loop_end": [], "end": [], "iterations": []}
        device = torch.device(workflow.parser.get_parsed_content("device"))

        def mark(key):
            def handler(engine):
                synchronize(device)
                marks[key].append(time.perf_counter())
                if key == "loop_end":
                    marks["iterations"].append(engine.state.epoch_length)
            return handler

        trainer.add_event_handler(Events.EPOCH_STARTED, mark("start"))
        # the epoch's last iteration: the training loop ends there, before validation and reports
        last_iteration = Events.ITERATION_COMPLETED(event_filter=lambda engine, i: i % engine.state.epoch_length == 0)
        trainer.add_event_handler(last_iteration, mark("loop_end"))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, mark("end"))
        workflow.run()
        workflow.finalize()
        volumes = len(workflow.parser.get_parsed_content("train#dataset"))
    epoch = [end - start for start, end in zip(marks["start"][1:], marks["start"][2:] + marks["end"][-1:])]
    loop = [end - start for start, end in zip(marks["start"][1:], marks["loop_end"][1:])]
    return {"epoch_seconds": statistics.median(epoch), "epochs_per_second": 1 / statistics.median(epoch),
            "volumes_per_second": volumes / statistics.median(epoch),
            "loop_seconds_per_iteration": statistics.median(loop) / marks["iterations"][-1], "training_volumes": volumes}


def bundle_overrides(bundle: str, precision: str, device: torch.device, args) -> dict:
    common = {"image_size": [args.size] * 3, "device": f"$torch.device('{device}')", "min_free_mb": 1}
    if device.type == "cuda":
        common.update(amp=precision == "bf16", amp_dtype="bfloat16")
    else:
        common.update(amp=False, cpu_bf16=precision == "bf16")
    if bundle == "slice_cnn_brainage":
        common.update({"batch_size": args.batch, **({"network_def#sfcn_channels": args.tiny_channels} if args.toy else {})})
    else:
        common.update({"batch_size": args.gan_batch, "warmup_iterations": 0, "n_grid_images": 2})
        if args.toy:
            common.update({"network_def#encoder_channels": [4, 8], "network_def#decoder_channels": [8, 4],
                           "critic_def#channels": [4, 8], "regressor_def#channels": [4, 8]})
    return common


class TrivialRegressor(torch.nn.Module):
    """A linear layer on each volume's mean: a training step costs next to nothing, so the loop's time
    per iteration is the pipeline's overhead."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=tuple(range(2, x.ndim))))


def per_iteration_overhead(datalist: Path, args) -> dict:
    """Training-loop milliseconds per iteration of the slice bundle with :class:`TrivialRegressor`, without
    and with the augmentation transforms."""
    trivial = {"network_def": {"_target_": f"{__name__}.TrivialRegressor"}, "image_size": [args.size] * 3,
               "batch_size": args.batch, "amp": False, "cpu_bf16": False, "min_free_mb": 1}
    loop = {augment: whole_bundle("slice_cnn_brainage", datalist, {**trivial, "augment": augment}, args.epochs)
            ["loop_seconds_per_iteration"] for augment in (False, True)}
    return {"fixed_ms_per_iteration": 1000 * loop[False], "with_augmentation_ms_per_iteration": 1000 * loop[True],
            "augmentation_ms_per_volume": 1000 * (loop[True] - loop[False]) / args.batch}


def markdown(results: dict) -> str:
    lines = [f"Device: {results['device_name']}; torch {results['torch']}; {results['cpu']}; "
             f"grid {results['size']}^3, batch {results['batch']} (GAN {results['gan_batch']}).", "",
             "| model only | volumes/s |", "|---|---|"]
    lines += [f"| {name} | {row['volumes_per_second']:.1f} |" for name, row in results["model_only"].items()]
    lines += ["", "| whole bundle (train.json, every handler) | epochs/s | volumes/s | x model only |", "|---|---|---|---|"]
    for name, row in results["whole_bundle"].items():
        lines.append(f"| {name} | {row['epochs_per_second']:.2f} | {row['volumes_per_second']:.1f} | "
                     f"{row['of_model_only']:.2f} |")
    if "overhead" in results:
        o = results["overhead"]
        lines += ["", f"Per-iteration overhead (slice training loop, trivial network, batch {results['batch']}): "
                      f"fixed {o['fixed_ms_per_iteration']:.1f} ms; with the augmentation transforms "
                      f"{o['with_augmentation_ms_per_iteration']:.1f} ms ({o['augmentation_ms_per_volume']:.1f} ms per volume)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/bench_gpu")
    parser.add_argument("--size", type=int, default=None, help="grid size (default 96 on cuda, 48 on cpu, 16 with --toy)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--gan_batch", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=None, help="synthetic cohort size (default 80, 20 with --toy)")
    parser.add_argument("--epochs", type=int, default=3, help="whole-bundle epochs (the first is not timed)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--toy", action="store_true", help="tiny networks and grid: checks that the script runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.size = args.size or (16 if args.toy else 96 if device.type == "cuda" else 48)
    args.subjects = args.subjects or (20 if args.toy else 80)
    args.tiny_channels = [4, 8]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": str(device), "torch": torch.__version__, "size": args.size, "batch": args.batch,
               "gan_batch": args.gan_batch, "toy": args.toy,
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "cpu": f"CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 units: {cpu_has_fast_bf16()}, "
                      f"{torch.get_num_threads()} threads"}
    print(results["device_name"], "|", results["cpu"], flush=True)
    results["model_only"] = model_only(args, device)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_cohort_") as folder:
        datalist = synthetic_cohort(Path(folder), args.subjects, args.size)
        results["whole_bundle"] = {}
        for bundle, model in (("slice_cnn_brainage", "slice, bundle default (sfcn2d, batch norm, mean)"),
                              ("tgb_gan_augment", "tgb_gan, bundle's networks (critic + generator step)")):
            for precision in PRECISIONS:
                row = whole_bundle(bundle, datalist, bundle_overrides(bundle, precision, device, args), args.epochs)
                row["of_model_only"] = row["volumes_per_second"] / results["model_only"][f"{model} | {precision}"]["volumes_per_second"]
                results["whole_bundle"][f"{bundle} | {precision}"] = row
                print(f"  whole bundle: {bundle}, {precision}: {row['volumes_per_second']:.1f} volumes/s "
                      f"({row['of_model_only']:.2f}x model only)", flush=True)
        if device.type == "cpu":
            results["overhead"] = per_iteration_overhead(datalist, args)
    (out / "bench_gpu.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (out / "bench_gpu.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
