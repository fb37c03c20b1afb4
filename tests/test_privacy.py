"""Client-level differential privacy: clipping, noise scale, the accountant, the budget, adaptive clipping."""

import json
import math
from pathlib import Path

import pytest
import torch
from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from test_federation import FEDERATION, run_ranks, write_config

from fedlm.federation import FederationConfig
from fedlm.accounting import calibrate_noise, epsilon_after
from fedlm.experiment import privacy as privacy_report
from fedlm.federation.loop import payload_layout
from fedlm.federation.privacy import ClientPrivacy, DPConfig


def privacy(**dp) -> ClientPrivacy:
    config = DPConfig(**{"noise_multiplier": 1.0, "noise_seed": 0, **dp})
    return ClientPrivacy(config, rounds=19, clients=3, sampled_per_round=3, client_fraction=1.0)


def test_clipping_bounds_every_client_update_and_leaves_small_ones_alone() -> None:
    dp = privacy(noise_multiplier=0.0, clip_norm=0.5, adaptive_clipping=True, count_noise=1e-12)
    for scale in (0.01, 0.4, 3.0, 100.0):
        delta = torch.randn(1000, generator=torch.Generator().manual_seed(1)).double()
        delta *= scale / delta.norm()
        clipped, under = dp.privatize(delta, client=0, round_index=0)
        assert float(clipped.norm()) <= 0.5 + 1e-12
        if scale <= 0.5:
            assert torch.equal(clipped, delta) and under == pytest.approx(0.5)
        else:
            torch.testing.assert_close(clipped, delta * 0.5 / scale)
            assert under == pytest.approx(-0.5)


def test_noise_shares_add_up_to_the_configured_multiplier() -> None:
    dp = privacy(noise_multiplier=2.0, clip_norm=0.1)
    shares = [dp.privatize(torch.zeros(200_000, dtype=torch.float64), client, 0)[0] for client in range(3)]
    assert float(sum(shares).std()) == pytest.approx(2.0 * 0.1, rel=0.01)  # z * C on the sum of the 3 shares
    assert float(shares[0].std()) == pytest.approx(2.0 * 0.1 / math.sqrt(3), rel=0.01)
    assert abs(float(torch.corrcoef(torch.stack(shares[:2]))[0, 1])) < 0.01  # independent per client
    seeded = [privacy().privatize(torch.zeros(10, dtype=torch.float64), 0, 0)[0] for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])  # noise_seed: reproducible per (client, round)...
    unseeded = privacy(noise_seed=None)
    draws = [unseeded.privatize(torch.zeros(10, dtype=torch.float64), 0, 0)[0] for _ in range(2)]
    assert not torch.equal(draws[0], draws[1])  # ...and, without a seed, never the same twice


def test_epsilon_is_the_accountants_own_figure() -> None:
    expected = RdpAccountant()
    expected.compose(SelfComposedDpEvent(GaussianDpEvent(1.3), 19))
    assert epsilon_after(19, 1.3, 1.0, 1e-5) == expected.get_epsilon(1e-5)
    pld = PLDAccountant()
    pld.compose(SelfComposedDpEvent(GaussianDpEvent(1.3), 19))
    assert pld.get_epsilon(1e-5) <= epsilon_after(19, 1.3, 1.0, 1e-5) <= 1.3 * pld.get_epsilon(1e-5)  # RDP: looser
    assert epsilon_after(19, 1.3, 0.5, 1e-5) < epsilon_after(19, 1.3, 1.0, 1e-5)  # client sampling amplifies
    for target in (1.0, 4.0, 8.0):
        z = calibrate_noise(target, 19, 1.0, 1e-5)
        assert epsilon_after(19, z, 1.0, 1e-5) == pytest.approx(target, rel=1e-3)


def test_a_run_that_would_overspend_is_refused_or_stopped_at_the_budget() -> None:
    with pytest.raises(ValueError, match=r"spend epsilon 29\.10 at delta 1e-05, over federation.dp.epsilon_budget=8") as err:
        privacy(epsilon_budget=8.0).planned_rounds()
    needed = float(str(err.value).split("noise_multiplier to ")[1].split(" ")[0])
    assert epsilon_after(19, needed, 1.0, 1e-5) == pytest.approx(8.0, rel=1e-3)
    fitting = privacy(epsilon_budget=8.0, stop_at_budget=True).planned_rounds()
    assert epsilon_after(fitting, 1.0, 1.0, 1e-5) <= 8.0 < epsilon_after(fitting + 1, 1.0, 1.0, 1e-5)
    assert privacy(noise_multiplier=None, target_epsilon=4.0).planned_rounds() == 19  # calibrated: fits exactly


