"""The slice network's evidence: what its default recipe reaches, over seeds, against simple baselines on
the same splits, and how it carries over to data it was not trained on.

Every run is the bundle itself (``python -m monai.bundle run`` of train.json, then evaluate.json, with
command-line overrides only), one bundle root per run under ``--out``. A run whose test metrics exist is
not repeated, and a killed training resumes, so the script can be stopped and restarted at any time.

Parts (``--parts``, default all):

- ``default``: the default config on a 400-subject 4 mm cohort (seed 0), ``--seeds`` training seeds:
  test MAE mean +/- SD against ridge on voxels and the constant predictor (fitted here on the same
  split), training time, and the learning curves (train loss, val MAE, val r per epoch) as a figure;
- ``small``: the same with only the first ``--n_small`` training subjects, ridge on the same subjects;
- ``variants``: aggregation (mean, max, attention, transformer) x position embedding x slice axis, one
  seed each, then the best four with two more seeds; sfcn2d against ResNet-18 (random init: ImageNet
  weights cannot be downloaded here); ``--variant_epochs`` each (the default schedule, shorter: 33 runs).
  Its own page, ``variants.md`` in ``--docs``, made from ``variants.json`` beside it: every finished run
  is added to that file at once, and a run it holds is not repeated, so the 33 runs may spread over
  several sessions and checkouts (commit the file);
- ``ad``: the AD detector on a 400-subject cohort with 30 % AD (AD subjects 55 or older, controls of any
  age): test AUC with its bootstrap 95 % interval, from scratch (``--ad_seeds``) and, unless
  ``--ad_from_brain_age false``, started from the first default brain-age model (first seed), against
  logistic regression on voxels, the subject's age alone and the mean intensity of the simulator's
  medial-temporal AD region;
- ``ad_matched``: the same on an age-matched cohort (half AD, everyone 55 or older: the demo's design),
  where age explains nothing;
- ``ablation``: the default config without precise batch-norm statistics, with them from 8 augmented batches
  (the default before 0.4.0) and/or without weight averaging (``--ablations``; first seed), learning curves
  and test MAE beside the default's;
- ``transfer``: each default model on cohorts simulated with other settings (``TRANSFER_COHORTS``: other
  seed and sites, each site with its own mix of ageing effects; and the same with another overall mix)
  and, when present, on the ten real IXI heads of ``--ixi_dir`` preprocessed at 4 mm, beside ridge;
- ``cues``: each default model on cohorts where one ageing effect alone ages the brain (``CUE_COHORTS``),
  beside ridge: which of the simulator's effects the models read;
- ``perturbations``: each default model on the test split with its volumes changed the way scanners and
  pipelines differ (``PERTURBATIONS``: smoothed, sharpened, brain mask one voxel smaller), beside ridge: a
  model whose mean gap moves by years when the image gets a little sharper reads texture as age, and
  lands real scans at a seed-dependent offset.

Writes ``<out>/results.json``, and ``evidence.md`` plus ``figures/learning_curves.png`` into ``--docs``
(the slice bundle's docs). Run: ``python benchmarks/slice_evidence.py --out runs/evidence``.

``--jobs N`` trains up to N independent runs of a part side by side, each with 1/N of the CPU's cores as
torch threads. On a 2-core CPU a training keeps about 1.35 cores busy (its data pipeline runs between
steps in the same process), so two 1-thread trainings side by side each take about as long as one
2-thread training alone: twice the throughput.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from brainage_core.datalist import read_datalist, write_datalist
from brainage_core.options import as_bool
from brainage_core.volumes import atomic_path
from custom_components.common.hardware import threads_per_job
from custom_components.slice_cnn.baselines import ad_baseline, age_baselines, region_mean_auc
from data_prep.simulate import AD_MIN_AGE
from workflows.demo import bundle_run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "slice_cnn_brainage" / "configs"
TRAIN, EVALUATE = CONFIGS / "train.json", CONFIGS / "evaluate.json"
TRAIN_AD, EVALUATE_AD = CONFIGS / "train_ad.json", CONFIGS / "evaluate_ad.json"
PARTS = ("default", "small", "variants", "ad", "ad_matched", "transfer", "ablation", "cues", "perturbations")
ABLATIONS = {"no_precise_bn": ("no precise batch norm (running statistics)", {"precise_bn_batches": 0}),
             "augmented_precise_bn": ("precise batch norm from 8 shuffled augmented batches (the default before 0.4.0)",
                                      {"precise_bn_augmented": True, "precise_bn_batches": 8}),
             "no_weight_averaging": ("no weight averaging", {"ema_epochs": 0})}
AGGREGATIONS = ("mean", "max", "attention", "transformer")
AXES = ("sagittal", "coronal", "axial")
BEST_ROWS = 4  # variant rows run with every seed
COHORT = {"n": 400, "resolution": 4, "seed": 0}
AD_COHORTS = {  # part: (cohort folder, simulate-cohort settings, title)
    "ad": ("ad400", {"n": 400, "resolution": 4, "seed": 1, "ad_fraction": 0.3},
           "cohort with 30 % AD (AD subjects 55 or older, controls 20-90: not age-matched)"),
    "ad_matched": ("ad400_matched", {"n": 400, "resolution": 4, "seed": 1, "ad_fraction": 0.5, "age_min": AD_MIN_AGE},
                   "age-matched cohort: half AD, everyone 55 or older (the demo's design)"),
}
OTHER_SITES = {"n": 150, "resolution": 4, "seed": 7, "n_sites": 5, "site_effect_sd": 0.3}
TRANSFER_COHORTS = {
    "other_sites": (OTHER_SITES, "other seed, 5 sites whose ageing-effect mix varies with SD 0.3 (log)"),
    "shifted": ({**OTHER_SITES, "ventricle_scale": 1.3, "atrophy_scale": 0.7, "contrast_scale": 1.5, "lesion_scale": 0.5},
                "the same with another overall mix: ventricles x1.3, atrophy x0.7, contrast x1.5, lesions x0.5"),
}

EFFECTS = ("ventricle", "atrophy", "contrast", "lesion")  # the simulator's ageing effects (simulate-cohort --*_scale)
CUE_COHORTS = {effect: {"n": 90, "resolution": 4, "seed": 11, **{f"{e}_scale": float(e == effect) for e in EFFECTS}}
               for effect in EFFECTS}


def _inside_brain(image: np.ndarray, changed: np.ndarray) -> np.ndarray:
    return np.where(image > 0, changed, 0.0)


PERTURBATIONS = {  # name: (label, function of one skull-stripped volume)
    "none": ("test split as it is", lambda v: v),
    "blur0.5": ("smoothed inside the brain (Gaussian, sigma 0.5 voxel = 2 mm)",
                lambda v: _inside_brain(v, ndi.gaussian_filter(v, 0.5))),
    "blur1": ("smoothed inside the brain (sigma 1 voxel)", lambda v: _inside_brain(v, ndi.gaussian_filter(v, 1.0))),
    "sharpened": ("sharpened inside the brain (v + (v - Gaussian sigma 1 voxel of v))",
                  lambda v: _inside_brain(v, 2.0 * v - ndi.gaussian_filter(v, 1.0))),
    "eroded": ("brain mask one voxel smaller (binary erosion)", lambda v: np.where(ndi.binary_erosion(v > 0), v, 0.0)),
}


# ------------------------------------------------------------------------------------------- running


JOBS = 1  # --jobs: runs of a part trained side by side


def in_parallel(function, items: list) -> list:
    """``function(*item)`` for every item, ``JOBS`` at a time (threads: each runs a subprocess)."""
    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        return list(pool.map(lambda item: function(*item), items))


def run(argv: list[str], log: Path) -> dict:
    """Run a command from the repository root, output to ``log``; return its wall and CPU (user + system,
    all cores) seconds. CPU time hardly depends on other load on the machine; wall time does. With
    ``JOBS`` > 1 the command gets 1/JOBS of the cores as torch threads."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if JOBS > 1:
        threads = str(threads_per_job(JOBS))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    start = time.perf_counter()
    with open(log, "a") as handle:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU time, whatever else runs
    process.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"command failed (exit {code}), see {log}: {' '.join(map(str, argv))}")
    return {"seconds": time.perf_counter() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime}


