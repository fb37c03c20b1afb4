#!/usr/bin/env bash
# The algorithm comparison of results/algorithms.md: FedAvg, FedProx, FedAdam, split prompts and table averaging,
# each with local fine-tuning after the last round, on the Dirichlet(0.5) split over 3 clients and the
# agreement split over 4, SmolLM2 (the default), seed 1234. A run whose test_metrics.json exists is kept, so the
# same command resumes. Then:  python -m fedlm.experiment.algorithms runs/algorithms --out results/algorithms.md
#   FEDLM_FPB_DIR=../shared/data/FinancialPhraseBank-v1.0 bash scripts/algorithms.sh [runs/algorithms]
# PARTITIONS and ALGORITHMS (space-separated) pick a subset of the grid. The robust rules against one hostile
# client, on the agreement split (the section "agreement, client 0 poisoned" of results/algorithms.md):
#   PARTITIONS=agreement ALGORITHMS="fedavg fedavg+poisoned median+poisoned trimmed_mean+poisoned
#     norm_bound+poisoned" bash scripts/algorithms.sh runs/robust
#   python -m fedlm.experiment.algorithms runs/robust --out results/algorithms.md --section "agreement, client 0 poisoned"
set -euo pipefail
out=${1:-runs/algorithms}
fedlm=${FEDLM:-fedlm}
for partition in ${PARTITIONS:-dirichlet agreement}; do
  for algorithm in ${ALGORITHMS:-fedavg fedprox fedadam split_prompts table_average}; do
    folder=$out/$partition/$algorithm
    if [[ -f $folder/logs/version_0/test_metrics.json ]]; then echo "[algorithms] $folder: done before, kept"; continue; fi
    rm -rf "$folder" && mkdir -p "$folder"
    # a name joins configs with "+" (median+poisoned): configs/algorithms/<part>.yaml each, fedavg none
    extra=()
    IFS=+ read -ra parts <<< "$algorithm"
    for part in "${parts[@]}"; do
      [[ $part == fedavg ]] || extra+=(--config "configs/algorithms/$part.yaml")
    done
    echo "[algorithms] $folder: running, log $folder/output.log"
    # the shallow layout: the one results/algorithms.md was measured with
    $fedlm fit --config configs/fpb_federated.yaml --config configs/layouts/shallow_cached.yaml \
      --config "configs/partitions/$partition.yaml" "${extra[@]}" \
      --config configs/algorithms/finetune.yaml --trainer.check_val_every_n_epoch 19 \
      --trainer.default_root_dir "$folder" --trainer.enable_progress_bar false \
      --trainer.logger "{\"class_path\": \"lightning.pytorch.loggers.CSVLogger\", \"init_args\": {\"save_dir\": \"$folder\", \"name\": \"logs\", \"version\": 0}}" \
      > "$folder/output.log" 2>&1
  done
done
