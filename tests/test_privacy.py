"""Client-level differential privacy: clipping, noise scale, the accountant, the budget, adaptive clipping."""

import json
import math
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_synthetic_fpb
from federated_worker import sent_bytes
from helpers import FEDERATION, SENTENCES, Payload, batch_of, run_ranks, tiny_module, write_config

from fedlm.accounting import epsilon_after
from fedlm.experiment import privacy as privacy_report
from fedlm.federation import FederationConfig
from fedlm.federation.aggregate import payload_layout
from fedlm.federation.privacy import ClientPrivacy, DPConfig


def privacy(**dp) -> ClientPrivacy:
    config = DPConfig(**{"noise_multiplier": 1.0, "noise_seed": 0, **dp})
    return ClientPrivacy(config, rounds=19, clients=3, sampled_per_round=3, secure=False)


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
    with pytest.raises(
        ValueError, match="exactly one of federation.dp.noise_multiplier and federation.dp.target_epsilon"
    ):
        DPConfig().validate()
    with pytest.raises(ValueError, match="federation.dp.clip_norm=0"):
        DPConfig(clip_norm=0, noise_multiplier=1.0).validate()
    with pytest.raises(ValueError, match="set federation.weighting: uniform"):
        FederationConfig(clients=3, rounds=1, local_steps=1, dp=DPConfig(noise_multiplier=1.0)).validate()


# -- in federated runs -------------------------------------------------------------------------------------------

DP_FEDERATION = {**FEDERATION, "weighting": "uniform"}


@pytest.mark.multiprocess
def test_without_noise_the_round_moves_by_the_mean_clipped_update_on_two_ranks(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
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


@pytest.mark.multiprocess
def test_budget_overrun_refuses_before_training_and_epsilon_is_logged_and_checkpointed(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    from fedlm.cli import cli

    over = {**DP_FEDERATION, "dp": {"noise_multiplier": 0.8, "epsilon_budget": 5.0}}
    result, _ = run_ranks(tmp_path, write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, over), 1)
    assert result.returncode != 0 and "over federation.dp.epsilon_budget=5" in result.stderr
    assert "round 1/3" not in result.stderr

    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "last"},
        }
    ]
    stop = {
        **DP_FEDERATION,
        "dp": {"noise_multiplier": 2.0, "epsilon_budget": 7.5, "stop_at_budget": True, "noise_seed": 1},
    }
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, stop, enable_checkpointing=True, callbacks=callbacks)
    run = cli(["fit", "--config", str(config)])
    fitting = max(r for r in range(4) if epsilon_after(r, 2.0, 2, 2, 1e-5) <= 7.5)  # 2 of 2 clients per round
    assert 0 < fitting < 3 and run.trainer.current_epoch == fitting
    assert float(run.trainer.callback_metrics["dp/epsilon"]) == pytest.approx(epsilon_after(fitting, 2.0, 2, 2, 1e-5))
    # a peer sees the other client's update with half the noise variance, in every round
    peer = epsilon_after(fitting, 2.0 * math.sqrt(1 / 2), 1, 1, 1e-5)
    assert float(run.trainer.callback_metrics["dp/epsilon_peer"]) == pytest.approx(peer)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "FederatedLoop" in k]
    assert state["dp"]["rounds_spent"] == fitting and state["dp"]["noise_multiplier"] == 2.0


# -- safe loading -------------------------------------------------------------------------------------------------


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
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


# -- shared federated runs: what crosses process boundaries, DP's noise in real rounds, DP with secure aggregation --

Z, CLIP = 1.0, 0.01  # a real noise multiplier; a clip bound that every update exceeds at this lr
NOISY = {**DP_FEDERATION, "dp": {"noise_multiplier": Z, "clip_norm": CLIP, "noise_seed": 3}}
SECURE = {"secure_aggregation": {"enabled": True}}
WIDE = ("--model.encoder.hidden_size", "64")  # 4288 shared coordinates per round, for the noise statistics
RUNS = {  # name: (federation, processes, extra CLI arguments); 2 clients, 3 rounds each
    "plain": (FEDERATION, 2, ()),
    "secure": ({**FEDERATION, **SECURE}, 2, ()),
    "dp": (NOISY, 2, WIDE),
    "dp_secure": ({**NOISY, **SECURE}, 2, WIDE),
    "dp_2x2": (NOISY, 4, WIDE),  # 2 clients of 2 ranks each
}


