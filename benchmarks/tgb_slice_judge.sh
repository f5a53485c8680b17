#!/usr/bin/env bash
# A judge of another architecture for the GANs of benchmarks/tgb_generator_seeds.sh: the slice network
# (slice bundle train.json, seed 1) on the same 100 real subjects, scoring x_test, x_test smoothed by a
# Gaussian of sigma 0.5 and 1 voxel (does it read sharpness as age?), and each GAN's G(x_test) and
# synthetic volumes (retention and realism against its MAE on x_test).
#
#   benchmarks/tgb_slice_judge.sh OUT [BLUR_PROB]   # repo root, venv active; OUT as given to tgb_generator_seeds.sh
#
# BLUR_PROB (default 0.5) is the judge's augment_blur_prob; the judge lives in OUT/slice_judge_blurBLUR_PROB,
# its report in summary.txt there. Steps whose output exists are skipped (a scored set only while it is newer
# than what it scored, so a retrained GAN folder is rescored). About 5-6 min of training and
# 20 s per scored set on a 2-core CPU.
set -euo pipefail
OUT=${1:?usage: $0 OUT [BLUR_PROB]}
BLUR=${2:-0.5}
[ -f "$OUT/real100.json" ] || { echo "$OUT/real100.json not found: run benchmarks/tgb_generator_seeds.sh $OUT SEED first" >&2; exit 2; }
SLICE=bundles/slice_cnn_brainage/configs
SJ=$OUT/slice_judge_blur$BLUR
# The judge keeps the slice recipe its figures were measured with (precise batch norm from 8 augmented batches,
# the slice bundle's default before 0.4.0; no fixed input smoothing, its default before 0.5.0), like the tgb
# branch and 3D judge (train.json's branch_regressor_overrides).
COMMON=(--dataset_dir "$OUT/cohort400" --bundle_root "$SJ" --seed 1 --augment_blur_prob "$BLUR"
        --input_smoothing_sigma 0 --precise_bn_augmented true --precise_bn_batches 8)
EVAL=(python -m monai.bundle run --config_file "['$SLICE/train.json','$SLICE/evaluate.json']" "${COMMON[@]}")
mkdir -p "$SJ"
[ -f "$SJ/models/checkpoint_last.pt" ] || python -m monai.bundle run --config_file "$SLICE/train.json" \
    "${COMMON[@]}" --datalist_file "$OUT/real100.json" > "$SJ.log" 2>&1
[ -f "$SJ/eval/test_predictions.csv" ] || "${EVAL[@]}" --datalist_file "$OUT/real100.json" >> "$SJ.log" 2>&1

report() {  # METRICS_JSON NAME [REFERENCE_JSON]: one line; with a reference, the ratio of the two MAEs
    python -c "import json, sys
m = json.load(open(sys.argv[1]))
ratio = f'  ({m[\"mae\"] / json.load(open(sys.argv[3]))[\"mae\"]:.2f}x x)' if len(sys.argv) > 3 else ''
print(f'{sys.argv[2]:40s} n {m[\"n\"]:3d}  MAE {m[\"mae\"]:6.2f}  mean gap {m[\"mean_gap\"]:+6.2f}  r {m[\"pearson_r\"]:.3f}{ratio}')" "$@"
}

score() {  # DATALIST SPLIT OUTPUT_DIR NAME: the judge on one split, against its MAE on x_test
    [ "$3/$2_metrics.json" -nt "$1" ] || "${EVAL[@]}" --datalist_file "$1" --eval_split "$2" --output_dir "$3" >> "$SJ.log" 2>&1
    report "$3/$2_metrics.json" "$4" "$SJ/eval/test_metrics.json"
}

SMOOTHED=$OUT/smoothed_test.json
[ -f "$SMOOTHED" ] || python - "$OUT/real100.json" "$OUT/smoothed_test" "$SMOOTHED" <<'PY'
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from brainage_core.datalist import read_datalist, write_datalist

splits, folder = read_datalist(sys.argv[1]), Path(sys.argv[2])
out = {"training": splits["training"]}
for sigma in (0.5, 1.0):
    (folder / f"sigma{sigma}").mkdir(parents=True, exist_ok=True)
    out[f"sigma{sigma}"] = []
    for record in splits["test"]:
        image, path = nib.load(record["image"]), folder / f"sigma{sigma}" / Path(record["image"]).name
        nib.save(nib.Nifti1Image(gaussian_filter(image.get_fdata(dtype=np.float32), sigma), image.affine), path)
        out[f"sigma{sigma}"].append({**record, "image": str(path.resolve())})
write_datalist(sys.argv[3], out)
PY

{
    report "$SJ/eval/test_metrics.json" "x (real test volumes)"
    for SIGMA in 0.5 1.0; do score "$SMOOTHED" "sigma$SIGMA" "$SJ/qc_smoothed" "x smoothed, sigma $SIGMA voxel"; done
    for R in "$OUT"/gan_*/; do
        G=$(basename "$R")
        [ -f "$R/eval/synthetic/datalist.json" ] || continue
        # rebuilt (and rescored) when the GAN's synthesis is newer: a retrained folder is never read stale
        [ "$SJ/qc_$G.json" -nt "$R/eval/synthetic/datalist.json" ] || python - "$OUT/real100.json" "$R" "$SJ/qc_$G.json" <<'PY'
import sys
from pathlib import Path

from brainage_core.datalist import read_datalist, synthetic_records, write_datalist
from custom_components.tgb_gan.augmentation_study import reconstruction_records

splits, root = read_datalist(sys.argv[1]), Path(sys.argv[2])
synthetic = synthetic_records(root / "eval" / "synthetic" / "datalist.json")
write_datalist(sys.argv[3], {"training": splits["training"], "recon": reconstruction_records(root, splits["test"]),
                             "synthetic": synthetic})
PY
        score "$SJ/qc_$G.json" recon "$SJ/qc_$G" "$G: G(x), retention"
        score "$SJ/qc_$G.json" synthetic "$SJ/qc_$G" "$G: synthetic, realism"
    done
} | tee "$SJ/summary.txt"
