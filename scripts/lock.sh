#!/usr/bin/env bash
# Write constraints.txt: the versions installed in .venv, i.e. what CI just passed with. Run it after a green CI on a
# newer stack (FEDLM_UNLOCKED=1 bash scripts/setup.sh installs the newest that requirements.txt allows).
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# The versions CI passed with (.ci/run on $(git log -1 --format=%h)); scripts/setup.sh installs with them as pip"
  echo "# constraints, so a fresh clone gets the stack that was tested. Refresh: bash scripts/lock.sh"
  # torch's local label (+cpu) names the wheel's build, not its version; ruff is pinned in scripts/setup.sh
  .venv/bin/python -m pip freeze --exclude-editable | grep -v '^#' | sed 's/^torch==\(.*\)+.*$/torch==\1/' | grep -v '^ruff=='
} > constraints.txt
