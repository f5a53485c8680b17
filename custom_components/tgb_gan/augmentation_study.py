"""The TGB-GAN paper's experiment: does adding GAN-synthesised volumes help a downstream age regressor?

Each GAN variant (TGB-GAN, and the same GAN without its age branch) is trained and synthesises with the
tgb_gan_augment bundle's own configs; each downstream model (the paper's 3D regressor, the slice network)
is trained on real only and on real + each variant's synthetic volumes with the slice_cnn_brainage
bundle's configs, for every seed, and scored on the same test split. Every run is an in-process
``monai.bundle.run`` with overrides, in its own folder; a run whose outputs exist is not repeated, so an
interrupted study resumes where it stopped.
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from itertools import combinations
from pathlib import Path

import numpy as np
from monai.bundle import run as run_bundle
from monai.metrics import MultiScaleSSIMMetric
from scipy import stats

from brainage_core.checks import release_output_dirs
from brainage_core.datalist import read_datalist, write_datalist
from brainage_core.options import as_bool
from brainage_core.volumes import atomic_path
from custom_components.common.handlers import write_csv
from custom_components.common.hardware import threads_per_job
from custom_components.common.plots import plot_condition_bars

REAL = "real"


def _test_errors(predictions_csv: Path) -> dict[str, float]:
    """Absolute error per test subject from a BrainAgeReport CSV."""
    with open(predictions_csv, newline="") as handle:
        return {row["subject"]: abs(float(row["predicted_age"]) - float(row["age"])) for row in csv.DictReader(handle)}


def write_training_subset(datalist_file: str | os.PathLike, n_train_real: int, seed: int,
                          path: str | os.PathLike) -> Path:
    """Write a datalist whose training split is ``n_train_real`` subjects drawn (seeded) from
    ``datalist_file``'s; the validation and test splits are kept whole."""
    splits = read_datalist(datalist_file)
    training = splits["training"]
    if not 2 <= n_train_real <= len(training):
        raise ValueError(f"n_train_real must be in [2, {len(training)}] for {datalist_file}, got {n_train_real}")
    keep = np.sort(np.random.default_rng(seed).choice(len(training), size=n_train_real, replace=False))
    return write_datalist(path, {**splits, "training": [training[i] for i in keep]}, source_datalist=str(datalist_file))


def reconstruction_records(gan_root: str | os.PathLike, records: Sequence[dict]) -> list[dict]:
    """``records`` with each image replaced by the GAN's reconstruction of it, where ``inference.json`` with
    that bundle root writes it (``eval/reconstructions/<name>_recon.nii.gz``)."""
    folder = Path(gan_root) / "eval" / "reconstructions"
    return [{**r, "image": str(folder / (Path(r["image"]).name.split(".nii")[0] + "_recon.nii.gz"))} for r in records]


def epochs_for_steps(steps: int, n_train: int, batch_size: int) -> int:
    """Epochs that make at least ``steps`` optimizer steps over ``n_train`` volumes in batches of ``batch_size``
    (the last batch of an epoch may be short)."""
    return math.ceil(steps / math.ceil(n_train / batch_size))


Step = tuple[str, Path, Sequence[Path], Mapping]  # name, the output that marks it done, config files, overrides


def run_steps(steps: Sequence[Step]) -> dict[str, float]:
    """Run bundle steps in order, each an in-process ``monai.bundle.run`` skipped when its output exists;
    return the seconds of those run. For training runs the output is the final checkpoint, written only
    when training ends: a killed run is rerun and resumes from its per-epoch checkpoint (the bundles'
    ``resume``)."""
    seconds = {}
    for name, done, config_files, overrides in steps:
        if done.exists():
            print(f"[study] {name}: done before ({done})", flush=True)
            continue
        print(f"[study] {name} ...", flush=True)
        start = time.perf_counter()
        run_bundle(config_file=[str(c) for c in config_files], **overrides)
        seconds[name] = time.perf_counter() - start
        if not done.exists():
            raise RuntimeError(f"study step {name} finished without writing {done}")
    return seconds


def run_steps_in_worker(steps: Sequence[Step], threads: int, log: Path) -> dict[str, float]:
    """:func:`run_steps` in a worker process of a study that runs jobs side by side: ``threads`` torch threads
    (and for any process a step starts), every output of the steps appended to ``log``. The worker lives on
    for the next job, so it then lets go of the output folders its runs locked."""
    import torch

    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle, _output_to(handle):
        try:
            return run_steps(steps)
        except Exception as error:
            raise RuntimeError(f"{steps[0][0]} ... failed ({type(error).__name__}: {error}); its output: {log}") from None
        finally:
            release_output_dirs()