def test_adaptive_clipping_moves_the_bound_towards_the_quantile_and_keeps_the_total_noise() -> None:
    dp = privacy(adaptive_clipping=True, clip_norm=1.0, count_noise=10.0, clip_lr=0.2)
    # update and count noise together are the configured Gaussian mechanism (Andrew et al. 2021, Theorem 1)
    assert dp.update_noise**-2 + (2 * dp.count_noise) ** -2 == pytest.approx(dp.noise_multiplier**-2)
    dp.end_round(count_sum=3 * 0.5, sampled=3)  # all 3 clients under the bound: shrink it
    assert dp.clip_norm == pytest.approx(math.exp(-0.2 * (1.0 - 0.5)))
    dp.end_round(count_sum=3 * -0.5, sampled=3)  # none under: grow it back
    assert dp.clip_norm == pytest.approx(1.0)
    with pytest.raises(ValueError, match="raise federation.dp.count_noise"):
        privacy(adaptive_clipping=True, count_noise=0.4)


def test_dp_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="exactly one of federation.dp.noise_multiplier and federation.dp.target_epsilon"):
        DPConfig().validate()
    with pytest.raises(ValueError, match="federation.dp.clip_norm=0"):
        DPConfig(clip_norm=0, noise_multiplier=1.0).validate()
    with pytest.raises(ValueError, match="set federation.weighting: uniform"):
        FederationConfig(clients=3, rounds=1, local_steps=1, dp=DPConfig(noise_multiplier=1.0)).validate()


# -- in federated runs -------------------------------------------------------------------------------------------

DP_FEDERATION = {**FEDERATION, "weighting": "uniform"}


def test_without_noise_the_round_moves_by_the_mean_clipped_update_on_two_ranks(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    federation = {**DP_FEDERATION, "dp": {"noise_multiplier": 0.0, "clip_norm": 0.05, "noise_seed": 0}}
    result, records = run_ranks(tmp_path, write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    before = records[0]["initial"]
    for round_index in range(3):
        clients = {k: v for r in records for k, v in r["rounds"][round_index]["client_params"].items()}
        clipped = []
        for k in (0, 1):
            delta = (clients[k] - before).double()
            assert float(delta.norm()) > 0.05  # the bound binds at this lr
            clipped.append(delta * min(1.0, 0.05 / float(delta.norm())))
        expected = (before.double() + sum(clipped) / 2).float()
        for record in records:
            torch.testing.assert_close(record["rounds"][round_index]["global"], expected, rtol=0, atol=1e-6)
        before = records[0]["rounds"][round_index]["global"]
    # the clients' losses and update norms stayed home: no loss in the payload, no per-client norms reduced
    size = before.numel()
    for record in records:
        sent = [t for t in record["sent"] if t.dtype == torch.float64]
        layout = payload_layout(size, 2)
        payloads = [t for t in sent if t.numel() == layout["failed"].stop]
        assert len(payloads) == 3 and all(not t[layout["loss"]].any() for t in payloads)
        assert not [t for t in sent if t.numel() == 2]


def test_budget_overrun_refuses_before_training_and_epsilon_is_logged_and_checkpointed(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    from fedlm.cli import cli

    over = {**DP_FEDERATION, "dp": {"noise_multiplier": 0.8, "epsilon_budget": 5.0}}
    result, _ = run_ranks(tmp_path, write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, over), 1)
    assert result.returncode != 0 and "over federation.dp.epsilon_budget=5" in result.stderr
    assert "round 1/3" not in result.stderr

    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "last"}}]
    stop = {**DP_FEDERATION, "dp": {"noise_multiplier": 2.0, "epsilon_budget": 3.0, "stop_at_budget": True, "noise_seed": 1}}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, stop, enable_checkpointing=True, callbacks=callbacks)
    run = cli(["fit", "--config", str(config)])
    fitting = max(r for r in range(4) if epsilon_after(r, 2.0, 1.0, 1e-5) <= 3.0)
    assert 0 < fitting < 3 and run.trainer.current_epoch == fitting
    assert float(run.trainer.callback_metrics["dp/epsilon"]) == pytest.approx(epsilon_after(fitting, 2.0, 1.0, 1e-5))
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "FederatedLoop" in k]
    assert state["dp"]["rounds_spent"] == fitting and state["dp"]["noise_multiplier"] == 2.0


