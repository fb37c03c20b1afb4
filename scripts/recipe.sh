#!/usr/bin/env bash
# The recipe search of results/recipe.md: centralized fits of SmolLM2 on the all-agree split, one per setting and
# seed, every one calibrating (model.task.calibrate: macro_f1, which changes no training step) so that the split-half
# value of calibration comes for free. Settings are chosen on validation only: the table is built from metrics.csv
# (python -m fedlm.experiment.recipe runs/recipe --out results/recipe.md), never from a test file. A run whose
# metrics.csv has its last validation is kept, so the same command resumes.
#   FEDLM_FPB_DIR=../shared/data/FinancialPhraseBank-v1.0 bash scripts/recipe.sh [runs/recipe]
# SETTINGS picks a subset of the names below, SEEDS the seeds (default 1234). The runs share the prefix cache on
# disk (PREFIX_CACHE, default runs/prefix_cache, ~3 GiB), so only the first computes the sentences' key/values.
set -euo pipefail
out=${1:-runs/recipe}
# Every setting spells out what it changes from the recipe that preceded the search (constant lr after 20 warm-up
# steps, no decay or clipping, the answer tokens' loss, the shallow cached layout), so it means the same whatever
# configs/fpb_centralized.yaml ships (it ships the chosen recipe, cosine_labelwords, with deep_after_mlp_lr1e-2's
# layout).
before="--config configs/layouts/shallow_cached.yaml --model.optimizer.lr_schedule constant --model.optimizer.final_lr_fraction 0.0 --model.optimizer.weight_decay 0.0 --trainer.gradient_clip_val null --model.task.loss answer_tokens"
nemo="--model.optimizer.lr_schedule cosine --model.optimizer.final_lr_fraction 0.1 --model.optimizer.weight_decay 0.01 --trainer.gradient_clip_val 1.0"
declare -A flags=(
  [base]="$before"                                                # the configs before the search
  [cosine]="$before $nemo"                                        # NeMo's p-tuning schedule, clipping, decay
  [cosine_labelwords]="$before $nemo --model.task.loss label_words"    # the chosen recipe
  [cosine_labelwords_20tok]="$before $nemo --model.task.loss label_words --model.encoder.virtual_tokens 20"
  [cosine_labelwords_hidden1024]="$before $nemo --model.task.loss label_words --model.encoder.hidden_size 1024"
  [cosine_labelwords_lr3e-3]="$before $nemo --model.task.loss label_words --model.optimizer.lr 0.003"
  [cosine_labelwords_4ep]="$before $nemo --model.task.loss label_words --trainer.max_epochs 4 --model.optimizer.warmup_steps 40"
  [cosine_labelwords_4ep_20tok]="$before $nemo --model.task.loss label_words --trainer.max_epochs 4 --model.optimizer.warmup_steps 40 --model.encoder.virtual_tokens 20"
  # Deep prompts (configs/layouts/): slots after the cached sentence, or first (P-tuning v2), on the chosen recipe
  [deep_after]="$before $nemo --model.task.loss label_words --config configs/layouts/deep_after_text.yaml"
  [deep_after_lr3e-3]="$before $nemo --model.task.loss label_words --config configs/layouts/deep_after_text.yaml --model.optimizer.lr 0.003"
  [deep_after_lr1e-2]="$before $nemo --model.task.loss label_words --config configs/layouts/deep_after_text.yaml --model.optimizer.lr 0.01"
  [deep_after_lr3e-2]="$before $nemo --model.task.loss label_words --config configs/layouts/deep_after_text.yaml --model.optimizer.lr 0.03"
  [deep_after_mlp_lr1e-2]="$before $nemo --model.task.loss label_words --config configs/layouts/deep_after_text.yaml --model.encoder.type mlp --model.optimizer.lr 0.01"
  [deep_before_lr1e-2]="$before $nemo --model.task.loss label_words --config configs/layouts/deep_before_text.yaml --model.optimizer.lr 0.01 --model.cache.dir null"  # nothing to cache
)
for setting in ${SETTINGS:-base cosine_labelwords cosine_labelwords_lr3e-3 cosine_labelwords_4ep}; do
  [[ -v flags[$setting] ]] || { echo "unknown setting $setting; known: ${!flags[*]}" >&2; exit 2; }
  for seed in ${SEEDS:-1234}; do
    folder=$out/$setting/seed$seed
    if [[ -f $folder/done ]]; then echo "[recipe] $folder: done before, kept"; continue; fi
    rm -rf "$folder" && mkdir -p "$folder"
    echo "[recipe] $folder: running, log $folder/output.log"
    # shellcheck disable=SC2086
    .venv/bin/fedlm fit --config configs/fpb_centralized.yaml --model.cache.dir "${PREFIX_CACHE:-runs/prefix_cache}" \
      ${flags[$setting]} --model.task.calibrate macro_f1 \
      --seed_everything "$seed" --data.init_args.shuffle_seed "$seed" --test_after_fit false \
      --trainer.default_root_dir "$folder" --trainer.enable_progress_bar false \
      --trainer.logger "{\"class_path\": \"lightning.pytorch.loggers.CSVLogger\", \"init_args\": {\"save_dir\": \"$folder\", \"name\": \"logs\", \"version\": 0}}" \
      > "$folder/output.log" 2>&1
    touch "$folder/done"
  done
done
