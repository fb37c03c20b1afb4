"""``fedlm predict SOURCE [INPUT]``: each input's label and class probabilities (classification), or its generated
answer (generation), from a file or stdin.

SOURCE is a .ckpt written by ``fedlm fit`` or a folder written by ``fedlm export``; only its virtual-token table is
used, never the encoder. INPUT holds one input a line (``-`` or absent: stdin): the text of the template's one input
field, or a JSON object of the fields by name (a ``.jsonl`` file, or any line that starts with ``{``). Blank lines are
skipped, not scored; JSON lines give each result's input line number. stdout gets the results only (a header, then
the label, one probability per class and the input, tab-separated; or the generated answer and the input; or JSON
lines), so that it can be piped; a progress bar and notes go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fedlm.checkpointing import atomic_write
from fedlm.cli.export import BACKBONE_HELP
from fedlm.errors import FedlmError
from fedlm.ptuning.export import TrainedPrompt
from fedlm.ptuning.module import PTuningModule
from fedlm.tasks import ClassificationTask

PROGRESS_AFTER = 4  # batches: shorter inputs show no progress bar
SORTED_BATCHES = 16  # batches whose inputs are sorted by length together (the rest of the output waits for them)


class PredictInputError(FedlmError, ValueError):
    """An input line the task cannot read; the message names the line."""


@dataclass(frozen=True)
class Prediction:
    line: int  # in the input, from 1
    text: str  # the input line as given
    label: str  # classification: the predicted class; generation: the generated answer
    probs: dict[str, float] | None  # classification: softmax over the label words' log-probabilities


def read_inputs(source: str, fields: list[str]) -> list[tuple[int, str, dict[str, Any]]]:
    """(line number, line, record) of each non-blank line of the file ``source``, or of stdin for ``-``: a JSON object
    of the fields, or the text of the template's one field."""
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    inputs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PredictInputError(f"INPUT line {number}: not valid JSON ({err.msg}).") from None
        elif len(fields) == 1:
            record = {fields[0]: line.strip()}
        else:
            raise PredictInputError(
                f"INPUT line {number}: the template reads fields {fields}; give each input as a JSON object of them."
            )
        missing = [name for name in fields if name not in record]
        if missing:
            raise PredictInputError(f"INPUT line {number}: no field {missing[0]!r} (the template reads {fields}).")
        inputs.append((number, line.strip(), record))
    return inputs


@torch.inference_mode()
def predictions(
    module: PTuningModule, inputs: list[tuple[int, str, dict[str, Any]]], batch_size: int
) -> Iterator[Prediction]:
    """Each input's prediction by the module's own scoring or decoding, in input order, with a progress bar on
    stderr for inputs longer than a few batches.

    Batches are made of inputs of similar length (sorted within windows of ``SORTED_BATCHES`` batches), so that
    padding wastes little of each forward; each input keeps its own position as its index (its sampling seed).
    """
    task = module.task
    classifies = isinstance(task, ClassificationTask)
    placeholder = {task.template.answer_field: task.label_names[0]} if classifies else {}  # scoring ignores it
    if classifies:
        encoded = [task.encode({**record, **placeholder}) for _, _, record in inputs]
    else:
        encoded = [task.encode_prompt(record, i) for i, (_, _, record) in enumerate(inputs)]
    bar = tqdm(total=len(inputs), unit="input", file=sys.stderr, disable=len(inputs) <= PROGRESS_AFTER * batch_size)
    window = batch_size * SORTED_BATCHES
    for start in range(0, len(inputs), window):
        positions = range(start, min(len(inputs), start + window))
        order = sorted(positions, key=lambda i: len(encoded[i].input_ids))
        results: dict[int, tuple[str, dict[str, float] | None]] = {}
        for first in range(0, len(order), batch_size):
            group = order[first : first + batch_size]
            collated = task.template.collate([encoded[i] for i in group])
            result = module.predict_step({name: tensor.to(module.device) for name, tensor in collated.items()}, first)
            if classifies:
                probs = [dict(zip(task.label_names, row)) for row in result["probs"].tolist()]
                results.update(zip(group, zip(result["label"], probs)))
            else:
                results.update((i, (text, None)) for i, text in zip(group, result["generated"]))
            bar.update(len(group))
        for i in positions:
            line, text, _ = inputs[i]
            yield Prediction(line, text, *results[i])
    bar.close()


def tsv_lines(rows: Iterable[Prediction], names: list[str] | None) -> Iterator[str]:
    """A header, then per input the label and each class's probability (or the generated answer) and the input."""
    yield "\t".join(["label", *names, "input"] if names else ["generated", "input"]) + "\n"
    for row in rows:
        probs = [f"{row.probs[name]:.4f}" for name in names] if names else []
        yield "\t".join([row.label.replace("\t", " ").replace("\n", " "), *probs, row.text.replace("\t", " ")]) + "\n"


def jsonl_lines(rows: Iterable[Prediction]) -> Iterator[str]:
    for row in rows:
        result = {"label": row.label, "probs": row.probs} if row.probs is not None else {"generated": row.label}
        yield json.dumps({"line": row.line, "input": row.text, **result}) + "\n"


def predict_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedlm predict",
        description=__doc__.split("\n\n")[0],
        epilog="LightningCLI's own predict (a datamodule's split) still runs when given --config or --ckpt_path.",
    )
    parser.add_argument("source", metavar="SOURCE", type=Path, help="a .ckpt from fedlm fit, or a fedlm export folder")
    parser.add_argument("input", metavar="INPUT", nargs="?", default="-", help="one input a line (default -: stdin)")
    parser.add_argument("--out", metavar="FILE", type=Path, default=None, help="write the results here, not to stdout")
    parser.add_argument("--format", choices=["tsv", "jsonl"], default=None, help="default: tsv on stdout, else jsonl")
    parser.add_argument("--batch-size", type=int, default=32, help="inputs scored together (default 32)")
    parser.add_argument("--backbone", default=None, help=BACKBONE_HELP)
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default=None,
        help="the frozen LM's dtype (default: as trained); bf16 ran 2.7x faster than fp32 on a 2-core CPU but changed "
        "1.8%% of the labels of an fp32-trained prompt (results/speed.md)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if any")
    args = parser.parse_args(argv)
    if not args.source.exists():
        parser.error(f"SOURCE {args.source}: no such checkpoint file or export folder.")
    if args.input != "-" and not Path(args.input).is_file():
        parser.error(f"INPUT {args.input}: no such file; pass a text file with one input a line, or - for stdin.")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} must be at least 1.")

    module = TrainedPrompt.load(args.source).module(args.backbone, args.dtype).to(args.device)
    if module.prefix_cache is not None:  # each input's prefix is run once: in one forward per batch, not one each
        module.prefix_cache.batch_fill = True
    if args.input == "-" and sys.stdin.isatty():
        print("[fedlm predict] reading inputs from stdin, one a line; end with Ctrl-D", file=sys.stderr)
    try:
        numbered = read_inputs(args.input, module.task.template.fields)
    except PredictInputError as err:
        parser.error(str(err))
    rows = predictions(module, numbered, args.batch_size)
    output_format = args.format or ("jsonl" if args.out else "tsv")
    names = getattr(module.task, "label_names", None)
    lines = tsv_lines(rows, names) if output_format == "tsv" else jsonl_lines(rows)
    if args.out is None:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
        return
    atomic_write(args.out, lambda file: file.writelines(line.encode() for line in lines))
    print(f"[fedlm predict] {len(numbered)} predictions written to {args.out}", file=sys.stderr)