def cohort(out: Path, name: str, settings: dict) -> Path:
    """Simulate a cohort once; return its datalist."""
    folder = out / "data" / name
    if not (folder / "datalist.json").is_file():
        flags = [f"--{key}={value}" for key, value in settings.items()]
        run([sys.executable, "-m", "data_prep", "simulate-cohort", "--out", str(folder), "--progress=False", *flags],
            out / "logs" / f"simulate_{name}.log")
    return folder / "datalist.json"


def all_as_test(datalist: Path, out: Path) -> Path:
    """A datalist holding every subject of ``datalist`` in its test split (to score a foreign cohort)."""
    if not out.is_file():
        splits = read_datalist(datalist)
        write_datalist(out, {"test": [rec for records in splits.values() for rec in records]})
    return out


EXTRA_OVERRIDES: dict = {}  # --overrides: applied to every bundle run (e.g. tiny networks for a smoke test)


def train_and_test(root: Path, datalist: Path, overrides: dict, ad: bool = False) -> dict:
    """Train (unless done) and evaluate on the test split; return test metrics, time and learning curve."""
    train_configs = [TRAIN, TRAIN_AD] if ad else [TRAIN]
    eval_configs = train_configs + ([EVALUATE, EVALUATE_AD] if ad else [EVALUATE])
    metrics_file = root / "eval" / ("test_detection_metrics.json" if ad else "test_metrics.json")
    timing_file = root / "train_seconds.json"
    args = {"bundle_root": root, "datalist_file": datalist, **EXTRA_OVERRIDES, **overrides}
    if not timing_file.is_file():
        timing_file.write_text(json.dumps(run(bundle_run(train_configs, **args), root / "train.log")))
    if not metrics_file.is_file():
        run(bundle_run(eval_configs, **args), root / "evaluate.log")
    curve = pd.read_csv(root / "eval" / "learning_curve.csv")
    timing = json.loads(timing_file.read_text())
    result = {**json.loads(metrics_file.read_text()), "train_seconds": timing["seconds"],
              "train_cpu_seconds": timing.get("cpu_seconds", float("nan")), "curve": curve.to_dict(orient="list")}
    if not ad:
        result["last_validation"] = calibration_check(root / "eval" / "val_predictions.csv")
    return result


