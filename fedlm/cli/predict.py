"""``fedlm predict SOURCE [INPUT]``: the label and class probabilities of each sentence of a file or of stdin.

SOURCE is a .ckpt written by ``fedlm fit`` or a folder written by ``fedlm export``; only its virtual-token table is
used, never the encoder. INPUT holds one sentence a line (``-`` or absent: stdin). Blank lines are skipped, not
scored; JSON lines give each result's input line number. stdout gets the results only (a header, then the label,
one probability per class and the sentence, tab-separated; or JSON lines), so that it can be piped; progress and
notes go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlm.checkpointing import atomic_write
from fedlm.cli.export import BACKBONE_HELP
from fedlm.model.export import TrainedPrompt
from fedlm.model.module import PTuningModule

PROGRESS_EVERY = 10  # batches between progress lines on stderr; shorter inputs print none


@dataclass(frozen=True)
class Prediction:
    line: int  # in the input, from 1
    sentence: str
    label: str
    probs: dict[str, float]  # softmax over the label words' log-probabilities


def read_sentences(source: str) -> list[tuple[int, str]]:
    """(line number, sentence) of each non-blank line of the file ``source``, or of stdin for ``-``."""
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


@torch.inference_mode()
def classify(module: PTuningModule, sentences: list[str], batch_size: int) -> Iterator[tuple[str, list[float]]]:
    """Label and class probabilities of each sentence, batch by batch, by the module's own scoring."""
    template = module.template
    placeholder = template.label_names[0]  # encode wants a gold label; it only feeds the loss, which is ignored
    for index, start in enumerate(range(0, len(sentences), batch_size)):
        examples = [template.encode(sentence, placeholder) for sentence in sentences[start : start + batch_size]]
        batch = {name: tensor.to(module.device) for name, tensor in template.collate(examples).items()}
        scored = module.predict_step(batch, index)
        yield from zip(scored["label"], scored["probs"].tolist())


def predictions(module: PTuningModule, numbered: list[tuple[int, str]], batch_size: int) -> Iterator[Prediction]:
    """``classify`` with line numbers and class names, and a progress line on stderr every few batches."""
    names = module.template.label_names
    sentences = [sentence for _, sentence in numbered]
    report_every = PROGRESS_EVERY * batch_size
    scored = classify(module, sentences, batch_size)
    for count, ((line, sentence), (label, probs)) in enumerate(zip(numbered, scored), 1):
        yield Prediction(line, sentence, label, dict(zip(names, probs)))
        if len(numbered) > report_every and (count % report_every == 0 or count == len(numbered)):
            print(f"[fedlm predict] scored {count}/{len(numbered)} sentences", file=sys.stderr, flush=True)


def tsv_lines(rows: Iterable[Prediction], names: list[str]) -> Iterator[str]:
    yield "\t".join(["label", *names, "sentence"]) + "\n"
    for row in rows:
        probs = [f"{row.probs[name]:.4f}" for name in names]
        yield "\t".join([row.label, *probs, row.sentence.replace("\t", " ")]) + "\n"


def jsonl_lines(rows: Iterable[Prediction]) -> Iterator[str]:
    for row in rows:
        yield json.dumps({"line": row.line, "sentence": row.sentence, "label": row.label, "probs": row.probs}) + "\n"


def predict_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedlm predict",
        description=__doc__.split("\n\n")[0],
        epilog="LightningCLI's own predict (a datamodule's split) still runs when given --config or --ckpt_path.",
    )
    parser.add_argument("source", metavar="SOURCE", type=Path, help="a .ckpt from fedlm fit, or a fedlm export folder")
    parser.add_argument("input", metavar="INPUT", nargs="?", default="-", help="one sentence a line (default -: stdin)")
    parser.add_argument("--out", metavar="FILE", type=Path, default=None, help="write the results here, not to stdout")
    parser.add_argument("--format", choices=["tsv", "jsonl"], default=None, help="default: tsv on stdout, else jsonl")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences scored together (default 32)")
    parser.add_argument("--backbone", default=None, help=BACKBONE_HELP)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if any")
    args = parser.parse_args(argv)
    if not args.source.exists():
        parser.error(f"SOURCE {args.source}: no such checkpoint file or export folder.")
    if args.input != "-" and not Path(args.input).is_file():
        parser.error(f"INPUT {args.input}: no such file; pass a text file with one sentence a line, or - for stdin.")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} must be at least 1.")

    module = TrainedPrompt.load(args.source).module(args.backbone).to(args.device)
    if args.input == "-" and sys.stdin.isatty():
        print("[fedlm predict] reading sentences from stdin, one a line; end with Ctrl-D", file=sys.stderr)
    numbered = read_sentences(args.input)
    rows = predictions(module, numbered, args.batch_size)
    output_format = args.format or ("jsonl" if args.out else "tsv")
    lines = tsv_lines(rows, module.template.label_names) if output_format == "tsv" else jsonl_lines(rows)
    if args.out is None:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
        return
    atomic_write(args.out, lambda file: file.writelines(line.encode() for line in lines))
    print(f"[fedlm predict] {len(numbered)} predictions written to {args.out}", file=sys.stderr)
