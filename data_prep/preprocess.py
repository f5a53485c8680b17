"""Raw T1-weighted head scans -> skull-stripped, bias-corrected, intensity-normalised brains on the
canonical grid, with QC pictures and tables.

One scan (``preprocess_volume``):

1. load and check it (``load_volume``), reorient to RAS, clip negative values (MR magnitudes are >= 0);
2. N4 bias-field correction (``registration.correct_bias``);
3. affine registration to the MNI152 2009 template with elastix (``registration.register_to_template``);
   when the result fails QC (step 6), again from starts with the head turned by 20 degrees about each axis
   (``register_scan``), keeping the better: tilted heads led every upright start to a shrunken fit;
4. resampling of the corrected image onto the canonical grid through that transform, then brain
   extraction with the template brain mask (grown by BRAIN_MARGIN_MM). The mask is the template's,
   carried through the registration: applying it in template space, where the output lives, is the
   same as carrying it back to the native scan and masking there;
5. intensity normalisation: division by the NORMALISATION_PERCENTILE-th percentile of the brain, so white matter
   sits near 1 as in the nilearn template; zero outside the brain;
6. QC, two measures: the correlation with the template inside its brain mask (below
   MIN_TEMPLATE_CORRELATION the scan failed: a gross misregistration or not a T1 brain), and the residual
   misalignment: the head, resampled unmasked onto the QC_RESOLUTION_MM grid, is registered again to the
   template, rigidly from the identity, and the mean displacement of the template brain's voxels is the
   distance (mm) by which the output sits off the template. Above MAX_MISALIGNMENT_MM the scan gets a QC
   warning: ``on_qc_warning`` "reject" (default) fails it, "flag" keeps it with the reason in
   ``qc_warning``. Calibration: ``benchmarks/registration_qc.py``.

A batch (``preprocess_datalist``) runs scans in worker processes and writes, under ``out_dir``:
``images/<scan>.nii.gz``, ``qc/<scan>.png`` and ``qc/<scan>.json``, ``qc.csv``, ``failures.csv`` and
``datalist.json`` (the input's splits, images replaced by the preprocessed volumes, failed scans left
out). A scan that registered but failed QC gets its picture too (``qc/<scan>.png``, named in
failures.csv), so one can see why. ``<scan>`` is the subject id, or ``<subject>_<image file stem>`` for subjects with several scans.
A scan counts as done when its volume exists; the volume is written last and atomically, so a crash
never leaves a half-written one and a re-run redoes exactly the unfinished scans (and removes the
temporary files of writes that were killed). An output folder that cannot be written, or whose disk is
nearly full, is refused before any scan starts.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from tqdm import tqdm

from brainage_core.checks import check_output_dir, lock_output_dir, remove_partial_writes
from brainage_core.datalist import read_datalist, write_datalist
from brainage_core.grid import DEFAULT_RESOLUTION_MM, Grid, canonical_grid, resample_to_grid
from brainage_core.volumes import InputError, atomic_path, load_volume, normalise_intensity, save_nifti

from .qc import normalised_correlation, save_qc_picture
from .registration import (
    RETRY_TURNS_DEG,
    START_OFFSETS_MM,
    Registration,
    RegistrationError,
    correct_bias,
    mask_points_mm,
    register_to_template,
    rigid_misalignment_mm,
    use_itk_threads,
    voxel_sizes,
)

BRAIN_MARGIN_MM = 2.0
# Correlation with the template inside its brain mask, measured on the two IXI sample heads: 0.55-0.69
# when aligned (1, 2 and 4 mm grids); 0.0-0.29 from elastix runs that failed (started too far off);
# 0.26-0.37 with front and back swapped. 0.45 lies between. It catches gross failures, not small
# misalignments: an aligned output shifted by 8 mm still scores 0.38-0.53 (the residual misalignment does).
MIN_TEMPLATE_CORRELATION = 0.45
# Residual misalignment above which a scan gets a QC warning. Calibrated with benchmarks/registration_qc.py
# (30 simulated and 10 real IXI raw heads, registered, then moved by known errors): as registered they
# measure 0.26-1.54 mm; moved by >= 6 mm or >= 6 degrees, 5.2 mm or more (measured - true: median 0.2 mm).
MAX_MISALIGNMENT_MM = 3.0
QC_RESOLUTION_MM = 4.0
QC_WARNING_POLICIES = ("reject", "flag")
DTYPES = {"float32": np.float32, "float16": np.float16}
QC_COLUMNS = ("subject", "source", "output", "registration_metric", "template_correlation", "misalignment_mm",
              "brain_volume_ml", "qc_warning", "registration_starts", "seconds")
FAILURE_COLUMNS = ("subject", "file", "reason", "qc_picture")


@dataclass(frozen=True)
class TemplateOnGrid:
    """The 1 mm nilearn template and brain mask resampled onto a canonical grid."""

    grid: Grid
    image: np.ndarray
    brain: np.ndarray  # template brain mask (boolean)
    mask: np.ndarray  # brain mask grown by BRAIN_MARGIN_MM: what preprocessing keeps


@lru_cache(maxsize=3)
def template_on_grid(resolution: float) -> TemplateOnGrid:
    """The template on the canonical grid at ``resolution`` mm (cached per process)."""
    from nilearn import datasets

    grid = canonical_grid(resolution)
    template = datasets.load_mni152_template(resolution=1)
    brain_mask = datasets.load_mni152_brain_mask(resolution=1)
    image = resample_to_grid(np.asarray(template.dataobj, dtype=np.float32), template.affine, grid)
    brain = resample_to_grid(np.asarray(brain_mask.dataobj, dtype=np.float32), brain_mask.affine, grid) > 0.5
    grown = ndi.distance_transform_edt(~brain, sampling=grid.resolution) <= BRAIN_MARGIN_MM
    return TemplateOnGrid(grid=grid, image=image, brain=brain, mask=grown)


class QCError(RegistrationError):
    """The scan registered but failed QC; ``brain`` and ``qc`` are kept for its QC picture."""

    def __init__(self, message: str, brain: np.ndarray, qc: dict) -> None:
        super().__init__(message)
        self.brain, self.qc = brain, qc


def preprocess_volume(path: str | os.PathLike, resolution: float = DEFAULT_RESOLUTION_MM,
                      on_qc_warning: str = "reject") -> tuple[np.ndarray, dict]:
    """Preprocess one raw T1 head scan onto the canonical grid at ``resolution`` mm.

    Returns the brain volume (float32, grid shape, RAS) and a QC dict with ``registration_metric``,
    ``template_correlation``, ``misalignment_mm``, ``brain_volume_ml``, ``qc_warning`` (empty, or why the
    scan was flagged), ``registration_starts`` and ``seconds``. Raises InputError naming the file: RegistrationError when alignment
    failed, QCError when the scan failed QC (``on_qc_warning`` "reject" makes a QC warning one).
    """
    _check_qc_policy(on_qc_warning)
    start = time.perf_counter()
    use_itk_threads()
    image = nib.as_closest_canonical(load_volume(path))
    try:
        scan = register_scan(image, template_on_grid(resolution))
    except InputError as err:
        raise type(err)(f"{path}: {err}") from None
    qc = {**scan.qc, "seconds": round(time.perf_counter() - start, 2)}
    failure = qc_failure(qc, on_qc_warning)
    if failure:
        raise QCError(f"{path}: {failure}", scan.brain, qc)
    return scan.brain, qc


def qc_failure(qc: dict, on_qc_warning: str = "reject") -> str:
    """Why a scan with this QC record fails (empty when it passes)."""
    if qc["template_correlation"] < MIN_TEMPLATE_CORRELATION:
        return (f"registration failed: correlation with the template {qc['template_correlation']:.2f} is below "
                f"{MIN_TEMPLATE_CORRELATION} (elastix metric {qc['registration_metric']:.3f})")
    return qc["qc_warning"] if on_qc_warning == "reject" else ""


@dataclass(frozen=True)
class RegisteredScan:
    """A scan through steps 2-6: bias-corrected image, voxel-to-template-world matrix, registration, brain on
    the template's grid, QC record."""

    corrected: np.ndarray
    in_template: np.ndarray
    registration: Registration
    brain: np.ndarray
    qc: dict


