#!/usr/bin/env bash
# Does the TGB-GAN at its configs' defaults keep age, over seeds? (issue 13's retention and realism checks)
#
#   benchmarks/tgb_generator_seeds.sh OUT SEED [SEED ...]     # repo root, the project's venv active
#
# Every step is skipped when its output exists, so a killed run resumes with the same command
# (a killed training also resumes from its per-epoch checkpoint):
#   1. the 400-subject 4 mm cohort (simulate-cohort seed 0) and real100.json: the 100 training subjects
#      the augmentation study draws with seed 0, with the cohort's whole validation and test splits;
#   2. two judges, 3D regressors trained with half their volumes smoothed (slice bundle train.json + tgb
#      downstream_regressor3d.json, seed 2, augment_blur_prob 0.5): judge100 on the GANs' 100 real
#      subjects, judge280 on the cohort's whole training split (a sharper reader); neither saw the test split;
#   3. per seed: the GAN (train.json at its defaults), its reconstructions of the test split
#      (inference.json) and its synthetic volumes (generate.json, 4 per 5-year bin, at most 100), then
#      tgb_age_probes.py with each judge, whose reports go to OUT/gan_sSEED/probes_JUDGE.txt.
# Training logs go to OUT/*.log. About 5 and 14 min for the judges and 30 min per GAN on a 2-core CPU
# (run nothing else beside it).
set -euo pipefail
OUT=${1:?usage: $0 OUT SEED [SEED ...]}
shift
[ $# -gt 0 ] || { echo "usage: $0 OUT SEED [SEED ...]" >&2; exit 2; }
TGB=bundles/tgb_gan_augment/configs
SLICE=bundles/slice_cnn_brainage/configs
COHORT=$OUT/cohort400
DATALIST=$OUT/real100.json
mkdir -p "$OUT"

[ -f "$COHORT/datalist.json" ] || python -m data_prep simulate-cohort --n 400 --out "$COHORT" --resolution 4 --seed 0
[ -f "$DATALIST" ] || python -c "import sys
from custom_components.tgb_gan.augmentation_study import write_training_subset
write_training_subset(sys.argv[1], 100, 0, sys.argv[2])" "$COHORT/datalist.json" "$DATALIST"

declare -A JUDGES=([judge100]=$DATALIST [judge280]=$COHORT/datalist.json)
for J in judge100 judge280; do
    [ -f "$OUT/$J/models/checkpoint_last.pt" ] || python -m monai.bundle run \
        --config_file "['$SLICE/train.json','$TGB/downstream_regressor3d.json']" --bundle_root "$OUT/$J" \
        --dataset_dir "$COHORT" --datalist_file "${JUDGES[$J]}" --seed 2 --augment_blur_prob 0.5 > "$OUT/$J.log" 2>&1
done

for SEED in "$@"; do
    R=$OUT/gan_s$SEED
    DATA=(--bundle_root "$R" --dataset_dir "$COHORT" --datalist_file "$DATALIST")
    [ -f "$R/models/checkpoint_last.pt" ] || python -m monai.bundle run --config_file "$TGB/train.json" \
        "${DATA[@]}" --seed "$SEED" > "$OUT/gan_s$SEED.log" 2>&1
    COMMON=("${DATA[@]}" --model_file "$R/models/checkpoint_last.pt")
    [ -f "$R/eval/synthetic/datalist.json" ] || {
        python -m monai.bundle run --config_file "$TGB/inference.json" "${COMMON[@]}"
        python -m monai.bundle run --config_file "['$TGB/inference.json','$TGB/generate.json']" "${COMMON[@]}" \
            --synthesis#target_per_bin 4 --synthesis#max_synthetic 100
    }
    for J in judge100 judge280; do
        python benchmarks/tgb_age_probes.py --judge "$OUT/$J/models/model.pt" --datalist "$DATALIST" --gan_root "$R" \
            | tee "$R/probes_$J.txt"
    done
done