@pytest.fixture(scope="module")
def runs(tiny_gpt2_dir: str, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """``runs(name)``: the records of one of ``RUNS``, made on first use and shared by every test that reads it
    (each torchrun run costs tens of seconds)."""
    made: dict[str, list[dict]] = {}

    def run(name: str) -> list[dict]:
        if name not in made:
            federation, processes, extra = RUNS[name]
            folder = tmp_path_factory.mktemp(name)
            config = write_config(folder, tiny_gpt2_dir, write_synthetic_fpb(folder), federation)
            result, records = run_ranks(folder, config, processes, *extra)
            assert result.returncode == 0, result.stderr[-3000:]
            made[name] = records
        return made[name]

    return run


@pytest.mark.multiprocess
def test_secure_aggregation_averages_like_plain_and_only_masked_integers_cross(runs) -> None:  # noqa: ANN001
    plain, records = runs("plain"), runs("secure")
    for round_index in range(3):
        for a, b in zip(plain, records):
            torch.testing.assert_close(
                a["rounds"][round_index]["global"], b["rounds"][round_index]["global"], rtol=0, atol=1e-6
            )
    size = records[0]["initial"].numel()
    for rank, record in enumerate(records):
        own = record["rounds"][0]["client_params"][rank].double()
        weight = record["rounds"][0]["weights"][rank]
        payloads = [t for entry in record["collectives"] for t in entry.get("tensors", []) if t.numel() >= size]
        # the only tensors of the encoder's size that left the process: the 3 rounds' payloads, masked int64
        assert len(payloads) == 3 and all(t.dtype == torch.int64 for t in payloads)
        encoded = torch.round(weight * own * 2**24).long()
        assert not (payloads[0][:size] == encoded).any()
        assert float(payloads[0][:size].double().std()) > 1e17  # masks: uniform over int64, not parameter-sized values


# What a rank may send per round beyond the exchanged vector (payload_layout's slots, float64). Measured in these
# runs: 460 to 719 bytes, of which the 16-byte checksum of the global encoder, the divergence vector (8 bytes per
# client, not under DP; masked: 3 control slots more), secure aggregation's 3 control slots on the payload,
# Lightning's flags and torchmetrics' counts for the (public) validation batch; and, counted into the first round,
# the setup's log-dir broadcasts, resume check and (secure) 32-byte public key and its 8-byte length. None grows
# with the vector.
OVERHEAD = 1024
TOKEN_DTYPES = (np.int16, np.int32, np.int64, np.float32, np.float64)  # all that hold the vocabulary's ids exactly
LABEL_DTYPES = (np.int8, *TOKEN_DTYPES)
WINDOW = 4  # any 4 consecutive token ids of an example: no piece of a sentence longer than 3 tokens may travel


def encodings(sequences: list[list[int]], dtypes: tuple[type, ...]) -> dict[bytes, str]:
    """Each sequence's bytes in each dtype, naming the dtype."""
    return {np.array(seq, dtype).tobytes(): dtype.__name__ for dtype in dtypes for seq in sequences}


def found_in(blob: bytes, needles: dict[bytes, str]) -> set[str]:
    """The names of the needles that occur in ``blob``, at any byte offset."""
    found = set()
    for length in {len(needle) for needle in needles}:
        sized = {needle: name for needle, name in needles.items() if len(needle) == length}
        found |= {sized[blob[i : i + length]] for i in range(len(blob) - length + 1) if blob[i : i + length] in sized}
    return found


def leaks(entries: list[dict], clients: dict[int, dict]) -> list[str]:
    """What of the clients' training data the recorded collectives carried, in the bytes of any tensor or pickled
    object or in an object's repr: ``WINDOW`` consecutive token ids of an example (as any of ``TOKEN_DTYPES``), a
    client's whole label sequence (as any of ``LABEL_DTYPES``), an example's text."""
    windows = {
        tuple(run[i : i + WINDOW].tolist())
        for client in clients.values()
        for example in client["token_runs"]
        for run in example
        for i in range(len(run) - WINDOW + 1)
    }
    ids = encodings(sorted(windows), TOKEN_DTYPES)
    labels = encodings([client["labels"].tolist() for client in clients.values()], LABEL_DTYPES)
    written = {", ".join(map(str, window)) for window in windows}  # as a list's or a tensor's repr prints them
    texts = [text for client in clients.values() for text in client["texts"]]
    found = []
    for entry in entries:
        where = f"{entry['name']} in round {entry['round']}"
        tensors = [
            t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() for t in entry.get("tensors", [])
        ]
        for blob in tensors + entry.get("pickled", []):
            found += [f"{where}: token ids as {name}" for name in sorted(found_in(blob, ids))]
            found += [f"{where}: labels as {name}" for name in sorted(found_in(blob, labels))]
            found += [f"{where}: a sentence's text" for text in texts if text.encode() in blob][:1]
        for shown in entry.get("repr", []):
            found += [f"{where}: token ids in a repr" for window in written if window in shown][:1]
            found += [f"{where}: a sentence in a repr" for text in texts if text in shown][:1]
    return found


def test_the_leak_check_finds_ids_labels_and_text_planted_anywhere() -> None:
    """The check of the runs below must be able to fail: a client's data planted in clean payloads is found."""
    clients = {0: {"token_runs": [[torch.tensor([7, 201, 35, 150, 9, 44])]], "texts": ["profit rose in Finland ."],
                   "labels": torch.tensor([2, 0, 1, 1, 0, 2, 2])}}  # fmt: skip
    vector = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    key = b"\x01" * 32
    clean = [{"name": "all_reduce", "round": 0, "tensors": [vector]},
             {"name": "all_gather_object", "round": -1, "pickled": [pickle.dumps(key)],
              "repr": [repr(key)]}]  # fmt: skip
    assert leaks(clean, clients) == []
    raw = bytearray(vector.numpy().tobytes())
    raw[1001:1017] = np.array([201, 35, 150, 9], np.int32).tobytes()  # 4 ids, unaligned, inside a float64 payload
    planted = [{"name": "all_reduce", "round": 1, "tensors": [torch.frombuffer(raw, dtype=torch.float64)]}]
    assert leaks(planted, clients) == ["all_reduce in round 1: token ids as int32"]
    assert leaks([{"name": "broadcast", "round": 0, "tensors": [torch.tensor([201, 35, 150])]}], clients) == []  # 3 ids
    labels = [{"name": "all_gather", "round": 2, "tensors": [torch.cat([vector, clients[0]["labels"].double()])]}]
    assert leaks(labels, clients) == ["all_gather in round 2: labels as float64"]
    sentence = {"sentence": "profit rose in Finland .", "ids": [35, 150, 9, 44]}
    objects = [
        {"name": "broadcast_object_list", "round": 0, "pickled": [pickle.dumps(sentence)], "repr": [repr(sentence)]}
    ]
    expected = ("a sentence's text", "token ids in a repr", "a sentence in a repr")
    assert leaks(objects, clients) == [f"broadcast_object_list in round 0: {what}" for what in expected]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["plain", "secure", "dp", "dp_secure"])