# -- safe loading -------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs ``touch`` of a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    from fedlm.checkpointing import AtomicCheckpointIO, UnsafeCheckpointError
    from fedlm.cli import cli

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "evil": Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt was refused: it holds objects other than tensors"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt", weights_only=False)  # even when asked
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, None, max_epochs=1)
    with pytest.raises(UnsafeCheckpointError):
        cli(["test", "--config", str(config), "--ckpt_path", str(tmp_path / "evil.ckpt")])
    assert not marker.exists()


# -- secure aggregation in federated runs; what crosses process boundaries ---------------------------------------


def test_secure_aggregation_averages_like_plain_and_only_masked_integers_cross(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    for name in ("plain", "secure"):
        (tmp_path / name).mkdir()
    plain_config = write_config(tmp_path / "plain", tiny_gpt2_dir, synthetic_fpb, FEDERATION)
    result, plain = run_ranks(tmp_path / "plain", plain_config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    secure = {**FEDERATION, "secure_aggregation": {"enabled": True}}
    result, records = run_ranks(tmp_path / "secure", write_config(tmp_path / "secure", tiny_gpt2_dir, synthetic_fpb, secure), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    for round_index in range(3):
        for a, b in zip(plain, records):
            torch.testing.assert_close(a["rounds"][round_index]["global"], b["rounds"][round_index]["global"], rtol=0, atol=1e-6)
    size = records[0]["initial"].numel()
    for rank, record in enumerate(records):
        own = record["rounds"][0]["client_params"][rank].double()
        weight = record["rounds"][0]["weights"][rank]
        crossing = [(name, sent) for name, sent in record["collectives"]]
        big = [sent for name, sent in crossing if isinstance(sent, torch.Tensor) and sent.numel() > 16]
        # the only tensors over 16 elements (logged scalars and counts: no room for a sentence's token ids) that
        # left the process were the 3 rounds' masked payloads: int64, uniformly spread
        assert len(big) == 3 and all(t.dtype == torch.int64 and t.numel() >= size for t in big)
        encoded = torch.round(weight * own * 2**24).long()
        assert not torch.equal(big[0][:size], encoded)
        assert float(big[0][:size].double().std()) > 1e17  # masks: uniform over int64, not parameter-sized values
        objects = [sent for name, sent in crossing if not isinstance(sent, torch.Tensor)]
        assert all(len(str(o)) < 300 for o in objects)  # public keys (32 bytes), paths, flags


# -- sample-level DP-SGD ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_prefix", [False, True])
def test_dp_sgd_per_example_gradients_are_exact_and_clipped(tiny_model_dir: str, cache_prefix: bool) -> None:
    from test_module import SENTENCES, batch_of, tiny_module

    template = "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}" if cache_prefix else "<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}"
    sentences = SENTENCES + [("sales grew strongly in Finland .", "positive")]

    def gradients(**dp) -> tuple[torch.Tensor, torch.Tensor]:
        module = tiny_module(tiny_model_dir, template=template, cache_prefix=cache_prefix, dp_sgd=dp or None)
        module.train()
        batch = batch_of(module, sentences)
        loss = module.dp_sgd_loss(batch) if dp else module.train_loss(batch)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.reshape(-1) for p in module.encoder.parameters()])

    # Reference: the mean of each example's own gradient, one example at a time
    module = tiny_module(tiny_model_dir, template=template, cache_prefix=cache_prefix)
    module.train()
    per_example, losses = [], []
    for sentence in sentences:
        module.encoder.zero_grad()
        losses.append(module.train_loss(batch_of(module, [sentence])))
        losses[-1].backward()
        per_example.append(torch.cat([p.grad.reshape(-1) for p in module.encoder.parameters()]))
    expected = torch.stack(per_example).mean(0)

    loss, unclipped = gradients(noise_multiplier=0.0, clip_norm=1e9)
    torch.testing.assert_close(unclipped, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss, torch.stack(losses).mean().detach())  # the value: the mean per-example loss
    bound = 0.5 * min(float(g.norm()) for g in per_example)
    _, clipped = gradients(noise_multiplier=0.0, clip_norm=bound)
    torch.testing.assert_close(clipped, sum(g * bound / g.norm() for g in per_example) / 3, rtol=1e-4, atol=1e-7)


def test_dp_sgd_noise_has_the_configured_scale() -> None:
    from fedlm.model.dp_sgd import DPSGDConfig, private_gradients

    encoder = torch.nn.Linear(1, 4000)
    table = encoder(torch.ones(1, 1)).reshape(-1)
    config = DPSGDConfig(noise_multiplier=1.5, clip_norm=0.2, noise_seed=3)
    grads = private_gradients(encoder, table, torch.zeros(8, 4000), config, expected_batch=8, noise_share=0.5, stream=(0, 0))
    noise = torch.cat([g.reshape(-1) for g in grads])
    assert float(noise.std()) == pytest.approx(1.5 * 0.2 * math.sqrt(0.5) / 8, rel=0.05)


def test_dp_sgd_logs_the_accountants_epsilon_per_client(tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path) -> None:
    from fedlm.cli import cli

    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, FEDERATION, limit_val_batches=0)
    run = cli(["fit", "--config", str(config), "--model.dp_sgd", '{"noise_multiplier": 1.2, "clip_norm": 1.0, "noise_seed": 0}'])
    # 2 clients of 48 examples, batch 4, 3 local steps per round, 3 rounds: each spent 9 steps at rate 4/48
    expected = epsilon_after(9, 1.2, 4 / 48, 1e-5)
    assert float(run.trainer.callback_metrics["dp_sgd/epsilon"]) == pytest.approx(expected, rel=1e-6)


