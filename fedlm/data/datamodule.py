"""LightningDataModules of task records (rows of named fields) for the model's task.

The module owns the tokenizer and task (they depend on the backbone), so a datamodule holds raw
records until the model connects its task in ``setup``; each split is then encoded once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from fedlm.data.partition import (
    PartitionConfig,
    agreement_partition,
    dirichlet_partition,
    iid_partition,
    quantity_partition,
)
from fedlm.data.records import Record, read_records
from fedlm.data.sampler import BatchDraw, ClientBlock, RoundBatchSampler, ShardBatches
from fedlm.data.sources import (
    Agreement,
    DataError,
    existing_file,
    flowertune_split,
    phrasebank_file,
    phrasebank_levels,
    read_phrasebank,
    split_examples,
)
from fedlm.model.template import EncodedExample, TemplateError
from fedlm.seeding import derive_seed

if TYPE_CHECKING:
    from fedlm.federation.topology import Topology
    from fedlm.tasks import Task

SPLITS_FOR_STAGE = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


RoundLayout = Callable[[int], tuple[list[int], int]]  # round -> (this rank's clients, batches every rank runs)
LISTED_CLIENTS = 16  # clients whose data is described one line each; the rest in one line
LISTED_LABELS = 10  # the most label values a client's line counts (more: its size alone)


class EncodedDataset(Dataset):
    def __init__(self, examples: list[EncodedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.examples[index]


class TaskData(L.LightningDataModule):
    """Base class: subclasses say where the records come from (``load_splits``, ``read_file``).

    Training batches come from a seeded ``RoundBatchSampler`` in centralized and federated runs alike, so a
    run is reproducible from its seeds and one client holding all data trains exactly like centralized.

    Args:
        batch_size: training examples per step and rank (a client with several ranks steps on
            ``batch_size * ranks`` examples).
        eval_batch_size: examples per validation and test batch (null: ``batch_size``).
        num_workers: DataLoader worker processes (0: load in the training process; examples are small).
        partition_seed: seed of the division of the training split among clients (and of ``client_holdout``),
            shared by federated and local-only runs so that both see the same shards.
        client_files: one training file per client, in the same format as the dataset (a site holds only its
            own file; a rank opens only the files of the clients it hosts, and never the pooled training split:
            that is read only by a run that trains on it, centralized). Without it, the training split is
            divided among the clients by ``partition`` with ``partition_seed``. Validation and test stay shared
            (``val_file``/``test_file`` of the subclasses, so that a site needs no other client's sentences).
        partition: how the training split is divided (``PartitionConfig``: iid by default, dirichlet label skew,
            quantity skew; ``FinancialPhraseBank`` adds agreement levels).
        label_field: the field whose values a label-skewed partition divides by, and whose counts describe each
            client's data when it has few values (null: none).
        local_client, local_clients: train without federation on client ``local_client``'s data alone, out of
            ``local_clients`` clients (the local-only baseline: the same shard that client has when federated).
        client_holdout: the fraction of each client's examples it keeps aside as its own held-out set (seeded by
            ``partition_seed``), on which federated runs evaluate the global and personalized models per client
            (``federation.personalize_steps``, ``federation.private_tokens``). Federated and local-only runs
            train on the rest; a centralized run ignores it.
        shuffle_seed: seed of the training batch order.
        bucket_batches: regroup each window of this many training batches by token length, so that batches pad
            less (1: off). Same examples per round, batches in a seeded order.
    """

    partition_kinds: tuple[str, ...] = ("iid", "dirichlet", "quantity")  # the data.partition.kind values it offers

    def __init__(
        self,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        client_files: list[str] | None = None,
        partition_seed: int = 1234,
        partition: PartitionConfig | None = None,
        local_client: int | None = None,
        local_clients: int | None = None,
        client_holdout: float = 0.0,
        shuffle_seed: int = 1234,
        bucket_batches: int = 1,
        label_field: str | None = "label",
    ) -> None:
        super().__init__()
        if (local_client is None) != (local_clients is None) or (
            local_client is not None and not 0 <= local_client < local_clients
        ):
            raise DataError(
                f"data.local_client={local_client} and data.local_clients={local_clients}: give both, with "
                "0 <= local_client < local_clients, or neither."
            )
        if batch_size <= 0:
            raise DataError(f"data.batch_size={batch_size} must be positive.")
        if not 0 <= client_holdout < 1:
            raise DataError(f"data.client_holdout={client_holdout} must be in [0, 1) (0: no per-client held-out set).")
        if bucket_batches <= 0:
            raise DataError(f"data.bucket_batches={bucket_batches} must be at least 1 (1: no length bucketing).")
        partition = PartitionConfig(**partition) if isinstance(partition, dict) else partition or PartitionConfig()
        partition.validate()
        if partition.kind not in self.partition_kinds:
            raise DataError(
                f"data.partition.kind={partition.kind!r} is not available for {type(self).__name__}; use one of "
                f"{list(self.partition_kinds)}."
            )
        if client_files is not None and partition.kind != "iid":
            raise DataError(
                f"data.partition.kind={partition.kind!r} divides the pooled training split, but data.client_files "
                "gives each client its own file; remove data.partition (`fedlm split-data --partition` cuts such "
                "client files), or data.client_files."
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.client_files, self.partition_seed, self.partition = client_files, partition_seed, partition
        self.local_client, self.local_clients = local_client, local_clients
        self.client_holdout = client_holdout
        self.holdouts: dict[int, list[Record]] = {}  # set by federate(): each hosted client's held-out examples
        self.shuffle_seed, self.bucket_batches = shuffle_seed, bucket_batches
        self.splits: dict[str, list[Record]] = {}  # "train" may be absent until a run needs it (``examples``)
        self.files: dict[str, str | None] = {}  # a subclass's train/val/test files, when it reads them separately
        self._partition: list[list[int]] | None = None  # indices into the train split, per client
        self.label_field = label_field
        self.task: Task | None = None
        self.batch_draw: BatchDraw = "shuffle"  # set by the model in connect()
        self._encoded: dict[str, EncodedDataset] = {}
        # Set by federate(); the centralized defaults are one client that holds the whole training split.
        self.train_examples: list[Record] | None = None
        self.blocks: list[ClientBlock] | None = None
        self.round_plan: RoundLayout | None = None
        self.rank_in_client, self.ranks_per_client = 0, 1
        self.eval_shard: tuple[int, int] | None = None  # (rank, world): each rank evaluates its share

    def load_splits(self) -> dict[str, list[Record]]:
        """Validation and test, plus the training split when it is cut from the same file (else ``load_train``)."""
        raise NotImplementedError

    def read_file(self, path: str, field: str = "data.client_files") -> list[Record]:
        """Read one file in the dataset's format (``field``: the config field that named it, for errors)."""
        raise NotImplementedError

    def read_evaluation_files(self) -> dict[str, list[Record]]:
        """``val_file`` and ``test_file``; the training file waits until a run trains on it (``load_train``)."""
        return {split: self.read_file(self.files[split], f"data.{split}_file") for split in ("val", "test")}

    def load_train(self) -> list[Record]:
        """The training split when ``load_splits`` left it out: ``train_file``, read on first use, so that a
        federated rank with ``client_files`` never opens it."""
        if self.files.get("train") is None:
            raise DataError(
                f"{type(self).__name__} has no training split to fit on: data.val_file and data.test_file give only "
                "validation and test. Give data.train_file (`fedlm split-data` writes DIR/train.txt), or "
                "data.client_files for a federated or local-only (data.local_client) run."
            )
        return self.read_file(self.files["train"], "data.train_file")

    def examples(self, split: str) -> list[Record]:
        """A split's examples, the training split read on first use (``load_train``)."""
        if split == "train" and "train" not in self.splits:
            self.splits["train"] = self.load_train()
        return self.splits[split]

    def setup(self, stage: str) -> None:
        if not self.splits:
            self.splits = self.load_splits()
        if self.local_client is not None and self.train_examples is None:
            self.train_examples = self.client_examples(self.local_client, self.local_clients)
        for split in SPLITS_FOR_STAGE.get(stage, ()):
            if split == "train" and (self.train_examples is not None or self.client_files is not None):
                continue  # read when needed: clients' files when the run federates, the pooled split if trained on
            if not self.examples(split):
                raise DataError(f"the {split!r} split is empty ({type(self).__name__}); check the data path and sizes.")

    def client_examples(self, client: int, num_clients: int) -> list[Record]:
        """A client's training examples (without its held-out ones)."""
        return self._client_split(client, num_clients)[0]

    def _client_split(self, client: int, num_clients: int) -> tuple[list[Record], list[Record]]:
        """A client's examples, (training, held-out): ``data.client_holdout`` of them held out, seeded."""
        examples = self._client_all(client, num_clients)
        if self.client_holdout == 0:
            return examples, []
        held = max(1, round(self.client_holdout * len(examples)))
        if held >= len(examples):
            raise DataError(
                f"client {client} has {len(examples)} examples: data.client_holdout={self.client_holdout} would leave "
                "it none to train on; lower data.client_holdout or use fewer clients."
            )
        generator = torch.Generator().manual_seed(derive_seed("client-holdout", self.partition_seed, client))
        order = torch.randperm(len(examples), generator=generator).tolist()
        return [examples[i] for i in sorted(order[held:])], [examples[i] for i in sorted(order[:held])]

    def _client_all(self, client: int, num_clients: int) -> list[Record]:
        """All of a client's examples: its own file, or its part of the partition of the train split."""
        if self.client_files is not None:
            if len(self.client_files) != num_clients:
                raise DataError(
                    f"data.client_files has {len(self.client_files)} entries for {num_clients} clients; give one "
                    "training file per client."
                )
            return self.read_file(self.client_files[client])
        train = self.examples("train")
        return [train[i] for i in self.client_partition(num_clients)[client]]

    def client_partition(self, num_clients: int) -> list[list[int]]:
        """Each client's indices into the train split: made once (every hosted client asks), logged on rank 0."""
        if self._partition is None or len(self._partition) != num_clients:
            self._partition = self.partition_train(num_clients)
            train = self.examples("train")
            labels = self.labels_of(train)
            classes = sorted(set(labels)) if labels is not None else []
            rank_zero_info(
                f"[fedlm data] {len(train)} training examples among {num_clients} clients, partition "
                f"{self.partition.describe()}, data.partition_seed={self.partition_seed}"
            )
            for k, part in enumerate(self._partition[:LISTED_CLIENTS]):
                line = f"[fedlm data] client {k}: {len(part)} examples"
                if labels is not None and len(classes) <= LISTED_LABELS:  # a label histogram only where it is short
                    counts = Counter(labels[i] for i in part)
                    line += ", " + " / ".join(f"{label} {counts[label]}" for label in classes)
                rank_zero_info(line)
            rest = [len(part) for part in self._partition[LISTED_CLIENTS:]]
            if rest:
                rank_zero_info(f"[fedlm data] and {len(rest)} more clients of {min(rest)}-{max(rest)} examples each")
        return self._partition

    def partition_train(self, num_clients: int) -> list[list[int]]:
        """Divide the train split by ``data.partition``; subclasses add their own kinds (``partition_kinds``)."""
        train, config, seed = self.examples("train"), self.partition, self.partition_seed
        if config.kind == "dirichlet":
            labels = self.labels_of(train)
            if labels is None:
                lacking = (
                    "it is null"
                    if self.label_field is None
                    else f"{self._unlabelled(train).origin} has no one value in it"
                )
                raise DataError(
                    f"data.partition.kind=dirichlet skews the clients' labels, read from data.label_field="
                    f"{self.label_field!r}, but {lacking}; set data.label_field to a field that holds one value in "
                    "every record, or use another data.partition.kind."
                )
            return dirichlet_partition(labels, num_clients, config.alpha, seed)
        if config.kind == "quantity":
            return quantity_partition(len(train), num_clients, config.exponent, seed)
        return iid_partition(len(train), num_clients, seed)

    def labels_of(self, examples: list[Record]) -> list[str] | None:
        """Each record's value of ``label_field``; None when there is no label field, or a record lacks a single
        value there (a generation task's records, say)."""
        if self.label_field is None or self._unlabelled(examples) is not None:
            return None
        return [example.fields[self.label_field] for example in examples]

    def _unlabelled(self, examples: list[Record]) -> Record | None:
        """The first record without one string value in ``label_field``."""
        return next((e for e in examples if not isinstance(e.fields.get(self.label_field), str)), None)

    @property
    def simulated(self) -> bool:
        """Whether the clients are parts of one dataset that every process reads (not sites' own files), so that
        any process can run any client."""
        return self.client_files is None

    def federate(
        self,
        topology: Topology,
        local_steps: int | None,
        local_epochs: float | None,
        clients: list[int] | None = None,
        round_plan: RoundLayout | None = None,
    ) -> list[ClientBlock]:
        """Keep only the training examples of ``clients`` (default: those this rank hosts); return their per-round
        blocks. ``round_plan(round)`` gives the clients whose batches make the round on this rank, in order, and
        how many batches every rank runs (the rest are idle steps); by default, every block, as long as it is."""
        if self.local_client is not None:
            raise DataError("data.local_client trains one client alone; remove it, or the federation section.")
        hosted = topology.hosted_clients if clients is None else clients
        self.round_plan = round_plan
        splits = {k: self._client_split(k, topology.num_clients) for k in hosted}
        shards = {k: train for k, (train, _) in splits.items()}
        self.holdouts = {k: held for k, (_, held) in splits.items()}
        global_batch = self.batch_size * topology.ranks_per_client
        blocks, start = [], 0
        for k in hosted:
            size = len(shards[k])
            if size == 0:
                raise DataError(f"client {k} has no training examples; check data.client_files or federation.clients.")
            steps = local_steps if local_steps is not None else math.ceil(local_epochs * size / global_batch)
            blocks.append(ClientBlock(k, tuple(range(start, start + size)), max(1, steps)))
            start += size
        self.train_examples = [example for k in hosted for example in shards[k]]
        self.blocks = blocks
        self.rank_in_client, self.ranks_per_client = topology.rank_in_client, topology.ranks_per_client
        self.eval_shard = (topology.rank, topology.world_size) if topology.world_size > 1 else None
        self._encoded.pop("train", None)
        return blocks

    def client_data(self, client: int) -> tuple[EncodedDataset, EncodedDataset]:
        """A hosted client's encoded (training, held-out) examples, for personalization and its evaluation."""
        block = next(block for block in self.blocks if block.client == client)
        train = self.encoded("train").examples
        return EncodedDataset([train[i] for i in block.indices]), self._encode(self.holdouts[client])

    def connect(self, task: Task, batch_draw: BatchDraw = "shuffle") -> None:
        """Called by the model: encode with its task (tokenizer and template), and draw training batches the way its
        training needs (DP-SGD: ``independent``, the sampling its accountant composes)."""
        if task is not self.task:
            self.task, self._encoded = task, {}
        self.batch_draw = batch_draw

    def encoded(self, split: str) -> EncodedDataset:
        if split not in self._encoded:
            hosted = split == "train" and self.train_examples is not None
            source = self.train_examples if hosted else self.examples(split)
            self._encoded[split] = self._encode(source)
        return self._encoded[split]

    def _encode(self, source: list[Record]) -> EncodedDataset:
        if self.task is None:
            raise RuntimeError("the datamodule is not connected to a model task; call connect(model.task).")
        examples = []
        for index, example in enumerate(source):
            try:
                examples.append(self.task.encode(example.fields, index))
            except TemplateError as err:
                raise DataError(f"{example.origin}: {err}") from None
        return EncodedDataset(examples)

    def train_dataloader(self) -> DataLoader:
        assert self.task is not None
        dataset = self.encoded("train")
        blocks = self.blocks or [ClientBlock(0, tuple(range(len(dataset))), math.ceil(len(dataset) / self.batch_size))]
        pad_to = 0
        if self.round_plan is not None:  # spread clients: rebuilt every round (Lightning reloads it), its own only
            clients, pad_to = self.round_plan(self.trainer.current_epoch)
            by_client = {block.client: block for block in blocks}
            blocks = [by_client[client] for client in clients]
        sampler = RoundBatchSampler(
            blocks,
            self.batch_size,
            self.shuffle_seed,
            self.rank_in_client,
            self.ranks_per_client,
            lengths=[len(example.input_ids) for example in dataset.examples],
            bucket_batches=self.bucket_batches,
            draw=self.batch_draw,
            pad_to=pad_to,
        )
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=self._collate, num_workers=self.num_workers)

    def _collate(self, examples: list[EncodedExample]) -> dict[str, torch.Tensor]:
        """The template's batch, or for an idle step (no examples) a batch of no rows."""
        return self.task.template.collate(examples) if examples else {"label": torch.zeros(0, dtype=torch.long)}

    def _eval_loader(self, split: str) -> DataLoader:
        assert self.task is not None
        dataset = self.encoded(split)
        if self.eval_shard is None:
            batching = {"batch_size": self.eval_batch_size, "collate_fn": self.task.template.collate}
        else:
            shards = ShardBatches(len(dataset), *self.eval_shard, self.eval_batch_size)
            batching = {"batch_sampler": shards, "collate_fn": self._collate}
        return DataLoader(dataset, num_workers=self.num_workers, **batching)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


