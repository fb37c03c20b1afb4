"""What a round costs as clients grow: round time, peak memory and bytes exchanged, from real ``fedlm fit`` runs.

Each run is ``fedlm fit`` on Financial PhraseBank (``--fpb-dir`` or ``FEDLM_FPB_DIR``; never commit it) with the
shipped layout, split IID over CLIENTS clients of which SAMPLED take part in each round, on RANKS processes
(torchrun, gloo). A run is given as ``CLIENTS:SAMPLED`` or ``CLIENTS:SAMPLED:RANKS``; ``--rolled-back`` repeats
some with ``federation.skip_unsampled: false`` (every client runs and the unsampled ones roll back), the path
pinned clients take. The model is a tiny random Llama with SmolLM2's tokenizer (``--model tiny``, shallow prompts
without the prefix cache: with it, a tiny model's round is mostly the cache filling for sentences it has not seen,
which depends on how many distinct sentences a client holds, not on the federation) or SmolLM2 itself with the
shipped layout (``--model smollm2``). Every run is measured in this one invocation, one after another:

    python benchmarks/scale.py --runs 3:3 16:3 100:3 1000:3 16:3:2 100:3:2 1000:3:2 16:3:4 100:3:4 1000:3:4 \
        10:10 1000:10 --rolled-back 16:3 100:3
    python benchmarks/scale.py --model smollm2 --runs 1:1 16:16 16:3 --rounds 3

Round time: the loop's compute + communication seconds of a round, median over the rounds after the first (which
also fills the prefix cache). Peak memory: the largest resident set of any process of the run (a rank).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ROUND_LINE = re.compile(r"\[fedlm\] round (\d+)/\d+: .*\| compute ([\d.]+)s comm ([\d.]+)s \| ([\d.]+) MB exchanged")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fpb-dir", default=os.environ.get("FEDLM_FPB_DIR"), help="FinancialPhraseBank-v1.0 folder")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--runs", nargs="+", default=["3:3", "16:3", "100:3", "1000:3"], help="CLIENTS:SAMPLED[:RANKS]")
    parser.add_argument("--rolled-back", nargs="*", default=[], help="runs to repeat with skip_unsampled: false")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache-dir", default=None, help="model.cache.dir for SmolLM2 (e.g. runs/prefix_cache)")
    parser.add_argument("--cache-budget-mb", type=float, default=None, help="model.cache.budget_mb of every run")
    parser.add_argument("--state-budget-mb", type=float, default=None, help="federation.client_state_budget_mb")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "RANKS"), help=argparse.SUPPRESS)  # internal
    return parser.parse_args()


def tiny_backbone(folder: Path) -> str:
    """A 2-layer Llama of width 64 with SmolLM2's tokenizer (so the template and label words are the real ones)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlm.model.backbone import load_backbone

    tokenizer = load_backbone().tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run_config(args: argparse.Namespace, backbone: str, clients: int, sampled: int, skip: bool, root: Path) -> dict:
    """The shipped federated config's model and data, cut down to timed rounds: no validation, test or logs."""
    shipped = yaml.safe_load((REPO / "configs" / "fpb_federated.yaml").read_text())
    model = {**shipped["model"], "backbone": backbone}
    if args.model == "tiny":  # shallow and uncached: a step costs the same whichever sentences it sees
        model = {**model, "cache": {"prefix": False}, "encoder": {**model["encoder"], "deep": False, "init_text": None}}
    elif args.cache_dir:
        model["cache"] = {**model["cache"], "dir": args.cache_dir}
    if args.cache_budget_mb is not None:
        model["cache"] = {**model["cache"], "budget_mb": args.cache_budget_mb}
    data = shipped["data"]
    data["init_args"] = {**data["init_args"], "path": args.fpb_dir, "batch_size": args.batch_size}
    return {
        "seed_everything": 1234,
        "model": {**model, "optimizer": {**model["optimizer"], "warmup_steps": 0}},
        "data": data,
        "federation": {
            "clients": clients, "rounds": args.rounds, "local_steps": args.local_steps, "weighting": "samples",
            "seed": 1234, "client_fraction": sampled / clients, "skip_unsampled": skip,
            "client_state_budget_mb": args.state_budget_mb,
        },
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "default_root_dir": str(root),
        },
    }  # fmt: skip


def measure_one(config: str, ranks: int) -> None:
    """Internal: one fit in a child process, so that the peak resident set is this run's alone."""
    if ranks == 1:
        command = [sys.executable, "-m", "fedlm", "fit", "--config", config]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   "-m", "fedlm", "fit", "--config", config]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    sys.stdout.write(result.stdout + result.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux: the largest descendant
    print(f"[scale] rc {result.returncode} peak_kib {peak}")


def measure(config: dict, ranks: int, folder: Path) -> dict:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, __file__, "--one", str(path), str(ranks)]
    output = subprocess.run(command, capture_output=True, text=True, cwd=REPO).stdout
    rounds = [(int(r), float(c) + float(m), float(mb)) for r, c, m, mb in ROUND_LINE.findall(output)]
    status = re.search(r"\[scale\] rc (\d+) peak_kib (\d+)", output)
    if status is None or status.group(1) != "0" or not rounds:
        tail = "\n".join(output.splitlines()[-30:])
        raise RuntimeError(f"the run in {folder} failed:\n{tail}")
    later = [seconds for index, seconds, _ in rounds if index > 1] or [rounds[0][1]]
    return {"round_s": statistics.median(later), "peak_gib": int(status.group(2)) / 2**20, "mb": rounds[-1][2]}


def spec(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(":")]
    return parts[0], parts[1], parts[2] if len(parts) > 2 else 1


def main() -> None:
    args = parse_args()
    if args.one:
        measure_one(args.one[0], int(args.one[1]))
        return
    if not args.fpb_dir:
        sys.exit("give --fpb-dir or set FEDLM_FPB_DIR")
    planned = [(*spec(s), True) for s in args.runs] + [(*spec(s), False) for s in args.rolled_back]
    with tempfile.TemporaryDirectory(prefix="fedlm-scale-") as scratch:
        root = Path(scratch)
        backbone = tiny_backbone(root / "tiny") if args.model == "tiny" else "smollm2-135m-instruct"
        rows = []
        for clients, sampled, ranks, skip in planned:
            folder = root / f"{clients}-{sampled}-{ranks}-{'spread' if skip else 'rolled'}"
            folder.mkdir()
            figures = measure(run_config(args, backbone, clients, sampled, skip, folder), ranks, folder)
            rows.append((clients, sampled, ranks, skip, figures))
            print(f"[scale] {clients} clients, {sampled} sampled, {ranks} rank(s), "
                  f"{'sampled only' if skip else 'rolled back'}: {figures}", flush=True)  # fmt: skip
    first = rows[0][4]
    budgets = f"; budgets: prefix cache {args.cache_budget_mb} MB, client states {args.state_budget_mb} MB"
    steps = f"{args.rounds} rounds of {args.local_steps} local steps of {args.batch_size}"
    print(f"\nModel {args.model}, {steps}{budgets}.\n")
    print("| clients | sampled | ranks | unsampled clients | round time (s) | vs first row | peak memory (GiB) | "
          "vs first row | MB exchanged per round |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for clients, sampled, ranks, skip, f in rows:
        print(f"| {clients} | {sampled} | {ranks} | {'do not run' if skip else 'run, roll back'} | {f['round_s']:.3f} "
              f"| {f['round_s'] / first['round_s']:.2f}x | {f['peak_gib']:.2f} | "
              f"{f['peak_gib'] - first['peak_gib']:+.2f} | {f['mb']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
