import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningArgumentParser

from fedlm.data import DataError, FinancialPhraseBank, Record, RecordFiles, TaskData
from fedlm.data.partition import agreement_partition, dirichlet_partition, iid_partition, quantity_partition
from fedlm.data.sources import PHRASEBANK_FILES
from fedlm.federation.topology import Topology

# 600 examples, imbalanced like Financial PhraseBank (mostly neutral)
LABELS = [["negative", "neutral", "neutral", "neutral", "positive", "positive"][i % 6] for i in range(600)]
PARTITIONERS: dict[str, Callable[[int], list[list[int]]]] = {
    "iid": lambda seed: iid_partition(len(LABELS), 5, seed),
    "dirichlet": lambda seed: dirichlet_partition(LABELS, 5, 0.5, seed),
    "quantity": lambda seed: quantity_partition(len(LABELS), 5, 1.5, seed),
}
# Sentences per exact agreement level in the synthetic folder (the all-agree file is split 32/4/4 by NeMo's protocol).
LEVEL_SIZES = {"50": 10, "66": 15, "75": 20, "all": 40}


@pytest.fixture()
def nested_fpb(tmp_path: Path) -> Path:
    """A Financial PhraseBank folder whose four files are nested like the real ones (50 contains 66 ... all).

    Each level's sentences are interleaved with the higher levels' in the files, and one level-50 sentence is
    repeated, as the real 50Agree file repeats a few.
    """
    folder = tmp_path / "FinancialPhraseBank-v1.0"
    folder.mkdir()
    lines: list[str] = []
    for level, file in reversed(PHRASEBANK_FILES.items()):
        labels = ["negative", "neutral", "positive"]
        own = [f"level {level} sentence {i} .@{labels[i % 3]}" for i in range(LEVEL_SIZES[level])]
        lines = [line for pair in zip(own, lines) for line in pair] + own[len(lines) :] + lines[len(own) :]
        if level == "50":
            lines.append(own[0])
        (folder / file).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder


def level_of(text: str) -> str:
    return text.split()[1]


def sentence(record: Record) -> str:
    return record.fields["sentence"]


def total_variation(part: list[int]) -> float:
    counts, overall = Counter(LABELS[i] for i in part), Counter(LABELS)
    return sum(abs(counts[c] / len(part) - overall[c] / len(LABELS)) for c in overall) / 2


@pytest.mark.parametrize("kind", PARTITIONERS)
def test_partitions_are_disjoint_complete_sorted_seeded_and_never_leave_a_client_empty(kind: str) -> None:
    parts = PARTITIONERS[kind](1)
    assert len(parts) == 5 and all(parts)
    assert sorted(i for part in parts for i in part) == list(range(len(LABELS)))  # disjoint and complete
    assert all(part == sorted(part) for part in parts)
    assert parts == PARTITIONERS[kind](1) and parts != PARTITIONERS[kind](2)


def test_label_skew_grows_as_alpha_falls() -> None:
    def mean_distance(alpha: float) -> float:
        parts = [part for seed in range(3) for part in dirichlet_partition(LABELS, 5, alpha, seed)]
        return sum(map(total_variation, parts)) / len(parts)

    skewed, mild, near_iid = mean_distance(0.1), mean_distance(1.0), mean_distance(100.0)
    assert skewed > mild > near_iid
    assert skewed > 0.3 and near_iid < 0.05


def test_quantity_sizes_follow_the_power_law_with_iid_labels() -> None:
    sizes = [len(part) for part in quantity_partition(1811, 4, 1.0, seed=0)]
    weights = [1, 1 / 2, 1 / 3, 1 / 4]
    assert sum(sizes) == 1811 and sizes == sorted(sizes, reverse=True)
    assert all(abs(n - 1811 * w / sum(weights)) < 1 for n, w in zip(sizes, weights))
    assert [len(part) for part in quantity_partition(10, 3, 0.0, seed=0)] == [4, 3, 3]  # exponent 0: equal sizes
    assert max(map(total_variation, quantity_partition(len(LABELS), 3, 1.0, seed=0))) < 0.1