def calibration_check(predictions_csv: Path) -> dict:
    """MAE of the last validation against the MAE after refitting a linear calibration (age on predicted
    age) on those same predictions: equal when the output's offset and scale are right."""
    table = pd.read_csv(predictions_csv)
    age, predicted = table.age.to_numpy(float), table.predicted_age.to_numpy(float)
    slope, intercept = np.polyfit(predicted, age, 1)
    return {"mae": float(np.abs(predicted - age).mean()),
            "calibrated_mae": float(np.abs(slope * predicted + intercept - age).mean())}


def perturbed_test_split(datalist: Path, name: str, folder: Path) -> Path:
    """The test split of ``datalist`` with every volume changed by ``PERTURBATIONS[name]``, written once
    under ``folder`` (float32 NIfTI, the same affine), as a datalist of its own."""
    out = folder.parent / f"{folder.name}.json"  # not with_suffix: the name "blur0.5" has a dot
    if not out.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for record in read_datalist(datalist)["test"]:
            image = nib.load(record["image"])
            changed = PERTURBATIONS[name][1](image.get_fdata(dtype=np.float32)).astype(np.float32)
            path = folder / Path(record["image"]).name
            nib.save(nib.Nifti1Image(changed, image.affine), path)
            records.append({**record, "image": str(path)})
        write_datalist(out, {"test": records})
    return out


def score_on(root: Path, datalist: Path, name: str) -> dict:
    """Brain-age metrics of the trained model in ``root`` on every subject of ``datalist``."""
    output = root / f"eval_{name}"
    if not (output / "test_metrics.json").is_file():
        run(bundle_run([TRAIN, EVALUATE], bundle_root=root, datalist_file=datalist, output_dir=output,
                       **EXTRA_OVERRIDES), root / f"evaluate_{name}.log")
    return json.loads((output / "test_metrics.json").read_text())


# --------------------------------------------------------------------------------------------- parts


def part_default(out: Path, seeds: list[int], datalist: Path, tag: str = "default") -> dict:
    measured = in_parallel(train_and_test, [(out / tag / f"seed{seed}", datalist, {"seed": seed}) for seed in seeds])
    runs = dict(zip(seeds, measured))
    splits = read_datalist(datalist)
    return {"runs": runs, "baselines": age_baselines(splits["training"], splits["validation"], splits["test"])}


def part_small(out: Path, seeds: list[int], datalist: Path, n_small: int) -> dict:
    splits = read_datalist(datalist)
    small = out / "data" / f"first{n_small}.json"
    if not small.is_file():
        write_datalist(small, {**splits, "training": splits["training"][:n_small]})
    return part_default(out, seeds, small, tag=f"train{n_small}")


def variant_grid(epochs: int) -> dict:
    """Run name -> overrides of the variant table's rows (seed apart): every aggregation x position
    embedding x slice axis with the sfcn2d encoder, and the ResNet-18 encoder at the default's settings."""
    rows = {f"{aggregation}_{'pe' if position else 'nope'}_{axis}": {
        "network_def#aggregation": aggregation, "network_def#position_embedding": position,
        "network_def#slice_axis": axis, "train#trainer#max_epochs": epochs}
        for aggregation, position, axis in itertools.product(AGGREGATIONS, (False, True), AXES)}
    return {**rows, "resnet18": {"network_def#encoder": "resnet18", "train#trainer#max_epochs": epochs}}


