"""``make demo``: the main job on the embedded default data, as a list of re-runnable shell steps.

Each step is a command line of this project's own CLIs (``python -m data_prep ...``, the bundles'
``python -m monai.bundle run ...`` or ``python -m workflows ...``), run from the repository root; its output
streams to the console and to ``<out>/logs/<step>.log``. A failing step stops the demo, naming the command
and the log. After every step ``<out>/steps.json`` records its command, outputs, log and time; the last step
writes ``<out>/report.md`` and ``report.html`` from it (``python -m workflows demo-report``).

The steps: simulate a healthy cohort and an age-matched AD cohort; train TGB-GAN on the healthy training
split, synthesise age-balanced volumes and map age-related regions (scored against the simulator's ground
truth); train and evaluate the slice network on real data only and on real + synthetic; train and evaluate
the AD-detection variant, started from the real-only brain-age model (on an age-matched cohort a detector
from scratch needs about 700 optimiser steps before it leaves chance, more than the demo can spend; the
brain-age model's features cut that to about 200-350); preprocess the real IXI sample scans
and predict their brain age; write the report.
"""
from __future__ import annotations

import json
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from brainage_core.datalist import write_datalist
from brainage_core.grid import canonical_grid
from brainage_core.options import as_bool
from brainage_core.volumes import InputError, atomic_path
from data_prep.simulate import AD_MIN_AGE

REPO = Path(__file__).resolve().parents[1]
IXI_SAMPLE = REPO.parent / "shared" / "data" / "ixi_sample"
SLICE_CONFIGS = Path("bundles") / "slice_cnn_brainage" / "configs"
GAN_CONFIGS = Path("bundles") / "tgb_gan_augment" / "configs"

# The demo's GAN branch learns age in the warm-up: the bundle's default first trains a 3D regressor
# (about 7 min here), which would take the demo past its 20 minutes. The bundle's 400 warm-up iterations
# were sized for 35 iterations an epoch over 100 epochs; the demo's 105 training volumes make 14 an epoch.
# Its 16 epochs keep the warm-up share of its former 40 (400 of 560 iterations, 11 min of GAN): 160 of 224.
DEMO_GAN = {"real_trained_branch": False, "warmup_iterations": 160}
AD_FRACTION = 0.5


@dataclass
class Step:
    name: str
    argv: list[str]
    outputs: str

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


class StepFailed(RuntimeError):
    pass


def run_step(step: Step, log_dir: Path) -> float:
    """Run one step from the repository root, tee its output to the console and a log file; return seconds."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{step.name}.log"
    print(f"\n=== {step.name}\n$ {step.command}", flush=True)
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
        code = proc.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        raise StepFailed(f"step {step.name!r} failed (exit {code}): {step.command}\nlog: {log_path}")
    print(f"--- {step.name}: done in {seconds:.1f} s; outputs in {step.outputs}", flush=True)
    return seconds


def ixi_sample_datalist(sample_dir: Path, out: Path) -> Path:
    """A datalist (all in ``test``) of the raw IXI scans listed in the sample's participants.tsv."""
    table = pd.read_csv(sample_dir / "participants.tsv", sep="\t")
    records = [
        {"image": str(sample_dir / f"{row.participant_id}_T1.nii.gz"), "age": float(row.age),
         "sex": row.sex, "site": row.site, "subject": row.participant_id}
        for row in table.itertuples()
    ]
    return write_datalist(out, {"test": records}, source=f"IXI sample {sample_dir}")


@dataclass(frozen=True)
class DemoSettings:
    """Everything that sizes the demo; see ``run_demo`` for the meaning of each field."""

    n_subjects: int = 150
    n_ad_subjects: int = 400
    resolution: float = 4.0
    seed: int = 0
    gan_epochs: int = 16
    target_per_bin: int = 4
    slice_epochs: int = 15
    ad_epochs: int = 15
    gan_network: dict = field(default_factory=dict)
    gan_training: dict = field(default_factory=dict)
    slice_network: dict = field(default_factory=dict)
    slice_training: dict = field(default_factory=dict)

    def __post_init__(self):
        """The four override dicts hold bundle config keys (the networks run at the bundles' defaults)."""
        for name in ("gan_network", "gan_training", "slice_network", "slice_training"):
            given = getattr(self, name)
            if not isinstance(given, dict):
                raise InputError(f"demo: {name} must be a dict of bundle config keys, got {given!r}")

    @property
    def image_size(self) -> list[int]:
        return list(canonical_grid(self.resolution).shape)


