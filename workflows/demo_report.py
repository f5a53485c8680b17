"""The demo's report: ``<out>/report.md`` and a self-contained ``<out>/report.html`` from what the steps wrote.

Reads ``<out>/steps.json`` (commands, logs, times; written by ``workflows.demo``) and the outputs of each
step (metrics JSON/CSV, plots, the GAN's synthetic datalist, region-map scores, IXI predictions), draws
one figure of its own (real / GAN-reconstructed / synthetic test volumes) and writes the same content
twice: Markdown with images by relative path, HTML with images embedded as base64 so the file opens
anywhere. Re-run alone: ``python -m workflows demo-report --out runs/demo``.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import shlex
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np

from brainage_core.datalist import read_datalist, synthetic_records
from brainage_core.volumes import InputError, atomic_path

from .demo import DemoLayout, report_argv

IXI_WARNING = (
    "These two real IXI scans went through data_prep's preprocessing and the brain-age model trained above. "
    "The model was trained on simulated data only, so these numbers are a pipeline check (the real-scan path "
    "runs end to end), not a clinical or even a research estimate of these people's brain age."
)
GRID_COLUMNS = 4


# ------------------------------------------------------------------------------------------ document


def heading(level: int, text: str) -> tuple:
    return ("heading", level, text)


def paragraph(text: str) -> tuple:
    return ("paragraph", text)


def table(headers: list[str], rows: list[list]) -> tuple:
    return ("table", headers, [[str(cell) for cell in row] for row in rows])


def image(path: Path, alt: str) -> tuple:
    return ("image", Path(path), alt)


def code(text: str) -> tuple:
    return ("code", text)


def to_markdown(blocks: list[tuple], base: Path) -> str:
    """Markdown of ``blocks``; image paths relative to ``base`` (the report's folder)."""
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            parts.append(f"{'#' * block[1]} {block[2]}")
        elif kind == "paragraph":
            parts.append(block[1])
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
            parts.append("\n".join(lines))
        elif kind == "image":
            parts.append(f"![{block[2]}]({block[1].relative_to(base).as_posix()})")
        elif kind == "code":
            parts.append(f"```bash\n{block[1]}\n```")
    return "\n\n".join(parts) + "\n"


def to_html(blocks: list[tuple], title: str) -> str:
    """A standalone HTML page of ``blocks``; PNG images embedded as base64 data URIs."""
    esc = html.escape
    body = []
    for block in blocks:
        kind = block[0]
        if kind == "heading":
            body.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
        elif kind == "paragraph":
            body.append(f"<p>{esc(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "image":
            data = base64.b64encode(block[1].read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{esc(block[2])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{esc(block[2])}</figcaption></figure>")
        elif kind == "code":
            body.append(f"<pre><code>{esc(block[1])}</code></pre>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #999;padding:.25em .6em;text-align:left}"
             "pre{background:#f4f4f4;padding:.6em;white-space:pre-wrap;word-break:break-all}"
             "img{max-width:100%}figcaption{font-size:.85em;color:#555}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ------------------------------------------------------------------------------------------ inputs


def _required(path: Path, step: str) -> Path:
    if not path.is_file():
        raise InputError(f"demo report: {path} is missing; run the demo's step {step!r} first (see steps.json)")
    return path


def _json(path: Path, step: str) -> dict:
    return json.loads(_required(path, step).read_text())


def _csv_rows(path: Path, step: str) -> list[dict]:
    with open(_required(path, step), newline="") as handle:
        return list(csv.DictReader(handle))


def _steps(at: DemoLayout) -> list[dict]:
    steps = _json(at.steps_file, "any")["steps"]
    failed = [s["name"] for s in steps if s.get("failed")]
    if failed:
        raise InputError(f"demo report: step {failed[0]} failed (log {steps[-1]['log']}); fix it and re-run the demo")
    return steps


def _f(value, digits: int = 2) -> str:
    return "n/a" if value is None or not np.isfinite(float(value)) else f"{float(value):.{digits}f}"


def _auc_cell(metrics: dict, prefix: str) -> str:
    """``<prefix>auc`` with its bootstrap interval, as "0.987 (0.963-1.000)"."""
    return (f"{_f(metrics[prefix + 'auc'], 3)} ({_f(metrics[prefix + 'auc_ci95_low'], 3)}-"
            f"{_f(metrics[prefix + 'auc_ci95_high'], 3)})")


def _duration(seconds: float) -> str:
    minutes, rest = divmod(float(seconds), 60)
    return f"{int(minutes)} min {rest:04.1f} s" if minutes else f"{rest:.1f} s"


# ------------------------------------------------------------------------------------------ figure


def _display(volume: np.ndarray) -> np.ndarray:
    from custom_components.common.plots import central_slices

    axial = central_slices(volume)[2]
    top = float(np.percentile(axial, 99.5)) or 1.0
    return np.clip(axial / top, 0.0, 1.0)


def gan_grid_figure(at: DemoLayout, path: Path) -> Path:
    """Rows real / reconstructed / synthetic: test subjects spread over age, their GAN reconstructions, and
    the synthetic volume nearest in age to each (central axial slices, each scaled to its own range)."""
    from custom_components.common.plots import plt, save_figure

    test = sorted(read_datalist(_required(at.cohort / "datalist.json", "simulate_cohort"))["test"],
                  key=lambda r: r["age"])
    chosen = [test[i] for i in np.unique(np.linspace(0, len(test) - 1, GRID_COLUMNS).round().astype(int))]
    synthetic = synthetic_records(_required(at.synthetic_datalist, "generate_synthetic"))
    rows = ["real", "reconstructed"] + (["synthetic"] if synthetic else [])
    fig, axes = plt.subplots(len(rows), len(chosen), figsize=(2.4 * len(chosen), 2.5 * len(rows)), squeeze=False)
    for col, record in enumerate(chosen):
        stem = Path(record["image"]).name.split(".nii")[0]
        recon = _required(at.gan_test_output / "reconstructions" / f"{stem}_recon.nii.gz", "reconstruct_test_gan")
        panels = [(record["image"], f"real {record['age']:.0f} y"), (recon, "reconstructed")]
        if synthetic:
            near = min(synthetic, key=lambda r: abs(r["age"] - record["age"]))
            panels.append((near["image"], f"synthetic {near['age']:.0f} y"))
        for row, (file, label) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(_display(np.asarray(nib.load(str(file)).dataobj, dtype=np.float32)), cmap="gray")
            ax.set_title(label, fontsize=9)
            ax.set_axis_off()
    fig.suptitle("TGB-GAN: real test volumes, their reconstructions, synthetic volumes of similar age")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ sections


def brain_age_section(at: DemoLayout) -> list[tuple]:
    from custom_components.slice_cnn.baselines import age_baselines

    synthetic_list = _json(at.synthetic_datalist, "generate_synthetic")
    n_real, n_synthetic = synthetic_list["n_real"], synthetic_list["n_synthetic"]
    rows, figures = [], []
    for name, root, step, n_train in (("real only", at.slice_real, "evaluate_slice_real", n_real),
                                      ("real + synthetic", at.slice_synthetic, "evaluate_slice_synthetic",
                                       n_real + n_synthetic)):
        m = _json(root / "eval" / "test_metrics.json", step)
        rows.append([f"slice network, {name}", n_train, m["n"], _f(m["mae"]), _f(m["pearson_r"], 3), _f(m["r2"], 3)])
        figures += [image(_required(root / "eval" / "test_scatter.png", step), f"predicted vs true age, {name}"),
                    image(_required(root / "eval" / "test_gap_vs_age.png", step), f"brain-age gap vs age, {name}")]
    splits = read_datalist(_required(at.cohort / "datalist.json", "simulate_cohort"))
    base = age_baselines(splits["training"], splits["validation"], splits["test"])
    rows += [["ridge on 8 mm voxels (same real subjects)", base["n_train"], base["n_test"], _f(base["ridge_mae"]),
              _f(base["ridge_r"], 3), ""],
             ["constant (training mean age)", base["n_train"], base["n_test"], _f(base["constant_mae"]), "", ""]]
    return [
        heading(2, "Brain age on the simulated test set"),
        paragraph(f"The slice network (the bundle's default recipe) trained on the {n_real} real training volumes, "
                  f"and on those plus {n_synthetic} TGB-GAN synthetic volumes; both evaluated on the same held-out "
                  "test subjects, beside two baselines fitted here on the same real training subjects. MAE in years."),
        table(["model", "n training", "n test", "MAE", "Pearson r", "R^2"], rows),
        paragraph("Learning curve of the real-only training: training loss, learning rate, validation MAE and "
                  "Pearson r per epoch (batch-norm statistics recomputed before every validation)."),
        image(_required(at.slice_real / "eval" / "learning_curve.png", "train_slice_real"), "learning curve, real only"),
        *figures,
    ]


def ad_section(at: DemoLayout) -> list[tuple]:
    from custom_components.slice_cnn.baselines import ad_baseline

    m = _json(at.slice_ad / "eval" / "test_detection_metrics.json", "evaluate_ad")
    splits = read_datalist(_required(at.ad_cohort / "datalist.json", "simulate_ad_cohort"))
    base = ad_baseline(splits["training"], splits["validation"], splits["test"])
    return [
        heading(2, "AD detection (simulated AD cohort, test split)"),
        paragraph(f"The AD-detection variant (train_ad.json) of the slice network on a separate simulated cohort, "
                  f"half AD, everyone aged 55 or older (age-matched); test split: {m['n_positive']} AD, "
                  f"{m['n'] - m['n_positive']} CN. The detector starts from the real-only brain-age model above "
                  "(`init_weights`; from scratch it stays at chance for about 700 optimiser steps on such a cohort). "
                  "AUC with its bootstrap 95 % interval; logistic regression on voxels fitted on the same training "
                  "subjects."),
        table(["model", "AUC (95 % interval)", "accuracy", "balanced accuracy"],
              [["slice network", _auc_cell(m, ""), _f(m["accuracy"], 3), _f(m["balanced_accuracy"], 3)],
               ["logistic regression on 8 mm voxels", _auc_cell(base, "logistic_"), "", ""],
               ["the subject's age alone (no image: the groups are age-matched)", _auc_cell(base, "age_"), "", ""]]),
        image(_required(at.slice_ad / "eval" / "test_roc.png", "evaluate_ad"), "ROC curve of the AD detector"),
        image(_required(at.slice_ad / "eval" / "learning_curve.png", "train_ad"), "learning curve of the AD detector"),
    ]


def gan_section(at: DemoLayout) -> list[tuple]:
    synthetic_list = _json(at.synthetic_datalist, "generate_synthetic")
    summary = _json(at.region_maps / "region_maps.json", "generate_synthetic")
    settings = synthetic_list.get("synthesis", {})
    grid = gan_grid_figure(at, at.figures / "gan_real_reconstructed_synthetic.png")
    return [
        heading(2, "TGB-GAN: synthesis and the age-region map"),
        paragraph(f"TGB-GAN trained on the {synthetic_list['n_real']} real training volumes; synthesis "
                  f"({settings.get('mode')}) topped every integer-age bin holding at least two subjects up to "
                  f"{settings.get('target_per_bin')} volumes: {synthetic_list['n_synthetic']} synthetic volumes."),
        image(grid, "real, reconstructed and synthetic volumes"),
        paragraph(f"Age-region maps: the decoded difference between old (mean {summary['old_age']:.0f} y, "
                  f"n={summary['n_old']}) and young (mean {summary['young_age']:.0f} y, n={summary['n_young']}) "
                  "subjects, by group means of latent codes and by traversal along the latent age direction. "
                  "Score: ROC AUC of |map| for the voxels where the simulator's ground-truth ageing effect "
                  "exceeds the threshold (0.5 = chance, 1 = perfect)."),
        table(["map", "AUC against ground truth"],
              [["group means", _f(summary.get("auc_group_means"), 3)],
               ["latent traversal", _f(summary.get("auc_traversal"), 3)],
               ["real-image group means (baseline, no network)", _f(summary.get("auc_real_group_means"), 3)]]),
        *[image(at.region_maps / files[1], f"age-region map, {name.replace('_', ' ')}")
          for name, files in summary["files"].items()],
    ]


def ixi_section(at: DemoLayout) -> list[tuple]:
    predictions = at.ixi_predictions / "inference_predictions.csv"
    if not predictions.is_file():
        return [heading(2, "Real IXI scans"), paragraph("Not run in this demo (the IXI steps were skipped).")]
    rows = [[r["subject"], r["age"], r["predicted_age"], r["brain_age_gap"]] for r in _csv_rows(predictions, "predict_ixi")]
    return [
        heading(2, "Real IXI scans (a pipeline check, not an estimate)"),
        paragraph(IXI_WARNING),
        table(["subject", "age", "predicted age", "gap"], rows),
    ]


def steps_section(steps: list[dict], repository: str, out: Path) -> list[tuple]:
    total = sum(s["seconds"] for s in steps)
    cpu = sum(s["cpu_seconds"] for s in steps)
    blocks = [
        heading(2, "Steps, commands and times"),
        paragraph(f"Each step re-runs alone with its command, from the repository root ({repository}); its full "
                  "output is in its log. Time is wall-clock on the machine that ran the demo and grows with other "
                  "load on it; CPU is the user + system time of all cores, which depends less on that load. "
                  f"Total of the steps below: {_duration(total)} wall, {_duration(cpu)} CPU (a report written "
                  "by the demo does not include its own step)."),
        table(["step", "time", "CPU", "outputs", "log"],
              [[s["name"], _duration(s["seconds"]), _duration(s["cpu_seconds"]), s["outputs"], s["log"]]
               for s in steps]),
    ]
    for s in steps:
        blocks += [heading(3, s["name"]), code(s["command"])]
    return blocks + [heading(3, "this report"), code(shlex.join(report_argv(out)))]


def write_report(out: str = "runs/demo") -> Path:
    """Write <out>/report.md and <out>/report.html from the demo's outputs; return the Markdown path."""
    at = DemoLayout(Path(out).resolve())
    record = _json(at.steps_file, "any")
    steps = _steps(at)
    title = "Brain-age demo report"
    blocks = [
        heading(1, title),
        paragraph(f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from the outputs in {at.out}. "
                  "Data: simulated ageing cohorts with known ground truth (MNI152 anatomy), plus two real IXI "
                  "scans. Research use only: nothing here is validated for diagnosis or any clinical decision."),
        *brain_age_section(at),
        *ad_section(at),
        *gan_section(at),
        *ixi_section(at),
        *steps_section(steps, record["repository"], at.out),
    ]
    with atomic_path(at.report) as tmp:
        tmp.write_text(to_markdown(blocks, at.out))
    with atomic_path(at.report.with_suffix(".html")) as tmp:
        tmp.write_text(to_html(blocks, title))
    print(f"wrote {at.report} and {at.report.with_suffix('.html')}")
    return at.report