def part_variants(out: Path, seeds: list[int], datalist: Path, epochs: int, store: Path) -> dict:
    """The variant table: every row with ``seeds[0]`` (the ResNet-18 row too), then the best ``BEST_ROWS`` sfcn2d rows
    with the other seeds. Each finished run goes into ``store`` at once; a run already there is reused."""
    part = json.loads(store.read_text()) if store.is_file() else {"epochs": epochs, "rows": {}}
    if part["epochs"] != epochs:
        raise SystemExit(f"{store} holds runs of {part['epochs']} epochs, not --variant_epochs {epochs}: "
                         "move it away to start a new table")
    grid, lock = variant_grid(epochs), threading.Lock()

    def measure(name: str, seed: int) -> None:
        if str(seed) in part["rows"].get(name, {}).get("runs", {}):
            return
        folder = out / "variants" / (name if seed == seeds[0] else f"{name}_seed{seed}")
        result = train_and_test(folder, datalist, {**grid[name], "seed": seed})
        with lock:
            row = part["rows"].setdefault(name, {"overrides": grid[name], "runs": {}})
            row["runs"][str(seed)] = {**result, "jobs": JOBS, "cpu": cpu_features()}
            store.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(store) as tmp:
                tmp.write_text(json.dumps(part, indent=1, default=str) + "\n")

    sfcn = [name for name in grid if name != "resnet18"]
    with ThreadPoolExecutor(max_workers=JOBS) as pool:  # the slowest run first, beside the rest
        resnet = pool.submit(measure, "resnet18", seeds[0])
        list(pool.map(measure, sfcn, [seeds[0]] * len(sfcn)))
        part["best"] = sorted(sfcn, key=lambda name: part["rows"][name]["runs"][str(seeds[0])]["mae"])[:BEST_ROWS]
        list(pool.map(lambda item: measure(*item), itertools.product(part["best"], seeds[1:])))
        resnet.result()
    return part


def part_ablation(out: Path, seed: int, datalist: Path, names: list[str]) -> dict:
    """The default config without some of its stabilisers (``names`` of ABLATIONS), one seed (the default
    run of the same seed is the reference)."""
    return {"seed": seed, "runs": {name: train_and_test(out / "ablation" / name, datalist,
                                                        {"seed": seed, **ABLATIONS[name][1]}) for name in names}}


def part_ad(out: Path, part: str, seeds: list[int], datalist: Path, brain_age_model: Path | None) -> dict:
    runs = {seed: train_and_test(out / part / f"seed{seed}", datalist, {"seed": seed}, ad=True) for seed in seeds}
    result = {"runs": runs}
    if brain_age_model is not None and brain_age_model.is_file():
        result["from_brain_age"] = {
            seeds[0]: train_and_test(out / part / f"from_brain_age_seed{seeds[0]}", datalist,
                                     {"seed": seeds[0], "init_weights": brain_age_model}, ad=True)}
    splits = read_datalist(datalist)
    result["baseline"] = ad_baseline(splits["training"], splits["validation"], splits["test"])
    region = datalist.parent / "derivatives" / "ground_truth" / "medial_temporal_region.nii.gz"
    result["region_mean"] = region_mean_auc(splits["test"], np.asarray(nib.load(region).dataobj) > 0.5)
    return result


def part_transfer(out: Path, model_roots: dict, datalist: Path, ixi_dir: Path | None) -> dict:
    """Each trained model (``model_roots``: seed -> bundle root) scored on other data, beside ridge fitted
    on the same training split."""
    elsewhere = {name: all_as_test(cohort(out, name, settings), out / "data" / f"{name}_all.json")
                 for name, (settings, _) in TRANSFER_COHORTS.items()}
    if ixi_dir is not None and (ixi_dir / "participants.tsv").is_file():
        prepared = out / "data" / "ixi_prep"
        if not (prepared / "datalist.json").is_file():
            table = pd.read_csv(ixi_dir / "participants.tsv", sep="\t")
            records = [{"image": str(ixi_dir / f"{row.participant_id}_T1.nii.gz"), "age": float(row.age),
                        "sex": row.sex, "site": row.site, "subject": row.participant_id} for row in table.itertuples()]
            raw = write_datalist(out / "data" / "ixi_raw.json", {"test": records})
            run([sys.executable, "-m", "data_prep", "preprocess", "--datalist", str(raw), "--out_dir", str(prepared),
                 "--resolution", str(COHORT["resolution"])], out / "logs" / "preprocess_ixi.log")
        elsewhere["ixi"] = prepared / "datalist.json"
    return scored_elsewhere(model_roots, datalist, elsewhere)


def part_cues(out: Path, model_roots: dict, datalist: Path) -> dict:
    """Which ageing effect the trained models read: each scored on cohorts where one effect alone ages the
    brain (the others at 0), beside ridge fitted on the models' training split."""
    alone = {effect: all_as_test(cohort(out, f"cue_{effect}", settings), out / "data" / f"cue_{effect}_all.json")
             for effect, settings in CUE_COHORTS.items()}
    return scored_elsewhere(model_roots, datalist, alone, prefix="cue_")