@dataclass(frozen=True)
class DemoLayout:
    """Where every step of a demo in ``out`` writes (bundle roots hold ``models/`` and ``eval/``)."""

    out: Path

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))

    cohort = property(lambda self: self.out / "cohort")
    ad_cohort = property(lambda self: self.out / "ad_cohort")
    gan = property(lambda self: self.out / "gan")
    synthetic_datalist = property(lambda self: self.gan / "eval" / "synthetic" / "datalist.json")
    region_maps = property(lambda self: self.gan / "eval" / "region_maps")
    gan_test_output = property(lambda self: self.gan / "test_reconstructions")
    slice_real = property(lambda self: self.out / "slice_real")
    slice_synthetic = property(lambda self: self.out / "slice_synthetic")
    slice_ad = property(lambda self: self.out / "slice_ad")
    ixi = property(lambda self: self.out / "ixi")
    ixi_predictions = property(lambda self: self.ixi / "predictions")
    logs = property(lambda self: self.out / "logs")
    steps_file = property(lambda self: self.out / "steps.json")
    report = property(lambda self: self.out / "report.md")
    figures = property(lambda self: self.out / "figures")


def cli_value(value) -> str:
    """A config value as ``monai.bundle run`` (python-fire) parses it back: Python literals, bare strings."""
    if isinstance(value, (bool, int, float, list, tuple, dict)) or value is None:
        return repr(value)
    return str(value)


def bundle_run(configs: list[Path], **overrides) -> list[str]:
    """``python -m monai.bundle run`` of ``configs`` (layered in order) with ``--key value`` overrides.

    Keys may contain ``#`` (nested config ids); pass them through a dict: ``bundle_run(c, **{"a#b": 1})``.
    """
    files = str(configs[0]) if len(configs) == 1 else json.dumps([str(c) for c in configs])
    argv = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files]
    for key, value in overrides.items():
        argv += [f"--{key}", cli_value(value)]
    return argv


def report_argv(out: Path) -> list[str]:
    """The command that (re)writes the report of the demo in ``out``."""
    return [sys.executable, "-m", "workflows", "demo-report", "--out", str(out)]