class FinancialPhraseBank(TaskData):
    """Financial PhraseBank v1.0, split by NeMo's protocol (all-agree: 1811/226/227).

    ``partition: {kind: agreement}`` gives one client per annotator-agreement level (``PartitionConfig.levels``):
    client k holds the sentences whose agreement is exactly that level, each sentence once. Validation and test
    stay the all-agree NeMo split, so that results compare with the other partitions; every sentence in them is
    left out of every client, whatever its level. The training split becomes the union of the clients, so a
    centralized run with this partition trains on exactly the data the clients hold together.

    Args:
        path: the ``FinancialPhraseBank-v1.0`` folder; defaults to the ``FEDLM_FPB_DIR`` environment variable.
            Its file holds every client's training sentences, so a site that must not see them gives
            ``val_file`` and ``test_file`` instead.
        agreement: which file: sentences with at least 50, 66, 75 percent or all annotators agreeing.
        split: ``nemo``: NeMo's split (``train_fraction`` for training, the rest halved into validation and test);
            ``flowertune``: the FlowerTune LLM leaderboard's finance test set (with ``agreement: "50"``, 1,212
            sentences), and ``val_fraction`` of the other sentences for validation (``flowertune_split``).
        train_fraction, split_seed: NeMo's split of that file (``split_examples``); ``split_seed`` also draws
            the flowertune split's validation part.
        val_fraction: the flowertune split's share of the non-test sentences held out for validation.
        val_file, test_file: validation and test as files of ``sentence@label`` lines (``fedlm split-data`` cuts
            them from the NeMo split); with them ``path`` is never opened. Give both, or neither.
        train_file: the pooled training split as such a file, for a run that trains on it (centralized, or
            clients cut by ``partition``); needs ``val_file`` and ``test_file``. Read only when a run needs it:
            a federated run with ``client_files`` never does.
        **kwargs: batching, client, partition and seed options of ``TaskData``.
    """

    partition_kinds = (*TaskData.partition_kinds, "agreement")

    def __init__(
        self,
        path: str | None = None,
        agreement: Agreement = "all",
        split: Literal["nemo", "flowertune"] = "nemo",
        train_fraction: float = 0.8,
        split_seed: int = 1234,
        val_fraction: float = 0.1,
        val_file: str | None = None,
        test_file: str | None = None,
        train_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.files = split_files(train_file, val_file, test_file, "data.path's file is split by NeMo's protocol")
        if val_file is None and train_file is not None:
            raise DataError(
                "data.train_file needs data.val_file and data.test_file (the three files `fedlm split-data` writes); "
                "without them, train, validation and test are all cut from data.path's file."
            )
        if val_file is not None and (path is not None or agreement != "all"):
            raise DataError(
                f"data.path={path!r} and data.agreement={agreement!r} pick the file that validation and test are cut "
                "from, but data.val_file and data.test_file give them; remove data.path and data.agreement."
            )
        if val_file is not None and self.partition.kind == "agreement":
            raise DataError(
                "data.partition.kind=agreement builds its clients from every agreement file under data.path; remove "
                "data.val_file, data.test_file and data.train_file, or cut per-level client files with `fedlm "
                "split-data --partition '{kind: agreement}'` and give them as data.client_files (without "
                "data.partition)."
            )
        if self.partition.kind == "agreement" and agreement != "all":
            raise DataError(
                f"data.partition.kind=agreement takes validation and test from the all-agree split, but "
                f"data.agreement={agreement!r}; set data.agreement: all (data.partition.levels picks the clients)."
            )
        if split == "flowertune" and (val_file is not None or self.partition.kind == "agreement"):
            raise DataError(
                "data.split=flowertune cuts validation and test from data.path's file by FlowerTune's protocol; "
                "remove data.val_file, data.test_file and data.train_file, and give another data.partition.kind."
            )
        self.path, self.agreement, self.split = path, agreement, split
        self.train_fraction, self.split_seed, self.val_fraction = train_fraction, split_seed, val_fraction
        self.train_levels: list[str] = []  # with the agreement partition: each training sentence's level

    def load_splits(self) -> dict[str, list[Record]]:
        if self.files["val"] is not None:
            return self.read_evaluation_files()
        if self.client_files is not None:
            rank_zero_warn(
                "data.client_files with data.path: every rank still reads data.path's file, which holds every "
                "client's training sentences, to cut validation and test. `fedlm split-data` writes them as files "
                "(data.val_file, data.test_file), so that a site needs only its own training file."
            )
        examples = read_phrasebank(phrasebank_file(self.path, self.agreement))
        if self.split == "flowertune":
            return flowertune_split(examples, self.val_fraction, self.split_seed)
        splits = split_examples(examples, self.train_fraction, self.split_seed)
        if self.partition.kind == "agreement":
            held_out = {example.fields["sentence"] for split in ("val", "test") for example in splits[split]}
            by_level = phrasebank_levels(self.path)
            levels = self.partition.levels
            train = [(e, level) for level in levels for e in by_level[level] if e.fields["sentence"] not in held_out]
            splits["train"] = [example for example, _ in train]
            self.train_levels = [level for _, level in train]
        return splits

    def partition_train(self, num_clients: int) -> list[list[int]]:
        if self.partition.kind == "agreement":
            return agreement_partition(self.train_levels, self.partition.levels, num_clients)
        return super().partition_train(num_clients)

    def read_file(self, path: str, field: str = "data.client_files") -> list[Record]:
        return read_phrasebank(existing_file(path, field))


class RecordFiles(TaskData):
    """Your own task from JSONL, CSV or Parquet files (read through Hugging Face ``datasets``), or a hub dataset.

    Give ``val_file`` and ``test_file`` both, or neither: then ``train_file`` is split like Financial
    PhraseBank (``train_fraction`` for training, the rest halved into val and test). With both, ``train_file``
    is read only by a run that trains on it, and may be left out when ``client_files`` gives the training data
    (a site then needs only its own file and the shared evaluation files).

    Args:
        train_file, val_file, test_file: ``.jsonl``, ``.csv`` (with a header) or ``.parquet`` files, or a hub
            dataset id (its ``train``, ``validation`` and ``test`` splits, where the machine is online).
        fields: the template's field name -> the column that holds it (null: every column under its own name).
            A classification task's answer field holds class names, keys of ``model.task.label_words``.
        train_fraction, split_seed: without ``val_file``/``test_file``, the seeded split of ``train_file``.
        **kwargs: batching, client, partition and seed options of ``TaskData``.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        fields: dict[str, str] | None = None,
        train_fraction: float = 0.8,
        split_seed: int = 1234,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.files = split_files(train_file, val_file, test_file, "data.train_file is split")
        if val_file is None and train_file is None:
            raise DataError(
                "give data.train_file (it is split into train, validation and test), or data.val_file and "
                "data.test_file (with data.train_file or data.client_files for training)."
            )
        self.fields = fields
        self.train_fraction, self.split_seed = train_fraction, split_seed

    def read_file(self, path: str, field: str = "data.client_files") -> list[Record]:
        hub_split = {"data.val_file": "validation", "data.test_file": "test"}.get(field, "train")
        return read_records(path, self.fields, field, hub_split)

    def load_splits(self) -> dict[str, list[Record]]:
        if self.files["val"] is None:
            pooled = self.read_file(self.files["train"], "data.train_file")
            return split_examples(pooled, self.train_fraction, self.split_seed)
        return self.read_evaluation_files()


def split_files(
    train_file: str | None, val_file: str | None, test_file: str | None, otherwise: str
) -> dict[str, str | None]:
    """The ``files`` of a datamodule; validation and test come as a pair (``otherwise``: what happens without)."""
    if (val_file is None) != (test_file is None):
        raise DataError(f"give data.val_file and data.test_file both, or neither (then {otherwise}).")
    return {"train": train_file, "val": val_file, "test": test_file}