def part_perturbations(out: Path, model_roots: dict, datalist: Path) -> dict:
    """Each trained model on the test split with its volumes perturbed (``PERTURBATIONS``), beside ridge."""
    changed = {name: perturbed_test_split(datalist, name, out / "data" / f"perturbed_{name}") for name in PERTURBATIONS}
    return scored_elsewhere(model_roots, datalist, changed, prefix="perturbed_")


def scored_elsewhere(model_roots: dict, datalist: Path, elsewhere: dict, prefix: str = "") -> dict:
    """Each model (seed -> bundle root) and ridge fitted on ``datalist``'s training split, scored on every
    subject of each datalist in ``elsewhere`` (name -> path; ``prefix`` + name names the output folders)."""
    result = {name: {seed: score_on(root, path, prefix + name) for seed, root in model_roots.items()}
              for name, path in elsewhere.items()}
    splits = read_datalist(datalist)
    ridge = age_baselines(splits["training"], splits["validation"], splits["test"],
                          elsewhere={name: read_datalist(path)["test"] for name, path in elsewhere.items()})
    return {"network": result, "ridge": {name: ridge[f"ridge_{name}"] for name in elsewhere}}


# ------------------------------------------------------------------------------------------ reporting


def mean_sd(values) -> str:
    values = np.asarray([v for v in values if v is not None], float)
    return f"{values.mean():.2f} +/- {values.std(ddof=1):.2f}" if values.size > 1 else f"{values.mean():.2f}"


