"""The federation on a GPU: every feature trains on CUDA as it does on CPU (marked ``device``; skipped without one).

CI never has a GPU, so these skip there; ``benchmarks/gpu_check.sh`` runs them, and the throughput benchmark, on a
machine that has one. Each test runs the same seeded fit on CPU and on the device and compares every round's
global encoder: kernels differ, so within a float tolerance, except where the arithmetic is exact (secure
aggregation's int64 sums decode to the same fixed-point values on either device, so the tolerance is the same).
"""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny
from helpers import DEEP_CACHED, FEDERATION, run_ranks, sectioned, write_config, write_yaml

pytestmark = [
    pytest.mark.device,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CACHED = {"template": "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}", "cache_prefix": True}
FEATURES = {  # name: (federation fields over FEDERATION, model fields)
    "fedavg": ({}, {}),
    "cached_prefix": ({}, CACHED),
    "deep_cached": ({}, DEEP_CACHED),
    "secure_aggregation": ({"secure_aggregation": {"enabled": True}}, {}),
    "client_dp": ({"weighting": "uniform", "dp": {"noise_multiplier": 1.0, "clip_norm": 0.01, "noise_seed": 3}}, {}),
    "dp_sgd": ({}, {"dp_sgd": {"noise_multiplier": 1.0, "clip_norm": 1.0, "noise_seed": 3}}),
    "median": ({"clients": 3, "weighting": "uniform", "robust": {"rule": "median"}}, {}),
    "sampling_16_clients": ({"clients": 16, "client_fraction": 0.125, "client_state_budget_mb": 0}, {}),
    "fedadam_fedprox": ({"server": {"optimizer": "fedadam", "lr": 0.01}, "prox_mu": 0.1}, {}),
}
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def configured(tmp_path: Path, backbone: str, fpb: Path, federation: dict, model: dict) -> Path:
    config = write_config(tmp_path, backbone, fpb, {**FEDERATION, **federation}, limit_val_batches=0)
    settings = yaml.safe_load(config.read_text())
    settings["model"] = sectioned({**settings["model"], **model})
    return write_yaml(config, settings)


def global_rounds(config: Path, *extra: str) -> list[torch.Tensor]:
    """Every round's global encoder of an in-process ``fedlm fit``, on the CPU."""
    from fedlm.cli import cli

    run = cli(["fit", "--config", str(config), "--trainer.callbacks+=federated_worker.RoundRecorder", *extra])
    (recorder,) = [c for c in run.trainer.callbacks if type(c).__name__ == "RoundRecorder"]
    return [r["global"].detach().float().cpu() for r in recorder.rounds]


@pytest.mark.parametrize("feature", FEATURES)
def test_a_simulated_federation_on_the_gpu_trains_as_on_the_cpu(
    feature: str, tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    federation, model = FEATURES[feature]
    config = configured(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation, model)
    cpu = global_rounds(config)
    gpu = global_rounds(config, "--trainer.accelerator", "cuda")
    assert len(gpu) == len(cpu) == FEDERATION["rounds"]
    for on_gpu, on_cpu in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(on_gpu, on_cpu, **TOLERANCE)


def test_bf16_on_the_gpu_trains_and_stays_near_fp32(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    config = configured(tmp_path, tiny_gpt2_dir, synthetic_fpb, {}, CACHED)
    fp32 = global_rounds(config, "--trainer.accelerator", "cuda")
    bf16_lm = ("--model.dtype", "bf16", "--model.cache.dtype", "bf16")
    bf16 = global_rounds(config, "--trainer.accelerator", "cuda", *bf16_lm)
    assert all(torch.isfinite(g).all() for g in bf16)
    moved = (fp32[-1] - fp32[0]).norm()
    assert (bf16[-1] - fp32[-1]).norm() < 0.1 * moved  # bf16 rounding, not a different training


def ranks_on_gpus(n: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA devices (one per rank)")


@pytest.mark.multiprocess
@ranks_on_gpus(2)
def test_two_clients_on_two_gpus_over_nccl_train_as_one_cpu_process(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    config = configured(tmp_path, tiny_gpt2_dir, synthetic_fpb, {"secure_aggregation": {"enabled": True}}, CACHED)
    (tmp_path / "gpu").mkdir()
    result, records = run_ranks(tmp_path / "gpu", config, 2, "--trainer.accelerator", "cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    cpu = global_rounds(config)
    for record in records:
        for round_, on_cpu in zip(record["rounds"], cpu, strict=True):
            torch.testing.assert_close(round_["global"].float().cpu(), on_cpu, **TOLERANCE)


@pytest.mark.multiprocess
@ranks_on_gpus(4)
def test_two_sharded_clients_on_four_gpus_train_as_unsharded_ones(synthetic_fpb: Path, tmp_path: Path) -> None:
    llama = build_tiny("llama", tmp_path / "llama")  # as tests/test_sharding.py, which checks the bytes on CPU
    config = configured(tmp_path, str(llama), synthetic_fpb, {}, DEEP_CACHED)
    runs = {}
    for name, extra in (("plain", ()), ("sharded", ("--federation.shard_backbone", "true"))):
        (tmp_path / name).mkdir()
        result, runs[name] = run_ranks(tmp_path / name, config, 4, "--trainer.accelerator", "cuda", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    for plain, sharded in zip(runs["plain"], runs["sharded"], strict=True):
        for plain_round, round_ in zip(plain["rounds"], sharded["rounds"], strict=True):
            torch.testing.assert_close(round_["global"].cpu(), plain_round["global"].cpu(), **TOLERANCE)