def demo_steps(out: Path, settings: DemoSettings, ixi_datalist: Path | None) -> list[Step]:
    """The demo as a list of commands; ``ixi_datalist`` None skips the real-scan steps."""
    at = DemoLayout(out)
    py = [sys.executable, "-m", "data_prep"]
    s = settings
    gan = {"image_size": s.image_size, **s.gan_network}
    slice_net = {"image_size": s.image_size, **s.slice_network}
    slice_train = {**slice_net, **s.slice_training, "seed": s.seed, "train#trainer#max_epochs": s.slice_epochs}
    ad_train = {**slice_net, **s.slice_training, "seed": s.seed, "train#trainer#max_epochs": s.ad_epochs}
    gan_train_configs = [GAN_CONFIGS / "train.json"]
    gan_infer_configs = [GAN_CONFIGS / "inference.json"]
    slice_train_configs = [SLICE_CONFIGS / "train.json"]
    slice_eval_configs = slice_train_configs + [SLICE_CONFIGS / "evaluate.json"]
    ad_train_configs = slice_train_configs + [SLICE_CONFIGS / "train_ad.json"]
    ad_eval_configs = ad_train_configs + [SLICE_CONFIGS / "evaluate.json", SLICE_CONFIGS / "evaluate_ad.json"]
    synthetic = {"datalist_file": at.synthetic_datalist}

    def slice_steps(tag: str, root: Path, data: dict) -> list[Step]:
        args = {"bundle_root": root, **data}
        return [
            Step(f"train_slice_{tag}", bundle_run(slice_train_configs, **args, **slice_train), str(root / "models")),
            Step(f"evaluate_slice_{tag}", bundle_run(slice_eval_configs, **args, **slice_train), str(root / "eval")),
        ]

    steps = [
        Step("simulate_cohort",
             py + ["simulate-cohort", "--n", str(s.n_subjects), "--out", str(at.cohort),
                   "--resolution", str(s.resolution), "--seed", str(s.seed)],
             str(at.cohort)),
        Step("simulate_ad_cohort",
             py + ["simulate-cohort", "--n", str(s.n_ad_subjects), "--out", str(at.ad_cohort),
                   "--resolution", str(s.resolution), "--seed", str(s.seed + 1), "--ad_fraction", str(AD_FRACTION),
                   "--age_min", str(AD_MIN_AGE)],  # controls as old as the youngest AD
             str(at.ad_cohort)),
        Step("train_gan",
             bundle_run(gan_train_configs, bundle_root=at.gan, dataset_dir=at.cohort,
                        **{**gan, **DEMO_GAN, **s.gan_training, "seed": s.seed,
                           "train#trainer#max_epochs": s.gan_epochs}),
             str(at.gan)),
        Step("generate_synthetic",
             bundle_run(gan_infer_configs + [GAN_CONFIGS / "generate.json"], bundle_root=at.gan, dataset_dir=at.cohort,
                        **{**gan, "seed": s.seed, "synthesis#target_per_bin": s.target_per_bin}),
             f"{at.synthetic_datalist.parent} and {at.region_maps}"),
        Step("reconstruct_test_gan",
             bundle_run(gan_infer_configs, bundle_root=at.gan, dataset_dir=at.cohort, output_dir=at.gan_test_output,
                        **gan),
             str(at.gan_test_output / "reconstructions")),
        *slice_steps("real", at.slice_real, {"dataset_dir": at.cohort}),
        *slice_steps("synthetic", at.slice_synthetic, synthetic),
        Step("train_ad",
             bundle_run(ad_train_configs, bundle_root=at.slice_ad, dataset_dir=at.ad_cohort, **ad_train,
                        init_weights=at.slice_real / "models" / "model.pt"),
             str(at.slice_ad / "models")),
        Step("evaluate_ad",
             bundle_run(ad_eval_configs, bundle_root=at.slice_ad, dataset_dir=at.ad_cohort, **ad_train),
             str(at.slice_ad / "eval")),
    ]
    if ixi_datalist is not None:
        steps += [
            Step("preprocess_ixi",
                 py + ["preprocess", "--datalist", str(ixi_datalist), "--out_dir", str(at.ixi),
                       "--resolution", str(s.resolution)],
                 str(at.ixi)),
            Step("predict_ixi",
                 bundle_run([SLICE_CONFIGS / "inference.json"], bundle_root=at.slice_real,
                            datalist_file=at.ixi / "datalist.json", data_split="test", output_dir=at.ixi_predictions,
                            **slice_net),
                 str(at.ixi_predictions)),
        ]
    steps.append(Step("write_report", report_argv(out), f"{at.report} and {at.report.with_suffix('.html')}"))
    return [Step(f"{i:02d}_{step.name}", step.argv, step.outputs) for i, step in enumerate(steps, start=1)]