def register_scan(image: nib.Nifti1Image, template: TemplateOnGrid) -> RegisteredScan:
    """Steps 2-6 of a RAS scan. A registration that fails QC is run again from starts with the head turned
    (``registration.RETRY_TURNS_DEG``), and the better of the two kept: one that passes QC, else the less
    misaligned (``qc["registration_starts"]`` counts the starts tried). A retry that elastix cannot run
    leaves the first result."""
    data = np.clip(np.asarray(image.dataobj, dtype=np.float32), 0.0, None)
    corrected, head = correct_bias(data, voxel_sizes(image.affine))
    best = _registered(corrected, image.affine, head, ((0.0, 0.0, 0.0),), template)
    starts = len(START_OFFSETS_MM)
    if qc_failure(best.qc):
        starts += len(RETRY_TURNS_DEG) * len(START_OFFSETS_MM)
        try:
            retry = _registered(corrected, image.affine, head, RETRY_TURNS_DEG, template)
        except RegistrationError:
            retry = None
        if retry is not None and _qc_rank(retry.qc) < _qc_rank(best.qc):
            best = retry
    return dataclasses.replace(best, qc={**best.qc, "registration_starts": starts})


def _registered(corrected: np.ndarray, affine: np.ndarray, head: np.ndarray, turns, template: TemplateOnGrid) -> RegisteredScan:
    registration = register_to_template(corrected, affine, head, turns)
    # voxel -> template world: follow the voxel into subject world, then back through the registration
    in_template = np.linalg.inv(registration.matrix) @ affine
    return RegisteredScan(corrected, in_template, registration, *brain_and_qc(corrected, in_template, registration, template))


