"""Data locality: ``fedlm split-data`` cuts each site's files, a run on them is the partitioned run, and a rank opens
no other client's training data (recorded by an audit hook on ``open``)."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import synthetic_sentences
from helpers import (
    FEDERATION,
    REPO,
    assert_opened_only_its_own,
    opened_by,
    printed_config,
    run_ranks,
    split_data,
    start_worker,
    torchrun,
    with_data,
    write_config,
)
from lightning.pytorch.cli import LightningArgumentParser
from test_wordnet import write_wordnet

from fedlm.cli.split_data import split_data_main
from fedlm.data import DataError, FinancialPhraseBank, Record, RecordFiles, TaskData, WordNet
from fedlm.data.sources import read_phrasebank
from fedlm.federation import Topology

SPLIT_FILES = ["site0.txt", "site1.txt", "test.txt", "train.txt", "val.txt"]


def texts(examples: list[Record]) -> list[tuple[str, str]]:
    return [(e.fields["sentence"], e.fields["label"]) for e in examples]


# -- the split command ---------------------------------------------------------------------------------------


def latin1_fpb(parent: Path) -> Path:
    """A Financial PhraseBank folder in v1.0's latin-1, with one non-ASCII sentence."""
    folder = parent / "FinancialPhraseBank-v1.0"
    folder.mkdir()
    lines = [f"{s}@{label}" for s, label in synthetic_sentences(119)] + ["A café opened in Espoo .@neutral"]
    (folder / "Sentences_AllAgree.txt").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder


@pytest.mark.parametrize("partition", [None, "{kind: dirichlet, alpha: 0.5}"], ids=["iid", "dirichlet"])
def test_split_data_writes_the_files_of_the_partitioned_run(
    partition: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fpb = latin1_fpb(tmp_path)
    seeds = ["--partition_seed", "7", "--split_seed", "3"]
    out = split_data(fpb, tmp_path / "split", *seeds, *(["--partition", partition] if partition else []))
    assert sorted(p.name for p in out.iterdir()) == SPLIT_FILES  # nothing else, no partial file left
    pooled = FinancialPhraseBank(
        path=str(fpb), partition_seed=7, split_seed=3, partition=yaml.safe_load(partition or "{}")
    )
    pooled.setup("fit")
    for split in ("train", "val", "test"):
        assert texts(read_phrasebank(out / f"{split}.txt")) == texts(pooled.splits[split])  # same order
    for k in (0, 1):
        assert texts(read_phrasebank(out / f"site{k}.txt")) == texts(pooled.client_examples(k, 2))
    written = {name: (out / name).read_bytes().decode("utf-8") for name in SPLIT_FILES}  # UTF-8, whatever came in
    assert (
        sum("A café opened in Espoo .@neutral\n" in written[f"{split}.txt"] for split in ("train", "val", "test")) == 1
    )
    sizes = {name: len(read_phrasebank(out / name)) for name in SPLIT_FILES}
    assert [sizes[f"{split}.txt"] for split in ("train", "val", "test")] == [96, 12, 12]
    assert sizes["site0.txt"] + sizes["site1.txt"] == 96
    if partition is None:
        assert sizes["site0.txt"] == sizes["site1.txt"] == 48
    printed = capsys.readouterr().out
    for name, size in sizes.items():
        assert f"{out / name}: {size} sentences (negative " in printed


def test_split_data_refuses_the_checkout_a_full_folder_and_a_bad_partition(
    synthetic_fpb: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inside = REPO / "fpb-sites-must-not-be-here"
    for out, args, message in [
        (inside, [], f"lies inside the fedlm checkout {REPO}"),
        (tmp_path / "c", ["--partition", "[iid]"], "is not a mapping of data.partition's fields"),
        (tmp_path / "d", ["--path", str(tmp_path / "nowhere")], "Sentences_AllAgree.txt does not exist"),
    ]:
        with pytest.raises(SystemExit):
            split_data(synthetic_fpb, out, *args)
        assert message in capsys.readouterr().err
    assert not inside.exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    split_data(synthetic_fpb, tmp_path / "e")
    with pytest.raises(SystemExit):
        split_data(synthetic_fpb, tmp_path / "e")
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    split_data(synthetic_fpb, tmp_path / "e", "--force")


# -- any task's data, as record files --------------------------------------------------------------------------

WORDNET_CONFIGS = [
    REPO / "configs/wordnet/definition_centralized.yaml",
    REPO / "configs/wordnet/definition_federated.yaml",
]
RECORD_FILES = ["site0.jsonl", "site1.jsonl", "site2.jsonl", "test.jsonl", "train.jsonl", "val.jsonl"]
TINY_WORDNET = {"train_size": 4, "val_size": 2, "test_size": 1, "split_seed": 0}  # every lexfile site gets records


def fields(records: list[Record]) -> list[dict]:
    return [record.fields for record in records]


@pytest.fixture
def wordnet_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, WordNet, dict]:
    """The WordNet definition configs (3 clients by lexicographer file) on the tiny fixture, cut by `fedlm split-data`:
    the folder, the partitioned datamodule of the same config, and the data section that the command printed."""
    folder = write_wordnet(tmp_path / "wordnet")
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({"data": {"init_args": {"path": str(folder), **TINY_WORDNET}}}))
    configs = [arg for config in (*WORDNET_CONFIGS, tiny) for arg in ("--config", str(config))]
    capsys.readouterr()
    split_data_main(["--out", str(tmp_path / "split"), *configs])  # federation.clients: 3 from the federated config
    printed = capsys.readouterr().out
    section = yaml.safe_load(printed.split("as one more --config file:\n", 1)[1].split("[fedlm split-data]", 1)[0])
    pooled = WordNet(path=str(folder), partition={"kind": "lexfile"}, **TINY_WORDNET)
    pooled.setup("fit")
    for name, records in [(f"{s}.jsonl", pooled.splits[s]) for s in ("train", "val", "test")] + [
        (f"site{k}.jsonl", pooled.client_examples(k, 3)) for k in range(3)
    ]:
        assert f"{tmp_path / 'split' / name}: {len(records)} records\n" in printed
    return tmp_path / "split", pooled, section


