"""A frozen LM sharded over each client's ranks (federation.shard_backbone): the same training, a shard of the bytes."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny
from helpers import DEEP_CACHED, FEDERATION, run_ranks, sectioned, write_config, write_yaml
from transformers import AutoModelForCausalLM

from fedlm.data.sampler import ShardBatches
from fedlm.errors import ConfigError
from fedlm.federation import FederationConfig
from fedlm.federation.sharding import decoder_layers, local_bytes


def test_evaluation_shards_end_together_and_keep_every_example_once() -> None:
    shards = [list(ShardBatches(13, rank, 4, 3)) for rank in range(4)]
    assert shards[0] == [[0, 4, 8], [12]] and shards[1] == [[1, 5, 9], []]  # rank 1 idles while rank 0 scores 12
    assert {len(batches) for batches in shards} == {2}
    assert sorted(i for batches in shards for batch in batches for i in batch) == list(range(13))


def test_sharding_refuses_what_would_evaluate_on_one_rank() -> None:
    config = FederationConfig(clients=2, rounds=1, local_steps=1, shard_backbone=True, personalize_steps=2)
    with pytest.raises(ConfigError, match="personalize_steps"):
        config.validate()


@pytest.mark.multiprocess
def test_two_sharded_clients_of_two_ranks_train_as_unsharded_ones_on_half_the_layers(
    synthetic_fpb: Path, tmp_path: Path
) -> None:
    llama = build_tiny("llama", tmp_path / "llama")
    config = write_config(tmp_path, str(llama), synthetic_fpb, FEDERATION, limit_val_batches=1.0)
    settings = yaml.safe_load(config.read_text())
    settings["model"] = sectioned({**settings["model"], **DEEP_CACHED})
    # the test also decodes each answer: the client's ranks step in lockstep, idle ones included
    settings["model"]["task"].update(generated_labels=True, decoding={"max_new_tokens": 3, "stop": []})
    settings["data"]["init_args"].update(train_fraction=0.78, eval_batch_size=3)
    write_yaml(config, settings)
    # 13 validation and 14 test sentences in batches of 3 over 4 ranks: some ranks idle while others score
    extra = ["--test_after_fit", "true"]
    for name in ("plain", "sharded"):
        (tmp_path / name).mkdir()
    plain, plain_records = run_ranks(tmp_path / "plain", config, 4, *extra)
    assert plain.returncode == 0, plain.stderr[-3000:]
    sharded, records = run_ranks(tmp_path / "sharded", config, 4, *extra, "--federation.shard_backbone", "true")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    for plain_rank, rank in zip(plain_records, records):
        for plain_round, round_ in zip(plain_rank["rounds"], rank["rounds"], strict=True):
            torch.testing.assert_close(round_["global"], plain_round["global"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(plain_rank["losses"]))
    # each rank holds its half of every decoder layer, and the embeddings and final norm whole
    model = AutoModelForCausalLM.from_pretrained(llama)
    layers = sum(local_bytes(layer)[1] for layer in decoder_layers(model))
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    assert {r["rounds"][-1]["backbone_bytes"] for r in plain_records} == {whole}
    assert {r["rounds"][-1]["backbone_bytes"] for r in records} == {whole - layers // 2}
    assert sharded.stdout.count(f"this rank holds {layers // 2:,} of their {layers:,} bytes") == 4
    for result in (plain, sharded):  # the same test scores, each sentence scored once
        assert "test/acc" in result.stdout and "test/generated_acc" in result.stdout
    assert printed_scores(plain.stdout) == pytest.approx(printed_scores(sharded.stdout), abs=1e-6)


def printed_scores(stdout: str) -> dict[str, float]:
    """The test metrics Lightning's table printed."""
    scores = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").replace("┃", "│").split("│") if cell.strip()]
        if len(cells) == 2 and cells[0].startswith("test/"):
            scores[cells[0]] = float(cells[1])
    return scores