def _qc_rank(qc: dict) -> tuple[bool, float]:
    """Passing QC first, then the smaller residual misalignment."""
    return bool(qc_failure(qc)), qc["misalignment_mm"]


def brain_and_qc(corrected: np.ndarray, in_template: np.ndarray, registration: Registration,
                 template: TemplateOnGrid) -> tuple[np.ndarray, dict]:
    """Steps 4-6 of a registered scan: its brain on the template's grid and its QC record."""
    brain = normalise_intensity(resample_to_grid(corrected, in_template, template.grid), template.mask)
    misalignment = residual_misalignment_mm(corrected, in_template)
    voxel_ml = template.grid.resolution**3 / 1000.0
    return brain, {
        "registration_metric": round(registration.metric, 4),
        "template_correlation": round(normalised_correlation(brain, template.image, template.brain), 4),
        "misalignment_mm": round(misalignment, 2),
        # the template brain's volume scaled by the registration: the subject's brain volume
        "brain_volume_ml": round(float(template.brain.sum() * voxel_ml * abs(np.linalg.det(registration.matrix))), 1),
        "qc_warning": (f"residual misalignment {misalignment:.1f} mm is above {MAX_MISALIGNMENT_MM:g} mm "
                       "(shifted or rotated off the template)") if misalignment > MAX_MISALIGNMENT_MM else "",
    }


def residual_misalignment_mm(corrected: np.ndarray, in_template: np.ndarray) -> float:
    """The head (``in_template``: voxel to template world) resampled unmasked onto the QC grid, registered
    again to the template rigidly from the identity: how far (mm, mean over the template brain) it moves."""
    qc = template_on_grid(QC_RESOLUTION_MM)
    head = resample_to_grid(corrected, in_template, qc.grid)
    return rigid_misalignment_mm(head, qc.image, qc.mask.astype(np.uint8), qc.grid.affine,
                                 mask_points_mm(qc.brain, qc.grid.affine))


@dataclass(frozen=True)
class ScanJob:
    """One scan of the batch and where its results go."""

    subject: str
    source: str
    output: str
    picture: str
    qc_record: str
    resolution: float
    dtype: str
    on_qc_warning: str = "reject"


@dataclass
class BatchSummary:
    """What a batch did: scans processed now, found done from an earlier run, and failed."""

    out_dir: Path
    processed: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"preprocess: {len(self.processed)} scan(s) processed, {len(self.resumed)} already done, "
                 f"{len(self.failures)} failed -> {self.out_dir}"]
        lines += [f"  FAILED {f['subject']} ({f['file']}): {f['reason']}" for f in self.failures]
        if self.failures:
            lines.append(f"  details: {self.out_dir / 'failures.csv'}")
        return "\n".join(lines)


