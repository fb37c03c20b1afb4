"""One rank of a secure-aggregation run under torchrun (gloo): save what it summed, got back and transmitted.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=N secure_worker.py OUT_DIR
Writes OUT_DIR/rank{R}.pt. ``torch.distributed.all_reduce`` and ``all_gather`` are wrapped to record a copy of
what this rank handed them, then the real collectives run. The private key is recorded as it is generated, so
the test can check that it never travels.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fedlm.federation import secure
from fedlm.federation.secure import SecureAggregationConfig, SecureAggregator

SIZES = (1000, 37)  # two calls per round, so that two calls in one round must get different masks


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    record: dict = {"rank": rank, "world": world}

    # gloo's SUM on int64 must wrap modulo 2**64, as the masks rely on
    extremes = torch.tensor([2**62, 2**63 - 1, -(2**63), 12345 - rank], dtype=torch.int64)
    record["wrap_input"] = extremes.clone()
    dist.all_reduce(extremes)
    record["wrap_output"] = extremes

    sent: list[torch.Tensor] = []
    gathered: list[torch.Tensor] = []
    real_all_reduce, real_all_gather = dist.all_reduce, dist.all_gather

    def recording_all_reduce(tensor, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        sent.append(tensor.detach().clone())
        return real_all_reduce(tensor, *args, **kwargs)

    def recording_all_gather(output, tensor, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        gathered.append(tensor.detach().clone())
        return real_all_gather(output, tensor, *args, **kwargs)

    private_keys = []
    real_keys = secure.X25519PrivateKey

    class RecordingKeys:
        @staticmethod
        def generate():  # noqa: ANN205
            key = real_keys.generate()
            private_keys.append(key.private_bytes_raw())
            return key

    dist.all_reduce, dist.all_gather = recording_all_reduce, recording_all_gather
    secure.X25519PrivateKey = RecordingKeys
    try:
        aggregator = SecureAggregator(SecureAggregationConfig(enabled=True, fractional_bits=24))
        aggregator.setup()
    finally:
        secure.X25519PrivateKey = real_keys

    rounds = []
    for round_index in range(2):
        generator = torch.Generator().manual_seed(1000 * rank + round_index)
        inputs = [torch.randn(n, dtype=torch.float64, generator=generator) * 10 for n in SIZES]
        outputs = [aggregator.sum(x, round_index) for x in inputs]
        rounds.append({"inputs": inputs, "outputs": outputs})
    record["rounds"] = rounds
    record["sent"] = list(sent)

    # refusals are raised on every rank together, not on the offending rank alone (which would hang the rest)
    errors = {}
    huge = torch.zeros(10, dtype=torch.float64)
    huge[3] = 1e11 if rank == 1 else 0.0  # below the 1-process limit (2**38), above the 3-rank one
    nan = torch.full((10,), float("nan") if rank == 2 else 1.0, dtype=torch.float64)
    out_of_step = 7 if rank == 0 else 8
    for name, (vector, round_index) in {"huge": (huge, 2), "nan": (nan, 2), "step": (huge * 0, out_of_step)}.items():
        try:
            aggregator.sum(vector, round_index)
            errors[name] = None
        except (ValueError, RuntimeError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    record["errors"] = errors

    record["gathered"] = gathered
    record["private_keys"] = private_keys
    record["pair_keys"] = list(aggregator.pair_keys.values())
    torch.save(record, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
