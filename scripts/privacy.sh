#!/usr/bin/env bash
# The privacy grid of results/privacy.md: the blog's 3-client IID split on SmolLM2, one process per client
# (torchrun on gloo, so that secure aggregation really masks what crosses process boundaries), at each client-level
# DP budget (none, epsilon 8, 4, 1 at delta 1e-5), without and with secure aggregation. The noise is seeded
# (federation.dp.noise_seed) so that each pair of runs with and without secure aggregation draws the same noise
# and differs only by the fixed-point rounding; a deployment leaves noise_seed null. A run whose
# test_metrics.json exists is kept, so the same command resumes. Then:
#   python -m fedlm.experiment.privacy runs/privacy --out results/privacy.md
#   FEDLM_FPB_DIR=../shared/data/FinancialPhraseBank-v1.0 bash scripts/privacy.sh [runs/privacy]
# EPSILONS ("none 8 4 1") and AGGREGATIONS ("plain secure") pick a subset of the grid; two controls are not in it
# by default: EPSILONS=clip (clipping to the same bound, no noise: what clipping alone costs) and larger budgets
# such as EPSILONS=100 (to see where learning would come back).
set -euo pipefail
out=${1:-runs/privacy}
torchrun=${TORCHRUN:-torchrun}
for aggregation in ${AGGREGATIONS:-plain secure}; do
  for epsilon in ${EPSILONS:-none 8 4 1}; do
    folder=$out/$aggregation/epsilon_$epsilon
    if [[ -f $folder/logs/version_0/test_metrics.json ]]; then echo "[privacy] $folder: done before, kept"; continue; fi
    rm -rf "$folder" && mkdir -p "$folder"
    extra=()
    if [[ $epsilon == clip ]]; then
      extra+=(--config configs/privacy/dp_epsilon8.yaml --federation.dp '{"target_epsilon": null, "noise_multiplier": 0.0}')
    elif [[ $epsilon != none ]]; then
      extra+=(--config configs/privacy/dp_epsilon8.yaml --federation.dp.target_epsilon "$epsilon" --federation.dp.noise_seed 1234)
    fi
    [[ $aggregation == secure ]] && extra+=(--config configs/privacy/secure_aggregation.yaml)
    echo "[privacy] $folder: running, log $folder/output.log"
    # the shallow layout: the one results/privacy.md was measured with
    $torchrun --standalone --nproc_per_node=3 -m fedlm fit --config configs/fpb_federated.yaml \
      --config configs/layouts/shallow_cached.yaml "${extra[@]}" \
      --trainer.check_val_every_n_epoch 19 --trainer.default_root_dir "$folder" --trainer.enable_progress_bar false \
      --trainer.logger "{\"class_path\": \"lightning.pytorch.loggers.CSVLogger\", \"init_args\": {\"save_dir\": \"$folder\", \"name\": \"logs\", \"version\": 0}}" \
      > "$folder/output.log" 2>&1
  done
done