@pytest.mark.parametrize(
    ("partition", "message"),
    [
        (lambda: iid_partition(4, 5, seed=0), "federation.clients=5 is more than the 4 training examples"),
        (lambda: dirichlet_partition(LABELS[:30], 20, 0.001, seed=0), "data.partition.alpha=0.001 left a client"),
        (lambda: quantity_partition(20, 5, 3.0, seed=0), "data.partition.exponent=3.0 leaves client 4 none"),
        (lambda: agreement_partition(["50", "all"], ["50", "66", "all"], 3), r"client 1 \(agreement level '66'\)"),
        (lambda: agreement_partition(["50", "all"], ["50", "all"], 3), "set federation.clients .* to 2"),
    ],
)
def test_a_client_without_examples_is_refused(partition: Callable[[], object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        partition()


def test_agreement_clients_hold_their_exact_level_once_and_no_validation_or_test_sentence(nested_fpb: Path) -> None:
    data = FinancialPhraseBank(path=str(nested_fpb), partition={"kind": "agreement"})
    data.setup("fit")
    held_out = {sentence(e) for split in ("val", "test") for e in data.splits[split]}
    assert len(held_out) == 8 and {level_of(text) for text in held_out} == {"all"}
    blocks = data.federate(Topology(4, 1, 0), local_steps=1, local_epochs=None)
    clients = [[data.train_examples[i] for i in block.indices] for block in blocks]
    for level, examples in zip(PHRASEBANK_FILES, clients):
        texts = [sentence(e) for e in examples]
        assert {level_of(text) for text in texts} == {level}
        assert len(texts) == len(set(texts)) == LEVEL_SIZES[level] - (8 if level == "all" else 0)
        assert not held_out & set(texts)
        assert all(PHRASEBANK_FILES[level] in e.origin for e in examples)  # read from its own level's file
    assert sorted(map(sentence, data.train_examples)) == sorted(map(sentence, data.splits["train"]))


def test_agreement_levels_choose_the_clients(nested_fpb: Path) -> None:
    data = FinancialPhraseBank(path=str(nested_fpb), partition={"kind": "agreement", "levels": ["all", "50"]})
    data.setup("fit")
    assert [len(part) for part in data.client_partition(2)] == [32, 10]
    with pytest.raises(DataError, match=r"levels=\['all', '50'\] \(2 clients\), but there are 3"):
        data.client_examples(0, 3)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: FinancialPhraseBank(path=d, agreement="75", partition={"kind": "agreement"}), "data.agreement: all"),
        (lambda d: RecordFiles(train_file=d, partition={"kind": "agreement"}), "not available for RecordFiles"),
        (lambda d: TaskData(partition={"kind": "agreement"}), "'agreement' is not available for TaskData"),
        (lambda d: FinancialPhraseBank(path=d, partition={"kind": "lexfile"}), "not available for FinancialPhrase"),
        (lambda d: FinancialPhraseBank(client_files=[d], partition={"kind": "quantity"}), "data.client_files gives"),
        (lambda d: FinancialPhraseBank(partition={"kind": "dirichlet", "alpha": 0.0}), "data.partition.alpha=0.0"),
        (lambda d: FinancialPhraseBank(partition={"kind": "quantity", "exponent": -1}), "data.partition.exponent=-1"),
        (lambda d: FinancialPhraseBank(partition={"kind": "agreement", "levels": ["40"]}), "data.partition.levels"),
    ],
)
def test_bad_partition_configs_name_the_field(make: Callable[[str], object], message: str, nested_fpb: Path) -> None:
    with pytest.raises(DataError, match=message):
        make(str(nested_fpb))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # instantiate_classes, which LightningCLI calls too
def test_dirichlet_from_the_config_gives_its_clients_and_logs_them(
    synthetic_fpb: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = f"""
    class_path: fedlm.data.FinancialPhraseBank
    init_args:
      path: {synthetic_fpb}
      partition_seed: 7
      partition:
        kind: dirichlet
        alpha: 0.3
    """
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(TaskData, "data", subclass_mode=True)  # as LightningCLI does
    data = parser.instantiate_classes(parser.parse_object({"data": yaml.safe_load(config)})).data
    assert (data.partition.kind, data.partition.alpha, data.partition.exponent) == ("dirichlet", 0.3, 1.0)
    data.setup("fit")
    with caplog.at_level(logging.INFO):
        blocks = data.federate(Topology(3, 1, 0), local_steps=1, local_epochs=None)
    expected = dirichlet_partition([e.fields["label"] for e in data.splits["train"]], 3, 0.3, seed=7)
    assert [len(block.indices) for block in blocks] == [len(part) for part in expected]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[fedlm data] client")]
    counts = [Counter(data.splits["train"][i].fields["label"] for i in part) for part in expected]
    assert logged == [
        f"[fedlm data] client {k}: {len(part)} examples, negative {c['negative']} / neutral {c['neutral']} / "
        f"positive {c['positive']}"
        for k, (part, c) in enumerate(zip(expected, counts))
    ]


def test_records_without_labels_are_partitioned_and_logged_by_size_but_refuse_label_skew(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "qa.jsonl"
    file.write_text("".join(f'{{"question": "q{i}", "answer": "a{i}"}}\n' for i in range(40)))
    data = RecordFiles(train_file=str(file), partition={"kind": "dirichlet"})  # data.label_field: label, absent
    data.setup("fit")
    with pytest.raises(DataError, match=r"data.label_field='label', but .*qa\.jsonl:\d+ has no one value in it"):
        data.client_partition(2)
    data = RecordFiles(train_file=str(file))
    data.setup("fit")
    with caplog.at_level(logging.INFO):
        data.client_partition(2)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[fedlm data] client")]
    assert logged == ["[fedlm data] client 0: 16 examples", "[fedlm data] client 1: 16 examples"]