def test_split_data_cuts_any_task_data_into_record_files_of_the_partitioned_run(
    wordnet_split: tuple[Path, WordNet, dict],
) -> None:
    split, pooled, section = wordnet_split
    assert sorted(p.name for p in split.iterdir()) == RECORD_FILES  # nothing else, no partial file left
    sites = [str(split / f"site{k}.jsonl") for k in range(3)]
    evaluation = {"val_file": str(split / "val.jsonl"), "test_file": str(split / "test.jsonl")}
    assert section == {
        "data": {
            "class_path": "fedlm.data.RecordFiles",
            "init_args": {
                "client_files": sites,
                **evaluation,
                "batch_size": 16,  # the config's batching options are kept
                "eval_batch_size": 32,
                "partition_seed": 1234,
                "partition": {"kind": "iid"},
                "label_field": None,  # WordNet's own default
            },
        }
    }
    files = RecordFiles(client_files=sites, **evaluation)
    files.setup("fit")
    for split_name in ("val", "test"):
        assert fields(files.examples(split_name)) == fields(pooled.examples(split_name))  # same records, same order
    for k in range(3):
        site = fields(files.client_examples(k, 3))
        assert site == fields(pooled.client_examples(k, 3)) and site  # each site: its lexicographer files' records
        assert {record["lexname"].split(".")[0] for record in site} <= [{"noun"}, {"verb"}, {"adj", "adv"}][k]
    central = RecordFiles(train_file=str(split / "train.jsonl"), **evaluation)
    assert fields(central.examples("train")) == fields(pooled.examples("train"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # instantiate_classes, which LightningCLI calls too
@pytest.mark.parametrize("composed", [True, False], ids=["one_more_config", "in_place_of_the_data_section"])
def test_a_run_config_naming_the_record_files_parses(
    composed: bool, wordnet_split: tuple[Path, WordNet, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split, pooled, section = wordnet_split
    if composed:  # the printed section after the WordNet configs: their lexfile partition gives way to iid
        (tmp_path / "sites.yaml").write_text(yaml.safe_dump(section))
        configs = [*WORDNET_CONFIGS, tmp_path / "sites.yaml"]
    else:
        run = yaml.safe_load(WORDNET_CONFIGS[0].read_text()) | section
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
        configs = [tmp_path / "run.yaml"]
    config = printed_config(capsys, "fit", *(arg for c in configs for arg in ("--config", str(c))))
    assert config["data"]["class_path"] == "fedlm.data.RecordFiles"
    assert config["data"]["init_args"]["partition"]["kind"] == "iid"
    assert config["model"]["task"]["template"].endswith("Definition:{gloss}")
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(TaskData, "data", subclass_mode=True)  # as LightningCLI does
    data = parser.instantiate_classes(parser.parse_object({"data": config["data"]})).data
    assert isinstance(data, RecordFiles) and data.client_files == section["data"]["init_args"]["client_files"]
    data.setup("fit")
    assert fields(data.examples("test")) == fields(pooled.examples("test"))
    assert [fields(data.client_examples(k, 3)) for k in range(3)] == [
        fields(pooled.client_examples(k, 3)) for k in range(3)
    ]


def test_split_data_refuses_a_config_without_a_data_class_and_the_checkout_for_any_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inside = REPO / "wordnet-sites-must-not-be-here"
    cases = [
        (inside, {"data": {"class_path": "fedlm.data.WordNet"}}, "must not be committed either"),
        (tmp_path / "a", {"data": {"init_args": {"task": "definition"}}}, "give no data.class_path"),
        (tmp_path / "b", {"data": {"class_path": "fedlm.data.Record"}}, "is not a fedlm data class"),
        (tmp_path / "c", {"data": {"class_path": "fedlm.data.WordNet", "init_args": {"rows": 3}}}, "unexpected"),
    ]
    for out, config, message in cases:
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        with pytest.raises(SystemExit):
            split_data_main(["--out", str(out), "--config", str(tmp_path / "config.yaml")])
        assert message in capsys.readouterr().err
        assert not out.exists()


# -- the datamodule on those files ---------------------------------------------------------------------------


def test_split_files_give_the_pooled_splits_and_clients_and_the_training_file_is_read_only_if_trained_on(
    synthetic_fpb: Path, tmp_path: Path
) -> None:
    split = split_data(synthetic_fpb, tmp_path / "split", "--partition_seed", "7")
    evaluation = {"val_file": str(split / "val.txt"), "test_file": str(split / "test.txt")}
    sites = [str(split / f"site{k}.txt") for k in (0, 1)]
    pooled = FinancialPhraseBank(path=str(synthetic_fpb), partition_seed=7, client_holdout=0.25)
    pooled.setup("fit")
    central = FinancialPhraseBank(
        **evaluation, train_file=str(split / "train.txt"), partition_seed=7, client_holdout=0.25
    )
    central.setup("fit")
    assert {s: texts(v) for s, v in central.splits.items()} == {s: texts(v) for s, v in pooled.splits.items()}
    clients = FinancialPhraseBank(**evaluation, client_files=sites, partition_seed=7, client_holdout=0.25)
    clients.setup("fit")
    for k in (0, 1):  # the same training and held-out examples per client (the holdout is seeded per client)
        assert [texts(part) for part in clients._client_split(k, 2)] == [
            texts(part) for part in pooled._client_split(k, 2)
        ]

    # with client_files, train_file is read only by a run that trains on it (here: a missing file, never opened)
    lazy = FinancialPhraseBank(**evaluation, client_files=sites, train_file=str(tmp_path / "elsewhere.txt"))
    lazy.setup("fit")
    lazy.federate(Topology(2, 2, 1), local_steps=1, local_epochs=None)
    assert "train" not in lazy.splits and {e.origin.split(":")[0] for e in lazy.train_examples} == {sites[1]}
    with pytest.raises(DataError, match="data.train_file: .*elsewhere.txt does not exist"):
        FinancialPhraseBank(**evaluation, client_files=sites, train_file=str(tmp_path / "elsewhere.txt")).examples(
            "train"
        )


# -- real runs -----------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_a_federated_run_on_the_split_files_is_bitwise_the_partitioned_run(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """One process simulating both clients, from the pooled file and from the files (the two runs side by side)."""
    split = split_data(synthetic_fpb, tmp_path / "split")
    configs = {}
    for name in ("pooled", "files"):
        (tmp_path / name).mkdir()
        configs[name] = write_config(tmp_path / name, tiny_gpt2_dir, synthetic_fpb, FEDERATION)
    with_data(configs["files"], client_files=[str(split / "site0.txt"), str(split / "site1.txt")],
              val_file=str(split / "val.txt"), test_file=str(split / "test.txt"))  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(configs, pool.map(lambda name: run_ranks(tmp_path / name, configs[name], 1, "--test_after_fit",
                                                                 "true"), configs)))  # fmt: skip
    for result, _ in runs.values():
        assert result.returncode == 0, result.stderr[-3000:]
    (_, (pooled,)), (_, (files,)) = runs["pooled"], runs["files"]
    assert files["losses"] == pooled["losses"] and len(pooled["losses"]) == 3 * 2 * 3  # step for step
    for a, b in zip(pooled["rounds"], files["rounds"], strict=True):
        assert a["weights"] == b["weights"] and a["global"].equal(b["global"])
        assert all(a["client_params"][k].equal(b["client_params"][k]) for k in (0, 1))
    metrics = {name: json.loads((tmp_path / name / "test_metrics.json").read_text()) for name in configs}
    tested = {name: {k: v for k, v in m.items() if k.startswith("test/")} for name, m in metrics.items()}
    assert tested["files"] == tested["pooled"] and "test/acc" in tested["pooled"]


@pytest.mark.multiprocess
def test_a_rank_opens_only_its_own_clients_training_file(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    """Two ranks, one client each, on one machine: each client's file in a folder of its own, the evaluation files
    in a shared one. The pooled file stays reachable (FEDLM_FPB_DIR) and is never opened."""
    split = split_data(synthetic_fpb, tmp_path / "split")
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("val.txt", "test.txt"):
        shutil.copyfile(split / name, shared / name)
    sites = [tmp_path / f"site{k}" / f"site{k}.txt" for k in (0, 1)]
    for site in sites:
        site.parent.mkdir()
        shutil.copyfile(split / site.name, site)
    config = with_data(write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, FEDERATION),
                       client_files=[str(s) for s in sites], val_file=str(shared / "val.txt"),
                       test_file=str(shared / "test.txt"))  # fmt: skip
    out, env = tmp_path / "out", {"FEDLM_FPB_DIR": str(synthetic_fpb)}
    process = start_worker("audited_worker.py", out, config, torchrun(2), "--test_after_fit", "true", env=env)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    for rank in (0, 1):
        opened = opened_by(out, rank)
        own = [sites[rank], shared / "val.txt", shared / "test.txt"]
        assert_opened_only_its_own(opened, own, forbidden=[sites[1 - rank].parent, split, synthetic_fpb])
