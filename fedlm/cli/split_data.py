"""``fedlm split-data --out DIR``: a task's data cut into the files each site needs, outside the repository.

Without ``--config`` the data is Financial PhraseBank, named by the flags: DIR gets ``val.txt`` and ``test.txt``
(the shared evaluation splits), ``train.txt`` (the pooled training split, for a centralized run) and ``site{k}.txt``
(client k's training examples), as UTF-8 ``sentence@label`` lines. With ``--config FILE`` (repeatable, composed as
``fedlm fit`` composes them) the data is the config's ``data:`` section, any ``TaskData`` class with its init_args
(``federation.clients`` the default client count); for a class other than ``FinancialPhraseBank`` the same files
are JSON lines of the records' fields (``val.jsonl`` ... ``site{k}.jsonl``), which ``fedlm.data.RecordFiles``
reads back as the same records.

The files are cut by the datamodule itself (its split, then ``data.partition`` with ``data.partition_seed``), each
in the order the partitioned run holds it, so a run on ``data.client_files`` + ``data.val_file`` +
``data.test_file`` trains bitwise as the partitioned run on the pooled data does, while a site holds only its own
file.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from fedlm.checkpointing import atomic_write
from fedlm.data import FinancialPhraseBank, Record, TaskData
from fedlm.data.partition import PartitionConfig
from fedlm.data.records import write_jsonl
from fedlm.data.sources import PHRASEBANK_FILES, PHRASEBANK_LABELS, format_phrasebank
from fedlm.errors import FedlmError

DEFAULT_CLIENTS = 3
# the flags that set data.init_args of the same names (default: the config's, else the data class's own)
DATA_FLAGS = ("path", "agreement", "train_fraction", "split_seed", "partition_seed", "partition")
# TaskData's options that a RecordFiles run on the split files keeps from the config (the rest name the source)
FILE_RUN_DROPS = {"self", "client_files", "partition"}
LISTED_LABELS = 10  # a file's label counts are printed only when there are at most this many label values


def checkout_holding(folder: Path) -> Path | None:
    """The fedlm git work tree that ``folder`` lies in, if any: derived files there could be committed, which the
    data's license (CC BY-NC-SA) forbids. Any clone or worktree of fedlm counts, not just the running one."""
    for parent in (folder.resolve(), *folder.resolve().parents):
        if (parent / ".git").exists() and (parent / "fedlm" / "__init__.py").is_file():
            return parent
    return None


def file_suffix(data: TaskData) -> str:
    """``.txt`` (``sentence@label`` lines) for Financial PhraseBank, whose own files are such lines; else ``.jsonl``."""
    return ".txt" if isinstance(data, FinancialPhraseBank) else ".jsonl"


def site_files(data: TaskData, clients: int) -> dict[str, list[Record]]:
    """What each file holds: the splits and every client's examples, as the partitioned run has them."""
    data.setup("fit")
    suffix = file_suffix(data)
    files = {f"{split}{suffix}": data.examples(split) for split in ("val", "test", "train")}
    return files | {f"site{k}{suffix}": data.client_examples(k, clients) for k in range(clients)}


def write_examples(file: Path, examples: list[Record]) -> None:
    if file.suffix == ".txt":
        atomic_write(file, lambda handle: handle.write(format_phrasebank(examples).encode("utf-8")))
    else:
        write_jsonl(examples, file)


def partition_config(text: str) -> PartitionConfig:
    """``--partition``: a YAML mapping of ``data.partition``'s fields."""
    try:
        return PartitionConfig(**yaml.safe_load(text))
    except (TypeError, yaml.YAMLError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a mapping of data.partition's fields (kind, alpha, exponent, levels), e.g. "
            "'{kind: dirichlet, alpha: 0.5}'"
        ) from None


def histogram(examples: list[Record]) -> str:
    counts = Counter(example.fields["label"] for example in examples)
    return " / ".join(f"{label} {counts[label]}" for label in PHRASEBANK_LABELS)


def described(data: TaskData, examples: list[Record]) -> str:
    """A file's size, with its label counts where the data has a label field of few values."""
    if isinstance(data, FinancialPhraseBank):
        return f"{len(examples)} sentences ({histogram(examples)})"
    labels = data.labels_of(examples) if examples else None
    counts = Counter(labels or ())
    if not counts or len(counts) > LISTED_LABELS:
        return f"{len(examples)} records"
    return f"{len(examples)} records ({' / '.join(f'{label} {counts[label]}' for label in sorted(counts))})"


