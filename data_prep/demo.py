"""``make demo``: the main job on the embedded default data, as a list of re-runnable shell steps.

Each step is a command line of this project's own CLIs; its output streams to the console and to
``<out>/logs/<step>.log``. A failing step stops the demo, naming the command and the log.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .datalist import write_datalist

IXI_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi_sample"


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
    """Run one step, tee its output to the console and a log file; return seconds taken."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{step.name}.log"
    print(f"\n=== {step.name}\n$ {step.command}", flush=True)
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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


def demo_steps(out: Path, n_subjects: int, resolution: float, seed: int, ixi_datalist: Path | None) -> list[Step]:
    py = [sys.executable, "-m", "data_prep"]
    cohort = out / "cohort"
    steps = [
        Step("01_simulate_cohort",
             py + ["simulate-cohort", "--n", str(n_subjects), "--out", str(cohort),
                   "--resolution", str(resolution), "--seed", str(seed)],
             str(cohort)),
    ]
    if ixi_datalist is not None:
        steps.append(Step("02_preprocess_ixi",
                          py + ["preprocess", "--datalist", str(ixi_datalist), "--out_dir", str(out / "ixi"),
                                "--resolution", str(resolution)],
                          str(out / "ixi")))
    return steps


def run_demo(out: str = "runs/demo", n_subjects: int = 200, resolution: float = 4.0, seed: int = 0,
             ixi_sample: str = str(IXI_SAMPLE)):
    """Simulate the default cohort and preprocess the real IXI sample; print what runs next.

    Args:
        out: folder for everything the demo writes.
        n_subjects: size of the simulated cohort.
        resolution: canonical grid resolution in mm (4 mm keeps the demo short).
        seed: seed of every random choice.
        ixi_sample: folder of raw IXI scans with a participants.tsv; skipped if missing.
    """
    out = Path(out).resolve()
    sample = Path(ixi_sample)
    ixi_datalist = ixi_sample_datalist(sample, out / "ixi_raw_datalist.json") if sample.is_dir() else None
    if ixi_datalist is None:
        print(f"note: no IXI sample at {sample}; skipping the real-scan preprocessing step")
    timings = {}
    try:
        for step in demo_steps(out, n_subjects, resolution, seed, ixi_datalist):
            timings[step.name] = run_step(step, out / "logs")
    except StepFailed as err:
        print(f"\ndemo stopped: {err}", file=sys.stderr)
        sys.exit(1)
    print("\nDemo data ready:", *(f"  {k}: {v:.1f} s" for k, v in timings.items()), sep="\n")
    print(
        f"\nNext: the bundles train on {out / 'cohort' / 'datalist.json'} "
        "(bundles/slice_cnn_brainage and bundles/tgb_gan_augment; see README.md)."
    )
