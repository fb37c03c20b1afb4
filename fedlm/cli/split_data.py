"""``fedlm split-data --out DIR``: Financial PhraseBank cut into the files each site needs, outside the repository.

DIR gets ``val.txt`` and ``test.txt`` (the shared evaluation splits), ``train.txt`` (the pooled training split, for
a centralized run) and ``site{k}.txt`` (client k's training examples), as UTF-8 ``sentence@label`` lines. They are
cut by the datamodule itself (NeMo's split, then ``data.partition`` with ``data.partition_seed``), each file in the
order the partitioned run holds it, so a run on ``data.client_files`` + ``data.val_file`` + ``data.test_file``
trains bitwise as the partitioned run on the pooled file does, while a site holds only its own file.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import yaml

from fedlm.checkpointing import atomic_write
from fedlm.data import DataError, FinancialPhraseBank, Record
from fedlm.data.partition import PartitionConfig
from fedlm.data.sources import PHRASEBANK_FILES, PHRASEBANK_LABELS, format_phrasebank


def checkout_holding(folder: Path) -> Path | None:
    """The fedlm git work tree that ``folder`` lies in, if any: derived files there could be committed, which the
    data's license (CC BY-NC-SA) forbids. Any clone or worktree of fedlm counts, not just the running one."""
    for parent in (folder.resolve(), *folder.resolve().parents):
        if (parent / ".git").exists() and (parent / "fedlm" / "__init__.py").is_file():
            return parent
    return None


def site_files(data: FinancialPhraseBank, clients: int) -> dict[str, list[Record]]:
    """What each file holds: the splits and every client's examples, as the partitioned run has them."""
    data.setup("fit")
    files = {"val.txt": data.examples("val"), "test.txt": data.examples("test"), "train.txt": data.examples("train")}
    return files | {f"site{k}.txt": data.client_examples(k, clients) for k in range(clients)}


def write_examples(file: Path, examples: list[Record]) -> None:
    atomic_write(file, lambda handle: handle.write(format_phrasebank(examples).encode("utf-8")))


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


def split_data_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedlm split-data", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", metavar="DIR", type=Path, required=True, help="folder to write, outside any fedlm checkout"
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty DIR, replacing same-named files")
    parser.add_argument("--path", default=None, help="the FinancialPhraseBank-v1.0 folder (default: $FEDLM_FPB_DIR)")
    parser.add_argument("--agreement", choices=list(PHRASEBANK_FILES), default="all", help="as data.agreement (all)")
    parser.add_argument("--train_fraction", type=float, default=0.8, help="as data.train_fraction (0.8)")
    parser.add_argument("--split_seed", type=int, default=1234, help="as data.split_seed (1234)")
    parser.add_argument("--clients", type=int, default=3, help="as federation.clients: one site file each (3)")
    parser.add_argument("--partition_seed", type=int, default=1234, help="as data.partition_seed (1234)")
    parser.add_argument(
        "--partition",
        type=partition_config,
        default=PartitionConfig(),
        help="as data.partition, in YAML, e.g. '{kind: dirichlet, alpha: 0.5}' (default: iid)",
    )
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error(f"--clients {args.clients} must be at least 1.")
    checkout = checkout_holding(args.out)
    if checkout is not None:
        parser.error(
            f"--out {args.out} lies inside the fedlm checkout {checkout}: files derived from Financial PhraseBank "
            "(CC BY-NC-SA) must not be committed; write them outside it, e.g. --out ../fpb_sites."
        )
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; name a folder.")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        parser.error(f"--out {args.out} exists and is not empty; pass --force to write into it anyway.")
    try:
        data = FinancialPhraseBank(
            path=args.path,
            agreement=args.agreement,
            train_fraction=args.train_fraction,
            split_seed=args.split_seed,
            partition_seed=args.partition_seed,
            partition=args.partition,
        )
        files = site_files(data, args.clients)
    except DataError as err:
        parser.error(str(err))
    for name, examples in files.items():
        write_examples(args.out / name, examples)
        print(f"[fedlm split-data] {args.out / name}: {len(examples)} sentences ({histogram(examples)})")
    folder = args.out.resolve()
    sites = ",".join(str(folder / f"site{k}.txt") for k in range(args.clients))
    print(
        f"[fedlm split-data] site k needs site{{k}}.txt, val.txt and test.txt only; train.txt is for a centralized "
        f"run. Use them with --data.init_args.client_files='[{sites}]' --data.init_args.val_file {folder / 'val.txt'} "
        f"--data.init_args.test_file {folder / 'test.txt'} --data.init_args.partition_seed {args.partition_seed} "
        "(and no data.path). Derived from Financial PhraseBank (CC BY-NC-SA 3.0): do not commit or publish these files."
    )