# -- the report of scripts/privacy.sh's runs ------------------------------------------------------------------


def test_privacy_report_reads_what_the_runs_printed_and_logged(tmp_path: Path) -> None:
    def fake_run(aggregation: str, epsilon: str, acc: float, spent: list[float], comm: float) -> None:
        folder = tmp_path / "runs" / aggregation / f"epsilon_{epsilon}"
        logs = folder / "logs" / "version_0"
        logs.mkdir(parents=True)
        metrics = {"test/acc": acc, "test/macro_f1": acc - 0.1, "fit_seconds": 500.0}
        (logs / "test_metrics.json").write_text(json.dumps(metrics))
        header = "epoch,round/compute_seconds,round/comm_seconds,dp/epsilon,val/acc\n"
        rows = [f"{i},{20 + i},{comm},{e},\n" for i, e in enumerate(spent or [""] * 2)]
        (logs / "metrics.csv").write_text(header + "".join(rows) + "1,,,,0.5\n")  # a validation row: not a round
        line = "" if epsilon == "none" else "[fedlm dp] noise multiplier 2.780, clip norm 0.3: 2 rounds spend epsilon 8.00\n"
        (folder / "output.log").write_text("start\n" + line)

    fake_run("plain", "none", 0.85, [], 0.5)
    fake_run("plain", "8", 0.60, [5.1, 8.0], 0.5)
    fake_run("secure", "8", 0.61, [5.1, 8.0], 1.5)
    fake_run("plain", "clip", 0.84, [float("inf")] * 2, 0.5)
    out = tmp_path / "privacy.md"
    privacy_report.main([str(tmp_path / "runs"), "--out", str(out), "--command", "bash scripts/privacy.sh"])
    text = out.read_text()
    assert "| no DP | plain | - | - | 0.850 | 0.750 | 20.5 | 0.500 | 500 |" in text
    assert "| epsilon 8 | plain | 2.780 | 8.00 | 0.600 | 0.500 | 20.5 | 0.500 | 500 |" in text
    assert text.index("| epsilon 8 | plain") < text.index("| epsilon 8 | secure | 2.780 | 8.00 | 0.610")
    assert text.index("| no DP |") < text.index("| clipping only, no noise | plain | 2.780 | infinite | 0.840 |") < text.index("| epsilon 8 |")
    assert out.with_suffix(".png").stat().st_size > 10_000