def merged(base: dict, override: dict) -> dict:
    """``override`` over ``base`` key by key, as later ``--config`` files win; a data section naming another
    ``class_path`` replaces the earlier one's init_args (they belong to the other class)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            earlier = out[key]
            other_class = "class_path" in value and value["class_path"] != earlier.get("class_path")
            out[key] = dict(value) if other_class else merged(earlier, value)
        else:
            out[key] = value
    return out


def read_configs(files: list[Path]) -> dict:
    """The run configs ``files``, composed (later files win, key by key)."""
    config: dict = {}
    for file in files:
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except OSError as err:
            raise FedlmError(f"--config {file}: cannot read it ({err.strerror}).") from None
        except yaml.YAMLError as err:
            raise FedlmError(f"--config {file}: not valid YAML ({err}).") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise FedlmError(f"--config {file}: not a mapping of config sections (model:, data:, ...).")
        config = merged(config, loaded or {})
    return config


def data_class(class_path: object) -> type[TaskData]:
    """The ``TaskData`` subclass that ``data.class_path`` names (``module.Class``)."""
    module_name, _, name = str(class_path).rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError):
        found = None
    if not (isinstance(found, type) and issubclass(found, TaskData)):
        raise FedlmError(
            f"data.class_path={class_path!r} is not a fedlm data class (module.Class, a subclass of "
            "fedlm.data.TaskData, e.g. fedlm.data.WordNet)."
        )
    return found


def configured_data(config: dict) -> tuple[type[TaskData], dict[str, Any]]:
    """The data class and init_args of a composed config's ``data:`` section."""
    section = config.get("data")
    if not isinstance(section, dict) or "class_path" not in section:
        raise FedlmError(
            "the --config files give no data.class_path (a data: section with class_path and init_args); give the "
            "base config of the run first, e.g. --config configs/wordnet/definition_centralized.yaml."
        )
    init_args = section.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise FedlmError(f"data.init_args={init_args!r} is not a mapping of the data class's options.")
    return data_class(section["class_path"]), dict(init_args)


def configured_clients(config: dict) -> int:
    """``federation.clients`` (else ``data.init_args.local_clients``) of the config, else ``DEFAULT_CLIENTS``."""
    federation = config.get("federation")
    if isinstance(federation, dict) and federation.get("clients") is not None:
        return int(federation["clients"])
    init_args = (config.get("data") or {}).get("init_args") or {}
    return int(init_args.get("local_clients") or DEFAULT_CLIENTS)


def instantiate(cls: type[TaskData], init_args: dict[str, Any]) -> TaskData:
    try:
        return cls(**init_args)
    except TypeError as err:  # an option the class does not take, or a value of the wrong kind
        raise FedlmError(f"data.init_args for {cls.__module__}.{cls.__name__}: {err}.") from None


def file_run_args(data: TaskData, init_args: dict[str, Any]) -> dict[str, Any]:
    """The options of a ``RecordFiles`` run on the split files that keep the run as it was: the config's batching,
    holdout and seed options (``TaskData``'s), ``partition_seed`` always (it seeds ``client_holdout``), an iid
    partition (the files are the clients: composed after the config, its own partition kind would stay, as
    jsonargparse keeps the init_args that both classes take), and the data class's label field where it differs
    from ``RecordFiles``' default."""
    taken = set(inspect.signature(TaskData.__init__).parameters) - FILE_RUN_DROPS
    kept = {name: value for name, value in init_args.items() if name in taken}
    kept |= {"partition_seed": data.partition_seed, "partition": {"kind": "iid"}}
    label_default = inspect.signature(TaskData.__init__).parameters["label_field"].default
    if "label_field" not in kept and data.label_field != label_default:
        kept["label_field"] = data.label_field
    return kept