def preprocess_datalist(datalist: str | os.PathLike, out_dir: str | os.PathLike, resolution: float = DEFAULT_RESOLUTION_MM,
                        dtype: str = "float32", workers: int = 2, on_qc_warning: str = "reject") -> BatchSummary:
    """Preprocess every scan of ``datalist`` into ``out_dir`` (layout in the module docstring).

    Scans whose volume already exists are not redone. A scan that fails (unreadable or unusable file,
    failed registration or QC, ...) is written to failures.csv and left out of the new datalist; the
    others go on. ``on_qc_warning`` "flag" keeps a scan with a QC warning (the reason in qc.csv's
    ``qc_warning``) instead of failing it. Scans run in ``workers`` processes of one ITK thread each (see
    registration.ITK_THREADS).
    """
    out_dir = Path(out_dir)
    _check_options(resolution, dtype, workers, on_qc_warning)
    splits = _read_splits(datalist)
    lock_output_dir(check_output_dir(out_dir))  # before removing partial writes: they may be another run's
    for folder in (out_dir, out_dir / "images", out_dir / "qc"):
        remove_partial_writes(folder)  # temporary files of writes that were killed
    jobs = _scan_jobs(splits, out_dir, float(resolution), dtype, on_qc_warning)
    finished = [job for job in jobs.values() if _is_done(job)]
    todo = [job for job in jobs.values() if job not in finished]
    summary = BatchSummary(out_dir=out_dir, resumed=[job.subject for job in finished])
    for job, failure in _run_jobs(todo, workers):
        if failure:
            summary.failures.append(failure)
        else:
            summary.processed.append(job.subject)
    failed_sources = {f["file"] for f in summary.failures}
    _write_table(out_dir / "failures.csv", summary.failures, FAILURE_COLUMNS)
    done = [job for job in jobs.values() if job.source not in failed_sources]
    _write_table(out_dir / "qc.csv", [json.loads(Path(job.qc_record).read_text()) for job in done], QC_COLUMNS)
    write_datalist(out_dir / "datalist.json", _preprocessed_splits(splits, jobs, failed_sources))
    return summary


def preprocess_command(datalist: str, out_dir: str, resolution: float = DEFAULT_RESOLUTION_MM, dtype: str = "float32",
                       workers: int = 2, on_qc_warning: str = "reject") -> None:
    """Preprocess raw T1 head scans listed in a datalist onto the canonical grid.

    Args:
        datalist: datalist JSON of raw scans (from the ingest commands).
        out_dir: output folder: images/, qc/, qc.csv, failures.csv, datalist.json.
        resolution: canonical grid voxel size in mm (1 -> 192^3, 2 -> 96^3, 4 -> 48^3).
        dtype: float32 or float16 output volumes.
        workers: parallel worker processes.
        on_qc_warning: reject (default: a scan left shifted or rotated off the template fails, with its
            reason and picture in failures.csv) or flag (it is kept; the reason goes to qc.csv's qc_warning).

    Prints a summary; exits with status 1 when any scan failed (the others are still written).
    """
    summary = preprocess_datalist(datalist, out_dir, resolution=resolution, dtype=dtype, workers=workers,
                                  on_qc_warning=on_qc_warning)
    print(summary)
    if summary.failures:
        raise SystemExit(1)


def _check_options(resolution: float, dtype: str, workers: int, on_qc_warning: str) -> None:
    try:
        canonical_grid(resolution)
    except ValueError as err:
        raise InputError(str(err)) from None
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} not supported; use one of {', '.join(DTYPES)}")
    if int(workers) < 1:
        raise InputError(f"workers must be at least 1, not {workers}")
    _check_qc_policy(on_qc_warning)


def _check_qc_policy(on_qc_warning: str) -> None:
    if on_qc_warning not in QC_WARNING_POLICIES:
        raise InputError(f"on_qc_warning must be one of {', '.join(QC_WARNING_POLICIES)}, not {on_qc_warning!r}")


def _read_splits(datalist: str | os.PathLike) -> dict[str, list[dict]]:
    path = Path(datalist)
    if not path.is_file():
        raise InputError(f"{path}: datalist not found")
    try:
        splits = read_datalist(path)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a datalist ({type(err).__name__}: {err})") from None
    if not any(splits.values()):
        raise InputError(f"{path}: datalist lists no scans")
    return splits