def plot_learning_curves(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for seed, result in runs.items():
        curve = result["curve"]
        for ax, column, title in zip(axes, ("train_loss", "val_mae", "val_pearson_r"),
                                     ("training loss (MSE, years^2)", "validation MAE (years)", "validation Pearson r")):
            ax.plot(curve["epoch"], curve[column], marker="o", ms=2.5, label=f"seed {seed}")
            ax.set(xlabel="epoch", title=title)
    axes[0].set_yscale("log")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stability(curve: dict, from_epoch: int = 10) -> dict:
    """Largest ratio of an epoch's validation MAE to the best so far, after ``from_epoch``."""
    mae = np.asarray(curve["val_mae"], float)
    ratios = [mae[i] / mae[: i + 1].min() for i in range(from_epoch, len(mae))]  # epochs after from_epoch
    return {"max_ratio_to_best": float(max(ratios)) if ratios else float("nan")}


def markdown(results: dict, args) -> str:
    lines = ["# Slice network: evidence", "",
             f"Made by `python benchmarks/slice_evidence.py --out {args.out} --parts "
             f"{','.join(p for p in PARTS if p in results)}` (each part may run on its own; finished runs are reused) "
             f"on {platform.processor() or platform.machine()} ({results['cpu']}), torch threads "
             f"{results['threads']}. Every row is the bundle's train.json + evaluate.json with the overrides shown. "
             "The variant table (aggregation x position embedding x slice axis, ResNet-18) has its own page, "
             "[variants.md](variants.md).",
             ""]
    for key, title in (("default", f"Default config, {COHORT['n']}-subject {COHORT['resolution']} mm cohort"),
                       ("small", f"Default config, first {args.n_small} training subjects")):
        if key not in results:
            continue
        part = results[key]
        runs, base = part["runs"], part["baselines"]
        lines += [f"## {title}", "",
                  "| model | test MAE (years) | test r | training time (CPU: all cores) |", "|---|---|---|---|",
                  f"| slice network, {len(runs)} seed{'s' if len(runs) > 1 else ''} | {mean_sd(r['mae'] for r in runs.values())} | "
                  f"{mean_sd(r['pearson_r'] for r in runs.values())} | "
                  f"{mean_sd(r['train_seconds'] / 60 for r in runs.values())} min wall, "
                  f"{mean_sd(r['train_cpu_seconds'] / 60 for r in runs.values())} min CPU |",
                  f"| ridge on 8 mm voxels ({base['n_train']} training subjects) | {base['ridge_mae']:.2f} | "
                  f"{base['ridge_r']:.3f} | |",
                  f"| constant (training mean) | {base['constant_mae']:.2f} | | |", "",
                  f"Mean test MAE of the network / ridge: {np.mean([r['mae'] for r in runs.values()]) / base['ridge_mae']:.2f}.", "",
                  "Per seed: " + "; ".join(
                      f"seed {s}: MAE {r['mae']:.2f}, r {r['pearson_r']:.3f}, after epoch 10 the worst validation "
                      f"MAE was {stability(r['curve'])['max_ratio_to_best']:.2f}x the best so far, last validation "
                      f"MAE {r['last_validation']['mae']:.2f} against {r['last_validation']['calibrated_mae']:.2f} after "
                      "refitting a linear calibration on it" for s, r in runs.items()), ""]
        if key == "default":
            lines += ["![learning curves](figures/learning_curves.png)", ""]
    if "ablation" in results and "default" in results:
        seed = results["ablation"]["seed"]
        reference = {str(k): r for k, r in results["default"]["runs"].items()}[str(seed)]
        lines += [f"## What each stabiliser does (seed {seed})", "",
                  "| config | test MAE | test r | worst validation MAE after epoch 10 / best so far | "
                  "last validation MAE / after linear calibration |", "|---|---|---|---|---|"]
        for name, r in [("default", reference), *((ABLATIONS[k][0], r) for k, r in results["ablation"]["runs"].items())]:
            lines.append(f"| {name} | {r['mae']:.2f} | {r['pearson_r']:.3f} | "
                         f"{stability(r['curve'])['max_ratio_to_best']:.2f} | {r['last_validation']['mae']:.2f} / "
                         f"{r['last_validation']['calibrated_mae']:.2f} |")
        lines.append("")
    for name in (name for name in AD_COHORTS if name in results):
        part, (_, settings, title) = results[name], AD_COHORTS[name]
        base = part["baseline"]
        lines += [f"## AD detection, {settings['n']}-subject {title}", "",
                  "| model | test AUC (95 % bootstrap interval) | balanced accuracy |", "|---|---|---|"]
        for key, label in (("runs", "slice network from scratch"), ("from_brain_age", "slice network from the brain-age model")):
            for seed, r in part.get(key, {}).items():
                lines.append(f"| {label}, seed {seed} | {r['auc']:.3f} ({r['auc_ci95_low']:.3f}-{r['auc_ci95_high']:.3f}) | "
                             f"{r['balanced_accuracy']:.3f} |")
        lines += [f"| logistic regression on 8 mm voxels | {base['logistic_auc']:.3f} ({base['logistic_auc_ci95_low']:.3f}-"
                  f"{base['logistic_auc_ci95_high']:.3f}) | |"]
        if "age_auc" in base:
            lines.append(f"| the subject's age alone (no image; AD subjects are {AD_MIN_AGE:g} or older) | "
                         f"{base['age_auc']:.3f} ({base['age_auc_ci95_low']:.3f}-{base['age_auc_ci95_high']:.3f}) | |")
        if "region_mean" in part:
            m = part["region_mean"]
            lines.append(f"| mean intensity in the simulator's medial-temporal AD region (no fitting; knows where AD acts) | "
                         f"{m['auc']:.3f} ({m['auc_ci95_low']:.3f}-{m['auc_ci95_high']:.3f}) | |")
        lines.append("")
    if "transfer" in results:
        part = results["transfer"]
        seeds = len(next(iter(part["network"].values())))
        lines += [f"## Transfer: the default models ({seeds} seed{'s' if seeds > 1 else ''}) on data they were not trained on", "",
                  "Ridge on 8 mm voxels, fitted on the same training split, scored on the same data for comparison.", ""]
        labels = {**{name: f"simulated: {label}" for name, (_, label) in TRANSFER_COHORTS.items()},
                  "ixi": "ten real IXI heads (ages 23-51), `preprocess --resolution 4`"}
        lines += scored_table(part, labels)
        lines += ["", "First seed's model:", "",
                  *(f"![predicted vs true age, {key}](figures/transfer_{key}.png)" for key in part["network"]), ""]
    if "cues" in results:
        settings = next(iter(CUE_COHORTS.values()))
        lines += ["## Which ageing effect the default models read", "",
                  f"Cohorts of {settings['n']} subjects ({settings['resolution']} mm, seed {settings['seed']}) in which one "
                  "of the simulator's ageing effects alone ages the brain (`simulate-cohort --<effect>_scale 1`, the "
                  "others 0), scored by the default models and by ridge as trained above.", ""]
        lines += scored_table(results["cues"], {effect: f"{effect} alone" for effect in EFFECTS}) + [""]
    if "perturbations" in results:
        lines += ["## Does the model read texture as age?", "",
                  "The default models and ridge on the test split with every volume changed the way scanners and "
                  "preprocessing pipelines differ. A mean gap that moves by years when the image is a little "
                  "smoother or sharper means the model reads texture as age; nothing in simulated training data fixes "
                  "how real scans' texture maps to age, so such a model lands them at an offset that depends on "
                  "its training seed (the slice README, \"Texture read as age\").", ""]
        lines += scored_table(results["perturbations"], {name: label for name, (label, _) in PERTURBATIONS.items()}) + [""]
    return "\n".join(lines)


def variants_markdown(part: dict, args) -> str:
    """The variant table's page: test MAE per row (mean +/- SD where several seeds ran), then every run."""
    rows, grid = part["rows"], variant_grid(part["epochs"])
    runs = [(name, seed, r) for name in grid
            for seed, r in sorted(rows.get(name, {}).get("runs", {}).items(), key=lambda item: int(item[0]))]
    carried = [r["source"] for _, _, r in runs if "source" in r]
    lines = ["# Slice network: variants", "",
             f"Made by `python benchmarks/slice_evidence.py --out {args.out} --parts variants --seeds "
             f"{' '.join(map(str, args.seeds))} --variant_epochs {part['epochs']} --jobs {args.jobs}"
             + (f" --overrides '{args.overrides}'" if json.loads(args.overrides) else "") + "` on the "
             f"{COHORT['n']}-subject {COHORT['resolution']} mm cohort (seed {COHORT['seed']}, the default part's split "
             "in evidence.md: ridge and the constant predictor are there). Each run is the default config with the "
             f"overrides of its row, {part['epochs']} epochs (the default schedule, shorter); finished runs are kept "
             f"in variants.json. {len(runs)} of {len(grid) + BEST_ROWS * (len(args.seeds) - 1)} runs done.", "",
             "## Test MAE (years)", "", "| aggregation | position embedding | " + " | ".join(AXES) + " |",
             "|---|---|---|---|---|"]
    for aggregation, position in itertools.product(AGGREGATIONS, ("nope", "pe")):
        cells = []
        for axis in AXES:
            done = rows.get(f"{aggregation}_{position}_{axis}", {}).get("runs", {})
            cells.append((mean_sd(r["mae"] for r in done.values()) + (f" ({len(done)} seeds)" if len(done) > 1 else ""))
                         if done else "not run yet")
        lines.append(f"| {aggregation} | {'on' if position == 'pe' else 'off'} | " + " | ".join(cells) + " |")
    resnet = rows.get("resnet18", {}).get("runs", {})
    lines += ["", f"Best four by the first seed's MAE (then {len(args.seeds)} seeds): {', '.join(part.get('best', [])) or 'not known yet'}. "
              "ResNet-18 encoder (random init; mean pooling, no position embedding, sagittal, as the default): "
              + (f"MAE {mean_sd(r['mae'] for r in resnet.values())}" if resnet else "not run yet")
              + "; ImageNet weights need a download, which this machine cannot make.", "",
              "![validation MAE per epoch](figures/variants_val_mae.png)", "", "## Every run", "",
              "| row | seed | test MAE | test r | validation MAE, epoch 1 -> last | worst validation MAE after epoch 10 / "
              "best so far | training min (wall / CPU) | trainings side by side |", "|---|---|---|---|---|---|---|---|"]
    for name, seed, r in runs:
        if "curve" in r:
            mae = r["curve"]["val_mae"]
            learned = f"{mae[0]:.1f} -> {mae[-1]:.2f} | {stability(r['curve'])['max_ratio_to_best']:.2f} | " \
                      f"{r['train_seconds'] / 60:.1f} / {r['train_cpu_seconds'] / 60:.1f} | {r['jobs']}"
        else:
            learned = "| | |"
        lines.append(f"| {name}{' *' if 'source' in r else ''} | {seed} | {r['mae']:.2f} | {r['pearson_r']:.3f} | {learned} |")
    if carried:
        lines += ["", f"\\* {carried[0]}"]
    return "\n".join(lines)


def plot_variant_curves(part: dict, path: Path) -> None:
    """Validation MAE per epoch of every run with a learning curve, one panel per aggregation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(AGGREGATIONS) + 1, figsize=(16, 3.4), sharey=True)
    for name, row in part["rows"].items():
        ax = axes[-1] if name == "resnet18" else axes[AGGREGATIONS.index(name.split("_")[0])]
        for seed, r in row["runs"].items():
            if "curve" in r:
                ax.plot(r["curve"]["epoch"], r["curve"]["val_mae"], lw=1, ls="-" if "_nope_" in name else "--",
                        label=f"{name.split('_', 1)[-1]} s{seed}")
    for ax, title in zip(axes, (*AGGREGATIONS, "resnet18")):
        ax.set(xlabel="epoch", title=title, yscale="log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    axes[0].set_ylabel("validation MAE (years)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scored_table(part: dict, labels: dict) -> list[str]:
    """Markdown rows of the network (mean +/- SD over seeds) and ridge on each dataset of ``part``."""
    lines = ["| data | n | MAE | Pearson r | mean gap | ridge MAE | ridge r | ridge mean gap |",
             "|---|---|---|---|---|---|---|---|"]
    for key, runs in part["network"].items():
        b = part["ridge"][key]
        lines.append(f"| {labels[key]} | {next(iter(runs.values()))['n']} | {mean_sd(m['mae'] for m in runs.values())} | "
                     f"{mean_sd(m['pearson_r'] for m in runs.values())} | {mean_sd(m['mean_gap'] for m in runs.values())} | "
                     f"{b['mae']:.2f} | {b['pearson_r']:.3f} | {b['mean_gap']:+.2f} |")
    return lines


def cpu_features() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0] if Path("/proc/cpuinfo").is_file() else ""
    return ", ".join(f for f in ("avx512_bf16", "amx_bf16", "avx2") if f in flags.split()) or "no AVX2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/evidence")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n_small", type=int, default=100)
    parser.add_argument("--variant_epochs", type=int, default=20,
                        help="epochs of each variant-table run (the default config's schedule over fewer epochs)")
    parser.add_argument("--ixi_dir", default=str(REPO.parent / "shared" / "data" / "ixi_hh10"))
    parser.add_argument("--docs", default=str(REPO / "bundles" / "slice_cnn_brainage" / "docs"))
    parser.add_argument("--ablations", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS),
                        help="which stabilisers the ablation part leaves out")
    parser.add_argument("--ad_seeds", type=int, nargs="+", default=None, help="seeds of the ad parts (default: --seeds)")
    parser.add_argument("--ad_from_brain_age", type=lambda v: as_bool(v, "--ad_from_brain_age"), default=True,
                        help="the ad parts also train a detector started from the first default model")
    parser.add_argument("--n", type=int, default=COHORT["n"], help="subjects in each simulated cohort")
    parser.add_argument("--overrides", default="{}", help="JSON dict of bundle overrides for every run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="trainings side by side, each with cores / jobs torch threads (default, small, variants)")
    args = parser.parse_args()
    global JOBS
    JOBS = max(1, args.jobs)
    EXTRA_OVERRIDES.update(json.loads(args.overrides))
    for settings in (COHORT, *(settings for _, settings, _ in AD_COHORTS.values())):
        settings["n"] = args.n
    out = Path(args.out).resolve()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")
    import torch

    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results["cpu"] = cpu_features()
    results.setdefault("threads", torch.get_num_threads())  # the trainings' (later parts may score only)
    datalist = cohort(out, "cohort400", COHORT)
    default_root = out / "default" / f"seed{args.seeds[0]}"
    for part in parts:
        if part == "default":
            results["default"] = part_default(out, args.seeds, datalist)
        elif part == "small":
            results["small"] = part_small(out, args.seeds, datalist, args.n_small)
        elif part == "variants":  # its own page, from its own committed store
            variants = part_variants(out, args.seeds, datalist, args.variant_epochs, Path(args.docs) / "variants.json")
            plot_variant_curves(variants, Path(args.docs) / "figures" / "variants_val_mae.png")
            (Path(args.docs) / "variants.md").write_text(variants_markdown(variants, args) + "\n")
            print(f"{part}: done, {args.docs}/variants.md", flush=True)
            continue
        elif part in AD_COHORTS:
            folder, settings, _ = AD_COHORTS[part]
            results[part] = part_ad(out, part, args.ad_seeds or args.seeds, cohort(out, folder, settings),
                                    default_root / "models" / "model.pt" if args.ad_from_brain_age else None)
        elif part == "ablation":
            results["ablation"] = part_ablation(out, args.seeds[0], datalist, args.ablations)
        elif part in ("transfer", "cues", "perturbations"):
            roots = {seed: out / "default" / f"seed{seed}" for seed in args.seeds}
            if not all((root / "models" / "model.pt").is_file() for root in roots.values()):
                results["default"] = part_default(out, args.seeds, datalist)
            if part == "transfer":
                results[part] = part_transfer(out, roots, datalist, Path(args.ixi_dir) if args.ixi_dir else None)
            else:
                results[part] = (part_cues if part == "cues" else part_perturbations)(out, roots, datalist)
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1, default=str))
        print(f"{part}: done", flush=True)
    docs = Path(args.docs)
    if not set(results) & set(PARTS):  # the variants part alone: evidence.md stays as it is
        return
    if "default" in results:
        plot_learning_curves(results["default"]["runs"], docs / "figures" / "learning_curves.png")
    for name in results.get("transfer", {}).get("network", {}):
        scatter = default_root / f"eval_{name}" / "test_scatter.png"
        if scatter.is_file():
            shutil.copyfile(scatter, docs / "figures" / f"transfer_{name}.png")
    text = markdown(results, args)
    (docs / "evidence.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