def children_cpu_seconds() -> float:
    """User + system CPU time of the finished child processes (all cores): less sensitive to other load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def write_steps_record(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"repository": str(REPO), "steps": records}, indent=1) + "\n")


def run_demo(out: str = "runs/demo", n_subjects: int = DemoSettings.n_subjects,
             n_ad_subjects: int = DemoSettings.n_ad_subjects, resolution: float = DemoSettings.resolution,
             seed: int = DemoSettings.seed, gan_epochs: int = DemoSettings.gan_epochs,
             target_per_bin: int = DemoSettings.target_per_bin, slice_epochs: int = DemoSettings.slice_epochs,
             ad_epochs: int = DemoSettings.ad_epochs, gan_network: dict | None = None, gan_training: dict | None = None,
             slice_network: dict | None = None, slice_training: dict | None = None,
             ixi_sample: str = str(IXI_SAMPLE), skip_ixi: bool = False):
    """The main job end to end on simulated data, then the real IXI sample; writes <out>/report.md and .html.

    Args:
        out: folder for everything the demo writes.
        n_subjects: size of the healthy simulated cohort (70% training, 15% validation, 15% test).
        n_ad_subjects: size of the age-matched AD cohort (half AD, all aged 55 or older) for the AD-detection
            variant (400: 60 test subjects, enough for an AUC interval narrower than the gap to chance).
        resolution: canonical grid resolution in mm (4 mm -> 48^3 keeps the demo short).
        seed: seed of every random choice (the AD cohort uses seed + 1).
        gan_epochs: TGB-GAN training epochs.
        target_per_bin: synthesis tops every integer-age bin holding 2 or more subjects up to this many.
        slice_epochs: epochs of each brain-age slice-network training (real only; real + synthetic).
        ad_epochs: epochs of the AD-detection training.
        gan_network, gan_training, slice_network, slice_training: bundle config overrides (``{"key#sub":
            value}``) over the bundles' defaults: *_network keys shape a network (every config that builds
            it gets them), *_training keys exist in the training config only.
        ixi_sample: folder of raw IXI scans with a participants.tsv; its steps are skipped if it is missing.
        skip_ixi: skip the IXI preprocessing and prediction steps.
    """
    out = Path(out).resolve()
    try:
        skip_ixi = as_bool(skip_ixi, "skip_ixi")
    except ValueError as err:
        raise InputError(f"demo: {err}") from None
    settings = DemoSettings(
        n_subjects=int(n_subjects), n_ad_subjects=int(n_ad_subjects), resolution=float(resolution), seed=int(seed),
        gan_epochs=int(gan_epochs), target_per_bin=int(target_per_bin), slice_epochs=int(slice_epochs),
        ad_epochs=int(ad_epochs),
        gan_network=gan_network or {}, gan_training=gan_training or {}, slice_network=slice_network or {},
        slice_training=slice_training or {},
    )
    sample = Path(ixi_sample)
    ixi_datalist = None
    if skip_ixi:
        print("note: skip_ixi set; skipping the real-scan steps")
    elif not sample.is_dir():
        print(f"note: no IXI sample at {sample}; skipping the real-scan steps")
    else:
        ixi_datalist = ixi_sample_datalist(sample, out / "ixi_raw_datalist.json")
    at = DemoLayout(out)
    steps = demo_steps(out, settings, ixi_datalist)
    records = []
    started = time.perf_counter()
    for number, step in enumerate(steps, start=1):
        print(f"\n[{number}/{len(steps)}] {step.name}", flush=True)
        record = {"name": step.name, "command": step.command, "outputs": step.outputs,
                  "log": str(at.logs / f"{step.name}.log")}
        cpu_before = children_cpu_seconds()
        try:
            record["seconds"] = round(run_step(step, at.logs), 1)
        except StepFailed as err:
            write_steps_record(at.steps_file, records + [{**record, "failed": True}])
            print(f"\ndemo stopped: {err}", file=sys.stderr)
            sys.exit(1)
        record["cpu_seconds"] = round(children_cpu_seconds() - cpu_before, 1)
        records.append(record)
        write_steps_record(at.steps_file, records)
    total = time.perf_counter() - started
    print("\nDemo done (wall time; CPU time of all cores):",
          *(f"  {r['name']}: {r['seconds']:.1f} s; CPU {r['cpu_seconds']:.1f} s" for r in records),
          f"  total: {total:.1f} s; CPU {sum(r['cpu_seconds'] for r in records):.1f} s", sep="\n")
    print(f"\nReport: {at.report} (and {at.report.with_suffix('.html')}, which opens in a browser)")