def _scan_jobs(splits: dict[str, list[dict]], out_dir: Path, resolution: float, dtype: str,
               on_qc_warning: str) -> dict[str, ScanJob]:
    """One job per distinct image, keyed by image path, named after the subject (and the file for
    subjects with several scans)."""
    images_of: dict[str, set[str]] = {}
    for record in (rec for records in splits.values() for rec in records):
        images_of.setdefault(str(record["subject"]), set()).add(record["image"])
    jobs, owner = {}, {}
    for subject, images in images_of.items():
        for image in sorted(images):
            name = _safe_name(subject if len(images) == 1 else f"{subject}_{_file_stem(image)}")
            if name in owner:
                raise InputError(f"scans {owner[name]} and {image} would both be written as {name}; "
                                 "give them distinct subject ids or file names")
            owner[name] = image
            jobs[image] = ScanJob(
                subject=subject, source=image, output=str(out_dir / "images" / f"{name}.nii.gz"),
                picture=str(out_dir / "qc" / f"{name}.png"), qc_record=str(out_dir / "qc" / f"{name}.json"),
                resolution=resolution, dtype=dtype, on_qc_warning=on_qc_warning)
    return jobs


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _file_stem(path: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", Path(path).name)


def _is_done(job: ScanJob) -> bool:
    """Done when the volume exists (it is written after the QC record, both atomically)."""
    return Path(job.output).is_file() and Path(job.qc_record).is_file()


def _run_jobs(jobs: list[ScanJob], workers: int):
    """Yield (job, failure row or None) as scans finish; in this process when ``workers`` is 1."""
    workers = min(int(workers), max(1, len(jobs)))
    progress = tqdm(total=len(jobs), desc="preprocess", unit="scan", file=sys.stderr)
    if workers == 1:
        for job in jobs:
            yield job, process_scan(job)
            progress.update()
    else:
        # spawn, not fork: forking a process that already runs ITK threads is unsafe
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(process_scan, job): job for job in jobs}
            for future in as_completed(futures):
                job = futures[future]
                try:
                    failure = future.result()
                except Exception as err:  # a worker died (e.g. killed for memory): the scan failed
                    failure = _failure(job, err)
                yield job, failure
                progress.update()
    progress.close()


def process_scan(job: ScanJob) -> dict | None:
    """Preprocess one scan and write its picture, QC record and volume; return a failure row or None.

    Every exception becomes a failure row: one bad scan must not stop a batch of thousands.
    """
    try:
        brain, qc = preprocess_volume(job.source, job.resolution, job.on_qc_warning)
        _picture(job, brain, qc)
        record = {"subject": job.subject, "source": job.source, "output": job.output, **qc}
        with atomic_path(job.qc_record) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        save_nifti(brain, canonical_grid(job.resolution).affine, job.output, dtype=DTYPES[job.dtype])
    except QCError as err:
        _picture(job, err.brain, err.qc, "FAILED QC")
        return {**_failure(job, err), "qc_picture": job.picture}
    except Exception as err:
        return _failure(job, err)
    return None


def _picture(job: ScanJob, brain: np.ndarray, qc: dict, verdict: str = "") -> None:
    title = (f"{job.subject}   r = {qc['template_correlation']:.2f}   off by {qc['misalignment_mm']:.1f} mm   "
             f"{qc['brain_volume_ml']:.0f} ml   {verdict or ('QC WARNING' if qc['qc_warning'] else '')}")
    save_qc_picture(brain, template_on_grid(job.resolution).mask, job.picture, title.strip())


def _failure(job: ScanJob, err: Exception) -> dict:
    reason = str(err) if isinstance(err, InputError) else f"{type(err).__name__}: {err}"
    return {"subject": job.subject, "file": job.source, "reason": " ".join(reason.split()), "qc_picture": ""}


def _write_table(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=list(columns)).to_csv(tmp, index=False)


def _preprocessed_splits(splits: dict[str, list[dict]], jobs: dict[str, ScanJob],
                         failed: set[str]) -> dict[str, list[dict]]:
    return {name: [{**rec, "image": jobs[rec["image"]].output} for rec in records if rec["image"] not in failed]
            for name, records in splits.items()}