def test_each_rank_sends_the_exchanged_vector_and_no_clients_training_data(runs, name: str) -> None:  # noqa: ANN001
    """Every byte each rank (of 2, one client each) handed to any collective: per round the exchanged vector plus at
    most ``OVERHEAD``, and no token ids, labels or text of any client's training examples."""
    records = runs(name)
    clients = {k: v for record in records for k, v in record["examples"].items()}
    assert sorted(clients) == [0, 1] and all(c["token_runs"] for c in clients.values())
    vector_bytes = payload_layout(int(records[0]["shared"].sum()), 2)["failed"].stop * 8
    for record in records:
        per_round = Counter()
        for entry in record["collectives"]:  # the setup's count into the first round, any after the last into it
            per_round[min(max(entry["round"], 0), 2)] += sent_bytes(entry)
        assert sorted(per_round) == [0, 1, 2]
        assert all(vector_bytes < sent <= vector_bytes + OVERHEAD for sent in per_round.values()), (
            vector_bytes,
            per_round,
        )
        assert leaks(record["collectives"], clients) == []


def noise(records: list[dict]) -> list[torch.Tensor]:
    """Per round, what DP added: global after - (global before + mean over the round's clients of their updates
    clipped to ``CLIP``), which is the round's noise (z * C on the sum) divided by its number of clients."""
    shared, before, residuals = records[0]["shared"], records[0]["initial"].double(), []
    for round_index in range(3):
        hosted = [r["rounds"][round_index]["client_params"] for r in records]
        updates = {k: v[shared].double() - before[shared] for clients in hosted for k, v in clients.items()}
        assert all(float(u.norm()) > CLIP for u in updates.values())  # the bound binds
        clipped = sum(u * CLIP / u.norm() for u in updates.values()) / len(updates)
        after = records[0]["rounds"][round_index]["global"].double()
        residuals.append(after[shared] - before[shared] - clipped)
        before = after
    return residuals


