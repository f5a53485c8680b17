#!/usr/bin/env bash
# Does the TGB-GAN at its configs' defaults keep age, over seeds? (issue 13's retention and realism checks)
#
#   benchmarks/tgb_generator_seeds.sh OUT SEED [SEED ...] [-- VARIANT OVERRIDE ...]   # repo root, venv active
#
# Without `--` the GANs are train.json at its defaults, in OUT/gan_sSEED: since bundle 0.6.0 each first trains
# its task branch as a 3D regressor with the GAN's seed (OUT/gan_sSEED/branch_regressor), the judge's recipe,
# so seed 2, the judge's, is refused there. After `--`, VARIANT names a variant and the rest are train.json
# overrides for it, in OUT/gan_VARIANT_sSEED, e.g. the GAN without its task branch, or the branch that learns
# age in the warm-up only (the default before 0.6.0):
#   benchmarks/tgb_generator_seeds.sh runs/tgbseeds 1 -- no_branch --loss#age_weight 0
#   benchmarks/tgb_generator_seeds.sh runs/tgbseeds 0 1 2 -- warmup_branch --real_trained_branch false
#
# Every step is skipped when its output exists, so a killed run resumes with the same command
# (a killed training also resumes from its per-epoch checkpoint):
#   1. the 400-subject 4 mm cohort (simulate-cohort seed 0) and real100.json: the 100 training subjects
#      the augmentation study draws with seed 0, with the cohort's whole validation and test splits;
#   2. the judge: a 3D regressor trained on the GANs' 100 real subjects, seed 2, by the function and the keys
#      train.json's default branch is trained with (custom_components.tgb_gan.branch_regressor,
#      branch_regressor_configs and branch_regressor_overrides: the slice bundle's train.json with this
#      bundle's downstream_regressor3d.json, half the volumes smoothed), so the two recipes cannot drift apart;
#   3. the branch regressor: the judge's recipe with seed 0 (OUT/branch_regressor), for variants whose fixed
#      task branch starts from a real-trained regressor other than the judge:
#        benchmarks/tgb_generator_seeds.sh runs/tgbseeds 0 1 2 -- branch_init \
#            --branch_init_weights runs/tgbseeds/branch_regressor/models/model.pt
#   4. per seed: the GAN (train.json), its reconstructions of the test split
#      (inference.json) and its synthetic volumes (generate.json, 4 per 5-year bin, at most 100), then
#      tgb_age_probes.py, whose report goes to the GAN's folder as probes.txt.
# Training logs go to OUT/*.log. About 6 min per regressor and 20-30 min per GAN on a 2-core CPU
# (run nothing else beside it).
set -euo pipefail
USAGE="usage: $0 OUT SEED [SEED ...] [-- VARIANT OVERRIDE ...]"
OUT=${1:?$USAGE}
shift
SEEDS=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do SEEDS+=("$1"); shift; done
[ ${#SEEDS[@]} -gt 0 ] || { echo "$USAGE" >&2; exit 2; }
PREFIX=gan_
OVERRIDES=()
JUDGE_SEED=2
if [ $# -gt 0 ]; then
    shift
    [ $# -gt 0 ] || { echo "$USAGE" >&2; exit 2; }
    PREFIX=gan_$1_
    shift
    OVERRIDES=("$@")
else
    for SEED in "${SEEDS[@]}"; do
        [ "$SEED" != "$JUDGE_SEED" ] || { echo "$0: seed $JUDGE_SEED is the judge's: at the defaults the GAN's branch" \
            "would be trained as the judge is, and the judge would score its own branch; use other seeds" >&2; exit 2; }
    done
fi
TGB=bundles/tgb_gan_augment/configs
COHORT=$OUT/cohort400
DATALIST=$OUT/real100.json
mkdir -p "$OUT"

[ -f "$COHORT/datalist.json" ] || python -m data_prep simulate-cohort --n 400 --out "$COHORT" --resolution 4 --seed 0
[ -f "$DATALIST" ] || python -c "import sys
from custom_components.tgb_gan.augmentation_study import write_training_subset
write_training_subset(sys.argv[1], 100, 0, sys.argv[2])" "$COHORT/datalist.json" "$DATALIST"

real_regressor() {  # ROOT SEED: the 3D regressor on the 100 real subjects, trained as train.json's default branch is
    [ -f "$1/models/checkpoint_last.pt" ] || python -c "import sys
from monai.bundle import ConfigParser
from custom_components.tgb_gan.branch_regressor import train_branch_regressor
gan = ConfigParser()
gan.read_config(sys.argv[1])
train_branch_regressor(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]),
                       gan.get_parsed_content('branch_regressor_configs'), gan.get_parsed_content('branch_regressor_overrides'))" \
        "$TGB/train.json" "$1" "$COHORT" "$DATALIST" "$2" > "$1.log" 2>&1
}
JUDGE=$OUT/judge
real_regressor "$JUDGE" "$JUDGE_SEED"
real_regressor "$OUT/branch_regressor" 0

for SEED in "${SEEDS[@]}"; do
    R=$OUT/${PREFIX}s$SEED
    DATA=(--bundle_root "$R" --dataset_dir "$COHORT" --datalist_file "$DATALIST")
    [ -f "$R/models/checkpoint_last.pt" ] || python -m monai.bundle run --config_file "$TGB/train.json" \
        "${DATA[@]}" --seed "$SEED" "${OVERRIDES[@]}" > "$R.log" 2>&1
    COMMON=("${DATA[@]}" --model_file "$R/models/checkpoint_last.pt")
    [ -f "$R/eval/synthetic/datalist.json" ] || {
        python -m monai.bundle run --config_file "$TGB/inference.json" "${COMMON[@]}"
        python -m monai.bundle run --config_file "['$TGB/inference.json','$TGB/generate.json']" "${COMMON[@]}" \
            --synthesis#target_per_bin 4 --synthesis#max_synthetic 100
    }
    python benchmarks/tgb_age_probes.py --judge "$JUDGE/models/model.pt" --datalist "$DATALIST" --gan_root "$R" \
        | tee "$R/probes.txt"
done
