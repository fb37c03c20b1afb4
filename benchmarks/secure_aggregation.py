"""What secure aggregation costs per round: a plain all-reduce vs fedlm's masked one, on the payload a round sends.

Spawns ``--ranks`` processes on gloo (one per client, as ``torchrun --nproc_per_node=3`` runs the main job). Each
process sums a float32 vector of ``--elements`` values (default: the default MLP encoder's 596,672 parameters plus
the round's bookkeeping slots) ``--repeats`` times each way, interleaved (plain, secure, plain, ...), after one
warm-up each; secure includes encoding, the pairwise ChaCha20 masks, the int64 all-reduce and decoding. The key
agreement, once per run, is timed apart. Rank 0 prints median and range per way and the median ratio, secure/plain
(paired within a repeat). Both ways sum the same vectors; the decoded secure sum is checked against the plain one.

    python benchmarks/secure_aggregation.py [--ranks 3] [--elements 596686] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fedlm.federation.secure import SecureAggregationConfig, SecureAggregator


def worker(rank: int, world: int, port: int, elements: int, repeats: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    vector = torch.randn(elements, generator=torch.Generator().manual_seed(rank)) * 0.01
    start = time.perf_counter()
    aggregator = SecureAggregator(SecureAggregationConfig(enabled=True))
    aggregator.setup()
    setup_seconds = time.perf_counter() - start

    def plain() -> torch.Tensor:
        summed = vector.clone()
        dist.all_reduce(summed)
        return summed

    timings: dict[str, list[float]] = {"plain": [], "secure": []}
    for round_index in range(repeats + 1):  # round 0 warms both up
        for way, run in (
            ("plain", plain),
            ("secure", lambda round_index=round_index: aggregator.sum(vector, round_index)),
        ):
            dist.barrier()
            start = time.perf_counter()
            result = run()
            if round_index > 0:
                timings[way].append(time.perf_counter() - start)
            if way == "secure":
                difference = float((result.float() - plain()).abs().max())
                assert difference < world * 2.0**-23, f"secure sum differs from the plain one by {difference}"
    if rank == 0:
        print(
            f"{world} ranks on gloo, {elements:,} float32 values ({elements * 4 / 1e6:.2f} MB) per rank, "
            f"{repeats} repeats"
        )
        print(f"key agreement (once per run): {setup_seconds * 1000:.1f} ms")
        for way, values in timings.items():
            print(
                f"{way:>6}: median {statistics.median(values) * 1000:7.1f} ms  "
                f"(range {min(values) * 1000:.1f}-{max(values) * 1000:.1f})"
            )
        ratios = [s / p for p, s in zip(timings["plain"], timings["secure"])]
        print(f"secure / plain: median {statistics.median(ratios):.1f}x (range {min(ratios):.1f}-{max(ratios):.1f}x)")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--elements", type=int, default=596_686)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()
    mp.spawn(worker, args=(args.ranks, args.port, args.elements, args.repeats), nprocs=args.ranks)


if __name__ == "__main__":
    main()