def fits(sample: torch.Tensor, sigma: float) -> bool:
    """Whether ``sample`` is centred N(0, sigma^2): its std within 5 standard errors (a sample std over d
    Gaussian values has relative standard error 1/sqrt(2d)), its mean within 5 standard errors of 0."""
    d = sample.numel()
    return abs(float(sample.std()) / sigma - 1) < 5 / math.sqrt(2 * d) and abs(
        float(sample.mean())
    ) < 5 * sigma / math.sqrt(d)


@pytest.mark.multiprocess
def test_noise_in_real_rounds_has_std_z_clip_over_clients(runs) -> None:  # noqa: ANN001
    """The noise that reaches the global encoder, measured from the rounds' encoders alone."""
    residuals = noise(runs("dp"))
    pooled = torch.cat(residuals)  # 3 rounds x 4288 coordinates: relative standard error 0.6%
    expected = Z * CLIP / 2  # the sum's noise z * C, over the round's 2 clients
    assert fits(pooled, expected)
    # and not what a bug would give: each client adding all the noise (x sqrt 2), the sum's noise left undivided (x 2)
    assert not fits(pooled, expected * math.sqrt(2)) and not fits(pooled, 2 * expected)
    for a, b in zip(residuals, residuals[1:]):  # fresh noise every round
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / math.sqrt(a.numel())


def spacing(x: torch.Tensor) -> torch.Tensor:
    """The distance from each float32 value to the next one away from zero."""
    return torch.nextafter(x.abs(), torch.tensor(math.inf)) - x.abs()


@pytest.mark.multiprocess
def test_under_dp_secure_aggregation_gives_the_plain_global_encoder_within_the_fixed_point_step(runs) -> None:  # noqa: ANN001
    """The same noise (noise_seed) and the same clipped updates, summed as floats or as masked fixed point."""
    plain, secure = runs("dp"), runs("dp_secure")
    for rank in (0, 1):  # the first round starts from the same encoder: the clients' encoders agree bitwise
        assert torch.equal(
            plain[rank]["rounds"][0]["client_params"][rank], secure[rank]["rounds"][0]["client_params"][rank]
        )
    # Each of the n = 2 summed values is rounded to a multiple of 2**-24, so the sum is off by at most n * 2**-25 and
    # the mean, the round's new encoder, by 2**-25 < 2**-24; each run then rounds it to float32 (half a spacing each).
    # Not bitwise: 2**-24 is coarser than float32's spacing below 0.5, where the encoder's values are, so most differ.
    first = [records[0]["rounds"][0]["global"] for records in (plain, secure)]
    assert ((first[0] - first[1]).abs() <= 2**-24 + spacing(torch.maximum(first[0].abs(), first[1].abs()))).all()
    # Later rounds start from encoders that differ by that much, and so train to slightly different updates; but
    # the noise is the same, so what each run added beyond its own clients' clipped updates agrees as closely.
    for round_index, (a, b) in enumerate(zip(noise(plain), noise(secure))):
        after = [records[0]["rounds"][round_index]["global"] for records in (plain, secure)]
        assert ((a - b).abs() <= 2**-24 + spacing(torch.maximum(after[0].abs(), after[1].abs()))).all()