@contextmanager
def _output_to(handle):
    """Send this process's stdout and stderr, at the file-descriptor level (logging, tqdm, C code), to ``handle``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


class AugmentationStudy:
    """Real vs real + TGB-GAN synthetic vs real + GAN-without-branch synthetic, over seeds and models.

    Args:
        dataset_dir, datalist_file: the real cohort (training split = the small real training set).
        output_dir: where every run's folder and the report (``results.csv``, ``results.md``,
            ``results.png``, ``paired_tests.csv``, ``gan_checks.csv``) go.
        gan_config_dir, downstream_config_dir: the two bundles' ``configs`` folders.
        gan_variants: name -> age-loss weight (0 = the ablation without the task branch).
        gan_overrides: overrides for every GAN training run (epochs, widths, batch size).
        generator_overrides: overrides for every run that loads a trained generator (image size, widths).
        synthesis_overrides: further overrides for every synthesis run (target per bin, max synthetic count).
        downstream_models: name -> ``{"config_files": [...], "overrides": {...}}``: config files layered
            over the slice bundle's train.json (e.g. one that swaps ``network_def``) and overrides.
        models: which of ``downstream_models`` the study trains, in this order (None: all of them).
        downstream_overrides: overrides for every downstream run (learning rate, augmentation).
        downstream_iterations, downstream_batch_size: every downstream training takes this many optimizer
            steps on batches of this size, its epochs set from its training-set size (:meth:`downstream_epochs`).
        seeds: downstream seeds, the same for every condition (the GANs use ``gan_seed``).
        n_train_real: size of the small real training set, drawn from the datalist's training split with
            ``gan_seed`` (None: all of it); the other splits are kept whole.
        qc_pairs: random image pairs for the MS-SSIM diversity measure.
        check_model: the downstream model (a 3D regressor trained on real images) whose first seed's
            weights start the task branch and whose second seed's judge every GAN (``gan_checks``).
        pretrain_branch: start the task branch from the real-only ``check_model`` of the first seed (else
            from scratch, as in the paper).
        jobs: trainings run side by side, each in a worker process with ``cores / jobs`` torch threads and
            its output in ``logs/``. On a 2-core CPU ``jobs=2`` gains 1.3x for 3D regressors (two side by side
            took 414-422 s each, one alone 275 s) and about 2x for slice networks. 1: one after another in
            this process.

    Overrides are nested dicts, ``{"train": {"trainer": {"max_epochs": 5}}}``, applied leaf by leaf
    (``train#trainer#max_epochs``) so the rest of each section stays.
    """

    def __init__(self, dataset_dir: str, datalist_file: str, output_dir: str, gan_config_dir: str,
                 downstream_config_dir: str, gan_variants: Mapping[str, float], gan_overrides: Mapping,
                 generator_overrides: Mapping, synthesis_overrides: Mapping, downstream_models: Mapping[str, Mapping],
                 downstream_overrides: Mapping, downstream_iterations: int, downstream_batch_size: int = 8,
                 seeds: Sequence[int] = (0, 1, 2), gan_seed: int = 0,
                 n_train_real: int | None = None, qc_pairs: int = 20, check_model: str = "regressor3d",
                 pretrain_branch: bool = True, models: Sequence[str] | None = None, jobs: int = 1) -> None:
        if len(seeds) < 2:
            raise ValueError(f"a comparison over seeds needs at least 2 seeds, got {list(seeds)}")
        if models is not None:
            unknown = [name for name in models if name not in downstream_models]
            if unknown or not models:
                raise ValueError(f"models must name some of the downstream models {list(downstream_models)}, "
                                 f"got {list(models)}")
            downstream_models = {name: downstream_models[name] for name in models}
        self.dataset_dir = os.path.abspath(dataset_dir)
        self.output_dir = Path(output_dir).resolve()
        self.datalist_file = str(self._real_datalist(Path(datalist_file), n_train_real, int(gan_seed)))
        self.gan_configs = Path(gan_config_dir).resolve()
        self.downstream_configs = Path(downstream_config_dir).resolve()
        self.gan_variants = dict(gan_variants)
        self.gan_overrides = flatten_overrides(gan_overrides)
        self.generator_overrides = flatten_overrides(generator_overrides)
        self.synthesis_overrides = flatten_overrides(synthesis_overrides)
        self.downstream_files = {name: [Path(f).resolve() for f in spec.get("config_files", [])]
                                 for name, spec in downstream_models.items()}
        self.downstream_models = {name: {**flatten_overrides(spec.get("overrides", {})),
                                         **flatten_overrides(downstream_overrides)}
                                  for name, spec in downstream_models.items()}
        if int(downstream_iterations) < 1 or int(downstream_batch_size) < 1:
            raise ValueError("downstream_iterations and downstream_batch_size must be at least 1, got "
                             f"{downstream_iterations} and {downstream_batch_size}")
        self.downstream_iterations = int(downstream_iterations)
        self.downstream_batch_size = int(downstream_batch_size)
        self.seeds = [int(s) for s in seeds]
        self.gan_seed = int(gan_seed)
        self.qc_pairs = int(qc_pairs)
        if check_model not in self.downstream_models:
            raise ValueError(f"check_model {check_model!r} is not one of the downstream models {list(self.downstream_models)}")
        self.check_model = check_model
        self.pretrain_branch = as_bool(pretrain_branch, "pretrain_branch")
        if int(jobs) < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs = int(jobs)
        self.timings: dict[str, float] = {}

    def _real_datalist(self, datalist_file: Path, n_train_real: int | None, seed: int) -> Path:
        if n_train_real is None:
            return datalist_file.resolve()
        path = self.output_dir / f"real_datalist_{n_train_real}.json"
        if not path.exists():  # a resumed study keeps the subset it started with
            write_training_subset(datalist_file, n_train_real, seed, path)
        return path

    # -- runs ---------------------------------------------------------------------------------------
    def _run(self, name: str, done: Path, config_files: Sequence[Path], overrides: Mapping) -> None:
        """One bundle run in this process, skipped when its output ``done`` exists."""
        self.timings.update(run_steps([(name, done, config_files, overrides)]))

    def _run_jobs(self, jobs: Mapping[str, Sequence[Step]], workers: ProcessPoolExecutor | None) -> None:
        """Run every job (name -> its steps, run in order): side by side in the ``workers`` (``jobs`` worker
        processes, each with its share of the cores as torch threads and its output in ``logs/NAME.log``),
        or one after another in this process, with every core, when there are none or one job is left."""
        todo = {}
        for name, steps in jobs.items():
            if all(done.exists() for _, done, _, _ in steps):
                run_steps(steps)  # reports each step as done before
            else:
                todo[name] = steps
        if workers is None or len(todo) < 2:
            for steps in todo.values():
                self.timings.update(run_steps(steps))
            return
        threads = threads_per_job(self.jobs)
        futures = {workers.submit(run_steps_in_worker, steps, threads, self.output_dir / "logs" / f"{name}.log"): name
                   for name, steps in todo.items()}
        for future in as_completed(futures):
            self.timings.update(future.result())
            print(f"[study] {futures[future]}: finished", flush=True)

    def gan_steps(self, variant: str) -> list[Step]:
        """Train one GAN variant, then synthesise with it (region maps included) into
        :meth:`gan_datalist`. A variant with an age term starts its branch from ``branch_init`` when given,
        else its branch learns age in the warm-up (the study's regressors are trained once, not in every GAN)."""
        root = self.gan_root(variant)
        common = {"bundle_root": str(root), "dataset_dir": self.dataset_dir, "datalist_file": self.datalist_file,
                  "seed": self.gan_seed}
        weight = self.gan_variants[variant]
        branch = ({"branch_init_weights": str(self.branch_init)} if weight > 0 and self.branch_init
                  else {"real_trained_branch": False})
        return [(f"train GAN {variant}", root / "models" / "checkpoint_last.pt", [self.gan_configs / "train.json"],
                 {**common, "loss#age_weight": weight, **branch, **self.gan_overrides}),
                (f"synthesise {variant}", self.gan_datalist(variant),
                 [self.gan_configs / "inference.json", self.gan_configs / "generate.json"],
                 {**common, **self._final_generator(variant), **self.synthesis_overrides})]

    def gan_datalist(self, variant: str) -> Path:
        """The variant's merged real + synthetic datalist."""
        return self.gan_root(variant) / "eval" / "synthetic" / "datalist.json"

    def _final_generator(self, variant: str) -> dict:
        """Overrides that load the generator at the end of GAN training: ``model.pt`` holds the epoch with
        the best reconstruction L1, which the adversarial and age terms trade away a little, so it would
        often be the end of the L1-only warm-up, the same for both variants."""
        return {**self.generator_overrides, "model_file": str(self.gan_root(variant) / "models" / "checkpoint_last.pt")}

    def gan_root(self, variant: str) -> Path:
        return self.output_dir / "gan" / variant

    @property
    def branch_init(self) -> Path | None:
        """The real-only ``check_model`` of the first seed (its ``model.pt``), the task branch's starting
        point; None when ``pretrain_branch`` is off."""
        if not self.pretrain_branch:
            return None
        return self.downstream_root(self.check_model, REAL, self.seeds[0]) / "models" / "model.pt"

    def downstream_root(self, model: str, condition: str, seed: int) -> Path:
        return self.output_dir / "downstream" / model / condition / f"seed{seed}"

    def downstream_steps(self, model: str, condition: str, datalist: Path, seed: int) -> list[Step]:
        """Train and test one downstream model (``eval/test_predictions.csv`` in its folder)."""
        root = self.downstream_root(model, condition, seed)
        common = {"bundle_root": str(root), "dataset_dir": self.dataset_dir, "datalist_file": str(datalist),
                  "seed": seed, **self.downstream_models[model], "batch_size": self.downstream_batch_size,
                  "train#trainer#max_epochs": self.downstream_epochs(datalist)}
        return [(f"train {model} on {condition} (seed {seed})", root / "models" / "checkpoint_last.pt",
                 self._downstream_configs(model), common),
                (f"test {model} on {condition} (seed {seed})", root / "eval" / "test_predictions.csv",
                 self._downstream_configs(model, "evaluate.json"), common)]

    def downstream_epochs(self, datalist: Path) -> int:
        """Epochs that make ``downstream_iterations`` optimizer steps on ``datalist``'s training split. A fixed
        number of steps, not of epochs: a run on real + synthetic volumes would otherwise take more steps than
        its real-only baseline, and a small real set would stop before it has learned (at 50 subjects, 40
        epochs are 280 steps and the validation MAE still falls when the learning rate reaches zero)."""
        return epochs_for_steps(self.downstream_iterations, len(read_datalist(datalist)["training"]),
                                self.downstream_batch_size)

    def test_errors(self, model: str, condition: str, seed: int) -> dict[str, float]:
        return _test_errors(self.downstream_root(model, condition, seed) / "eval" / "test_predictions.csv")

    def _downstream_configs(self, model: str, *extra: str) -> list[Path]:
        return [self.downstream_configs / "train.json", *self.downstream_files[model],
                *(self.downstream_configs / name for name in extra)]

    def _score(self, model: str, judge: Path, name: str, real: list[dict], records: list[dict]) -> Path:
        """Predictions of the trained model in ``judge`` on ``records`` (split ``name``); the real training
        split rides along because train.json sizes the network's output from it."""
        datalist = write_datalist(self.output_dir / "qc" / f"{name}.json", {"training": real, name: records})
        out = self.output_dir / "qc" / f"{model}_{name}"
        self._run(f"QC {model} on {name}", out / f"{name}_predictions.csv",
                  self._downstream_configs(model, "evaluate.json"),
                  {**self.downstream_models[model], "bundle_root": str(judge), "output_dir": str(out),
                   "dataset_dir": self.dataset_dir, "datalist_file": str(datalist), "eval_split": name})
        return out / f"{name}_predictions.csv"

    def reconstructed_test_set(self, variant: str) -> list[dict]:
        """The test split through the variant's generator, G(x_test), with the real subjects' ages."""
        root = self.gan_root(variant)
        records = reconstruction_records(root, read_datalist(self.datalist_file)["test"])
        self._run(f"reconstruct test set with {variant}", Path(records[-1]["image"]), [self.gan_configs / "inference.json"],
                  {"bundle_root": str(root), "dataset_dir": self.dataset_dir, "datalist_file": self.datalist_file,
                   **self._final_generator(variant)})
        return records

    def gan_checks(self, variant: str, datalist: Path, judge_errors: dict[str, float]) -> dict:
        """Does the generator keep age? Scored by a real-only 3D regressor that neither GAN saw (the second
        seed's): its MAE on G(x_test) against on x_test (age retention), its MAE on the synthetic volumes
        against their assigned ages (realism); diversity as mean pairwise MS-SSIM of synthetic against real
        training volumes; the region maps' AUCs against the simulator's ground truth. ``judge_errors``: the
        judge's absolute test errors on real volumes, per subject."""
        model = self.check_model
        judge = self.downstream_root(model, REAL, self.seeds[1])
        real_mae = float(np.mean(list(judge_errors.values())))
        training = read_datalist(datalist)["training"]
        synthetic = [r for r in training if r.get("synthetic")]
        real = [r for r in training if not r.get("synthetic")]
        recon_mae = np.mean(list(_test_errors(self._score(model, judge, f"{variant}_reconstructed_test", real,
                                                          self.reconstructed_test_set(variant))).values()))
        syn_mae = np.mean(list(_test_errors(self._score(model, judge, f"{variant}_synthetic", real,
                                                        synthetic)).values())) if synthetic else float("nan")
        maps = json.loads((self.gan_root(variant) / "eval" / "region_maps" / "region_maps.json").read_text())
        rng = np.random.default_rng(self.gan_seed)
        return {"variant": variant, "n_synthetic": len(synthetic), "regressor": model,
                "mae_real_test": real_mae, "mae_reconstructed_test": float(recon_mae),
                "retention_ratio": float(recon_mae / real_mae), "mae_synthetic": float(syn_mae),
                "realism_ratio": float(syn_mae / real_mae),
                "ms_ssim_synthetic": mean_pairwise_ms_ssim([r["image"] for r in synthetic], self.qc_pairs, rng),
                "ms_ssim_real": mean_pairwise_ms_ssim([r["image"] for r in real], self.qc_pairs, rng),
                **{key: maps.get(key) for key in ("auc_group_means", "auc_traversal", "auc_real_group_means")}}

    # -- the study ----------------------------------------------------------------------------------
    def run(self) -> Path:
        """Run (or resume) every step and write the report; return the markdown report's path.

        Real-only models come first: the first seed's 3D regressor is the task branch's starting point and
        the second seed's judges every GAN. The GANs' checks run before the augmented trainings, the
        longest part."""
        conditions = {REAL: Path(self.datalist_file), **{v: self.gan_datalist(v) for v in self.gan_variants}}

        def trainings(condition_names: Sequence[str]) -> dict[str, list[Step]]:
            return {f"{model}_{c}_seed{seed}": self.downstream_steps(model, c, conditions[c], seed)
                    for c in condition_names for model in self.downstream_models for seed in self.seeds}

        # one set of worker processes for the whole study: each starts (imports torch and MONAI) once
        with (ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn")) if self.jobs > 1
              else nullcontext()) as workers:
            self._run_jobs(trainings([REAL]), workers)
            self._run_jobs({f"gan_{variant}": self.gan_steps(variant) for variant in self.gan_variants}, workers)
            judge_errors = self.test_errors(self.check_model, REAL, self.seeds[1])
            checks = [self.gan_checks(v, conditions[v], judge_errors) for v in self.gan_variants]
            self._run_jobs(trainings(list(self.gan_variants)), workers)
        errors = {(m, c, s): self.test_errors(m, c, s) for m in self.downstream_models for c in conditions
                  for s in self.seeds}  # (model, condition, seed) -> {subject: absolute error}
        n_train = {c: len(read_datalist(d)["training"]) for c, d in conditions.items()}
        return self.write_report(n_train, errors, checks)

    def write_report(self, n_train: dict[str, int], errors: dict, checks: list[dict]) -> Path:
        rows, tests = summarise(errors, list(self.downstream_models), n_train, self.seeds)
        out = self.output_dir
        write_csv(out / "results.csv", rows)
        write_csv(out / "paired_tests.csv", tests)
        write_csv(out / "gan_checks.csv", checks)
        plot_condition_bars(rows, out / "results.png")
        lines = ["# TGB-GAN augmentation study", "",
                 f"Real cohort: `{self.datalist_file}`; seeds {self.seeds}; test MAE in years (mean ± SD over seeds).",
                 "", "| model | training data | n train | test MAE | per seed |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['condition']} | {r['n_train']} | {r['mae_mean']:.2f} ± {r['mae_std']:.2f} | "
                  f"{r['mae_per_seed']} |" for r in rows]
        lines += ["", "Paired tests: Wilcoxon signed-rank over test subjects (absolute error averaged over seeds) "
                  "and paired t-test over seeds (per-seed MAE).", "",
                  "| model | A | B | MAE A − B | Wilcoxon p | t-test p |", "|---|---|---|---|---|---|"]
        lines += [f"| {t['model']} | {t['a']} | {t['b']} | {t['mae_difference']:+.2f} | {t['wilcoxon_p']:.3g} | "
                  f"{t['paired_t_p']:.3g} |" for t in tests]
        lines += ["", f"Does each generator keep age? Judged by the real-only {self.check_model} of seed "
                  f"{self.seeds[1]} (neither GAN saw it): its test MAE on real test volumes x, on their "
                  "reconstructions G(x) (retention, target <= 1.15x) and on the synthetic volumes against their "
                  "assigned ages (realism, target <= 1.3x); diversity as mean pairwise MS-SSIM (lower = more "
                  "diverse); ROC AUC of the age-region maps against the simulator's ground truth, beside the "
                  "real-image group-mean map computed in the same run.", "",
                  "| GAN | n synthetic | MAE x | MAE G(x) | retention | MAE synthetic | realism | MS-SSIM syn / real "
                  "| AUC group means | AUC traversal | AUC real-image baseline |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['variant']} | {c['n_synthetic']} | {c['mae_real_test']:.2f} | {c['mae_reconstructed_test']:.2f} "
                  f"| {c['retention_ratio']:.2f}x | {c['mae_synthetic']:.2f} | {c['realism_ratio']:.2f}x | "
                  f"{c['ms_ssim_synthetic']:.3f} / {c['ms_ssim_real']:.3f} | {_f3(c['auc_group_means'])} | "
                  f"{_f3(c['auc_traversal'])} | {_f3(c['auc_real_group_means'])} |" for c in checks]
        if self.timings:
            lines += ["", "Step times this run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items())]
        lines += ["", "![test MAE by training data](results.png)", ""]
        report = out / "results.md"
        with atomic_path(report) as tmp:
            Path(tmp).write_text("\n".join(lines))
        print(f"[study] report: {report}")
        return report


def _f3(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def flatten_overrides(overrides: Mapping, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a#b": 1}`` (bundle override ids)."""
    flat = {}
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_overrides(value, f"{name}#"))
        else:
            flat[name] = value
    return flat


def summarise(errors: dict, models: list[str], n_train: dict[str, int], seeds: list[int]) -> tuple[list, list]:
    """Per (model, condition): MAE mean/SD over seeds; per model and pair of conditions: paired tests.
    ``n_train``: training-set size of each condition, in report order."""
    conditions = list(n_train)
    rows, tests = [], []
    for model in models:
        per_seed = {c: [float(np.mean(list(errors[model, c, s].values()))) for s in seeds] for c in conditions}
        for c in conditions:
            rows.append({"model": model, "condition": c, "n_train": n_train[c], "mae_mean": float(np.mean(per_seed[c])),
                         "mae_std": float(np.std(per_seed[c], ddof=1)),
                         "mae_per_seed": " ".join(f"{m:.2f}" for m in per_seed[c])})
        subjects = sorted(errors[model, conditions[0], seeds[0]])
        mean_error = {c: np.array([np.mean([errors[model, c, s][subj] for s in seeds]) for subj in subjects])
                      for c in conditions}
        for a, b in combinations(conditions, 2):
            tests.append({"model": model, "a": a, "b": b,
                          "mae_difference": float(np.mean(per_seed[a]) - np.mean(per_seed[b])),
                          "wilcoxon_p": float(stats.wilcoxon(mean_error[a], mean_error[b]).pvalue),
                          "paired_t_p": float(stats.ttest_rel(per_seed[a], per_seed[b]).pvalue)})
    return rows, tests


def mean_pairwise_ms_ssim(images: Sequence[str], pairs: int, rng: np.random.Generator) -> float:
    """Mean MS-SSIM over ``pairs`` random distinct pairs: a 7-voxel window and up to 3 scales, as many as
    the volume size allows (MS-SSIM needs size > 6 * 2^(scales - 1): 3 scales at 48^3, 2 at 16^3)."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, ScaleIntensity

    if len(images) < 2:
        return float("nan")
    load = Compose([LoadImage(image_only=True), EnsureChannelFirst(), ScaleIntensity(0.0, 1.0)])
    chosen = [rng.choice(len(images), size=2, replace=False) for _ in range(pairs)]
    volumes = {i: load(images[i])[None].float() for i in {int(k) for pair in chosen for k in pair}}
    size = min(next(iter(volumes.values())).shape[2:])
    scales = max(1, min(3, int(np.log2((size - 1) / 6)) + 1))
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=7, weights=(1 / scales,) * scales)
    scores = [metric(volumes[int(i)], volumes[int(j)]).item() for i, j in chosen]
    return float(np.mean(scores))