def split_data_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedlm split-data",
        description=__doc__.split("\n\n")[0],
        epilog="Without --config the data is Financial PhraseBank; with it, --path, --agreement, --train_fraction, "
        "--split_seed, --partition_seed and --partition override the config's data.init_args of the same names.",
    )
    parser.add_argument(
        "--out", metavar="DIR", type=Path, required=True, help="folder to write, outside any fedlm checkout"
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty DIR, replacing same-named files")
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        action="append",
        default=[],
        help="a run config whose data: section (class_path, init_args) names the data; repeat to compose, later "
        "files winning (default: Financial PhraseBank from the flags below)",
    )
    parser.add_argument(
        "--path", default=None, help="as data.path: the FinancialPhraseBank-v1.0 folder (default: $FEDLM_FPB_DIR)"
    )
    parser.add_argument("--agreement", choices=list(PHRASEBANK_FILES), default=None, help="as data.agreement (all)")
    parser.add_argument("--train_fraction", type=float, default=None, help="as data.train_fraction (0.8)")
    parser.add_argument("--split_seed", type=int, default=None, help="as data.split_seed (1234)")
    parser.add_argument(
        "--clients",
        type=int,
        default=None,
        help=f"as federation.clients: one site file each (default: the config's federation.clients, else "
        f"{DEFAULT_CLIENTS})",
    )
    parser.add_argument("--partition_seed", type=int, default=None, help="as data.partition_seed (1234)")
    parser.add_argument(
        "--partition",
        type=partition_config,
        default=None,
        help="as data.partition, in YAML, e.g. '{kind: dirichlet, alpha: 0.5}' (default: iid)",
    )
    args = parser.parse_args(argv)
    try:
        config = read_configs(args.config)
        cls, init_args = configured_data(config) if args.config else (FinancialPhraseBank, {})
    except FedlmError as err:
        parser.error(str(err))
    init_args |= {name: getattr(args, name) for name in DATA_FLAGS if getattr(args, name) is not None}
    clients = args.clients if args.clients is not None else configured_clients(config)
    if clients < 1:
        parser.error(f"--clients {clients} must be at least 1.")
    checkout = checkout_holding(args.out)
    if checkout is not None:
        why, example = (
            ("Financial PhraseBank (CC BY-NC-SA) must not be committed", "../fpb_sites")
            if issubclass(cls, FinancialPhraseBank)
            else (f"the data ({cls.__name__}) must not be committed either", f"../{cls.__name__.lower()}_sites")
        )
        parser.error(
            f"--out {args.out} lies inside the fedlm checkout {checkout}: files derived from {why}; write them "
            f"outside it, e.g. --out {example}."
        )
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; name a folder.")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        parser.error(f"--out {args.out} exists and is not empty; pass --force to write into it anyway.")
    try:
        data = instantiate(cls, init_args)
        files = site_files(data, clients)
    except FedlmError as err:
        parser.error(str(err))
    for name, examples in files.items():
        write_examples(args.out / name, examples)
        print(f"[fedlm split-data] {args.out / name}: {described(data, examples)}")
    print(guidance(data, init_args, args.out.resolve(), clients))


def guidance(data: TaskData, init_args: dict[str, Any], folder: Path, clients: int) -> str:
    """What a site needs, and the data options of a run on the files."""
    suffix = file_suffix(data)
    needs = (
        f"[fedlm split-data] site k needs site{{k}}{suffix}, val{suffix} and test{suffix} only; train{suffix} is for "
        "a centralized run."
    )
    site_paths = [str(folder / f"site{k}{suffix}") for k in range(clients)]
    if isinstance(data, FinancialPhraseBank):
        return (
            f"{needs} Use them with --data.init_args.client_files='[{','.join(site_paths)}]' --data.init_args.val_file "
            f"{folder / 'val.txt'} --data.init_args.test_file {folder / 'test.txt'} --data.init_args.partition_seed "
            f"{data.partition_seed} (and no data.path). Derived from Financial PhraseBank (CC BY-NC-SA 3.0): do not "
            "commit or publish these files."
        )
    section = {
        "data": {
            "class_path": "fedlm.data.RecordFiles",
            "init_args": {
                "client_files": site_paths,
                "val_file": str(folder / "val.jsonl"),
                "test_file": str(folder / "test.jsonl"),
                **file_run_args(data, init_args),
            },
        }
    }
    text = yaml.safe_dump(section, sort_keys=False, width=1_000_000, allow_unicode=True)
    return (
        f"{needs} Use them in place of the config's data: section (for a centralized run, train_file: "
        f"{folder / 'train.jsonl'} in place of client_files), e.g. as one more --config file:\n{text}"
        "[fedlm split-data] Derived from the data: do not commit them; share them only as the data's license allows."
    )