@pytest.mark.multiprocess
def test_two_ranks_per_client_under_dp_agree_and_add_the_noise_once(runs) -> None:  # noqa: ANN001
    records = runs("dp_2x2")  # ranks 0 and 1 host client 0, ranks 2 and 3 client 1
    for round_index in range(3):
        rounds = [r["rounds"][round_index] for r in records]
        assert torch.equal(rounds[0]["client_params"][0], rounds[1]["client_params"][0])
        assert torch.equal(rounds[2]["client_params"][1], rounds[3]["client_params"][1])
        assert not torch.equal(rounds[0]["client_params"][0], rounds[2]["client_params"][1])
        assert all(torch.equal(r["global"], rounds[0]["global"]) for r in rounds)
    pooled = torch.cat(noise(records))
    # each client's share is added once, by its lead rank: not by both of its ranks (x sqrt 2 on the noise)
    assert fits(pooled, Z * CLIP / 2) and not fits(pooled, Z * CLIP / 2 * math.sqrt(2))


# -- sample-level DP-SGD ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("cache_prefix", [False, True])
def test_dp_sgd_per_example_gradients_are_exact_and_clipped(
    tiny_model_dir: str, cache_prefix: bool, deep: bool
) -> None:
    template = (
        "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"
        if cache_prefix
        else "<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}"
    )
    sentences = SENTENCES + [("sales grew strongly in Finland .", "positive")]
    slots = {"encoder": {"type": "mlp", "virtual_tokens": 3, "hidden_size": 16, "deep": True, "init_text": "the"}}
    layout = dict(template=template, cache_prefix=cache_prefix, **(slots if deep else {}))

    def gradients(**dp) -> tuple[torch.Tensor, torch.Tensor]:
        module = tiny_module(tiny_model_dir, **layout, dp_sgd=dp or None)
        module.train()
        batch = batch_of(module, sentences)
        loss = module.dp_sgd_loss(batch) if dp else module.task.train_loss(module.lm, batch)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.reshape(-1) for p in module.encoder.parameters()])

    # Reference: the mean of each example's own gradient, one example at a time
    module = tiny_module(tiny_model_dir, **layout)
    module.train()
    per_example, losses = [], []
    for sentence in sentences:
        module.encoder.zero_grad()
        losses.append(module.task.train_loss(module.lm, batch_of(module, [sentence])))
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
    from fedlm.ptuning.dp_sgd import DPSGDConfig, private_gradients

    encoder = torch.nn.Linear(1, 4000)
    table = encoder(torch.ones(1, 1)).reshape(-1)
    config = DPSGDConfig(noise_multiplier=1.5, clip_norm=0.2, noise_seed=3)
    grads = private_gradients(
        encoder, table, torch.zeros(8, 4000), config, expected_batch=8, noise_share=0.5, stream=(0, 0)
    )
    noise = torch.cat([g.reshape(-1) for g in grads])
    assert float(noise.std()) == pytest.approx(1.5 * 0.2 * math.sqrt(0.5) / 8, rel=0.05)


def test_dp_sgd_logs_the_accountants_epsilon_per_client(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    from fedlm.cli import cli

    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, FEDERATION, limit_val_batches=0)
    run = cli(
        [
            "fit",
            "--config",
            str(config),
            "--model.dp_sgd",
            '{"noise_multiplier": 1.2, "clip_norm": 1.0, "noise_seed": 0}',
        ]
    )
    # 2 clients of 48 examples, batch 4, 3 local steps per round, 3 rounds: each spent 9 steps
    expected = epsilon_after(9, 1.2, 4, 48, 1e-5)  # batches of 4 drawn afresh from 48, 9 times
    assert float(run.trainer.callback_metrics["dp_sgd/epsilon"]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.multiprocess
def test_dp_sgd_on_a_client_of_two_ranks_steps_as_on_one_rank(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """One client of 2 ranks x 2 examples against one rank of 4: the same clipped mean gradient (no noise), so with
    FedProx's pull added to it the same steps. Dividing by the ranks twice would make the pull 2x stronger."""
    federation = {"clients": 1, "rounds": 2, "local_steps": 2, "seed": 5, "prox_mu": 0.5}
    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, federation, limit_val_batches=0)
    dp = ["--model.dp_sgd", '{"noise_multiplier": 0.0, "clip_norm": 0.05}']
    one, (alone,) = run_ranks(tmp_path, config, 1, *dp, "--data.init_args.batch_size", "4")
    assert one.returncode == 0, one.stderr[-3000:]
    two, records = run_ranks(tmp_path, config, 2, *dp, "--data.init_args.batch_size", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 rank(s) per client" in two.stdout
    for round_index in range(2):
        torch.testing.assert_close(
            records[0]["rounds"][round_index]["client_params"][0], alone["rounds"][round_index]["client_params"][0]
        )


# -- the report of scripts/privacy.sh's runs ------------------------------------------------------------------


def test_privacy_report_reads_what_the_runs_printed_and_logged(tmp_path: Path) -> None:
    def fake_run(aggregation: str, epsilon: str, acc: float, spent: list[float], comm: float) -> None:
        folder = tmp_path / "runs" / aggregation / f"epsilon_{epsilon}"
        logs = folder / "logs" / "version_0"
        logs.mkdir(parents=True)
        metrics = {"test/acc": acc, "test/macro_f1": acc - 0.1, "fit_seconds": 500.0}
        (logs / "test_metrics.json").write_text(json.dumps(metrics))
        header = "epoch,round/compute_seconds,round/comm_seconds,dp/epsilon,dp/epsilon_peer,val/acc\n"
        rows = [f"{i},{20 + i},{comm},{e},{2 * e if e else ''},\n" for i, e in enumerate(spent or [""] * 2)]
        (logs / "metrics.csv").write_text(header + "".join(rows) + "1,,,,,0.5\n")  # a validation row: not a round
        line = (
            ""
            if epsilon == "none"
            else "[fedlm dp] noise multiplier 2.780, clip norm 0.3: 2 rounds spend epsilon 8.00\n"
        )
        (folder / "output.log").write_text("start\n" + line)

    fake_run("plain", "none", 0.85, [], 0.5)
    fake_run("plain", "8", 0.60, [5.1, 8.0], 0.5)
    fake_run("secure", "8", 0.61, [5.1, 8.0], 1.5)
    fake_run("plain", "clip", 0.84, [float("inf")] * 2, 0.5)
    out = tmp_path / "privacy.md"
    privacy_report.main([str(tmp_path / "runs"), "--out", str(out), "--command", "bash scripts/privacy.sh"])
    text = out.read_text()
    assert "| no DP | plain | - | - | - | 0.850 | 0.750 | 20.5 | 0.500 | 500 |" in text
    assert "| epsilon 8 | plain | 2.780 | 8.00 | 16.00 | 0.600 | 0.500 | 20.5 | 0.500 | 500 |" in text
    assert text.index("| epsilon 8 | plain") < text.index("| epsilon 8 | secure | 2.780 | 8.00 | 16.00 | 0.610")
    assert (
        text.index("| no DP |")
        < text.index("| clipping only, no noise | plain | 2.780 | infinite | infinite | 0.840 |")
        < text.index("| epsilon 8 |")
    )
    assert out.with_suffix(".png").stat().st_size > 10_000
