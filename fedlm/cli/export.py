"""``fedlm export CHECKPOINT --out DIR``: a trained prompt as files that need neither fedlm's encoder nor Lightning.

CHECKPOINT is a .ckpt, or a run's folder (``runs/x``, ``runs/x/logs`` or one ``version_N``): then the latest version
that holds a checkpoint, its ``last.ckpt`` (or its only one). A failed run leaves an empty version, which is skipped.

DIR gets ``prompt.safetensors`` (the virtual-token table), ``prompt.json`` (the task: template, label words or
generation settings; the backbone) and, when the template puts one block of virtual tokens before everything else,
``peft/``: a PEFT prompt-tuning adapter, or a prefix-tuning one for deep slots (``PeftModel.from_pretrained(base_model,
"DIR/peft")``), which scores the label words, or greedily generates the answer's tokens, as fedlm does; the message says
what to feed it. ``fedlm predict DIR ...`` reads the folder.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fedlm.model.template import VIRTUAL_MARKER
from fedlm.ptuning.export import PEFT_FOLDER, PromptFormatError, TrainedPrompt, write_export
from fedlm.tasks import TaskConfig

BACKBONE_HELP = "where the frozen LM is now, when not where the checkpoint's model.backbone says (files move)"
VERSION = re.compile(r"version_(\d+)")  # Lightning's log folders


def versions(folder: Path) -> list[Path]:
    """The log versions of a run folder, a logger's folder or one version, latest first."""
    found = [folder] if VERSION.fullmatch(folder.name) else [*folder.glob("version_*"), *folder.glob("*/version_*")]
    found = [path for path in found if path.is_dir() and VERSION.fullmatch(path.name)]
    return sorted(found, key=lambda path: int(VERSION.fullmatch(path.name)[1]), reverse=True)


def run_checkpoint(folder: Path) -> Path:
    """``last.ckpt`` (or the only .ckpt) of the latest version in ``folder`` that holds a checkpoint."""
    found = versions(folder)
    for version in found:
        checkpoints = sorted((version / "checkpoints").glob("*.ckpt"))
        chosen = [path for path in checkpoints if path.name == "last.ckpt"] or checkpoints
        if len(chosen) == 1:
            return chosen[0]
        if chosen:
            names = ", ".join(path.name for path in chosen)
            raise PromptFormatError(f"{version} holds several checkpoints, none last.ckpt ({names}); pass one of them.")
    raise PromptFormatError(
        f"{folder}: no version_N/checkpoints/*.ckpt in it or one folder down ({len(found)} version folders, none with "
        "a checkpoint: a run that fails before its first one leaves an empty version); pass a .ckpt written by "
        "fedlm fit, or the folder of a run that wrote one."
    )


def export_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedlm export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", type=Path, help="a .ckpt written by fedlm fit, or its run's folder"
    )
    parser.add_argument("--out", metavar="DIR", type=Path, required=True, help="export folder (created; must be empty)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing an export there")
    parser.add_argument(
        "--peft",
        choices=["auto", "require"],
        default="auto",
        help="auto: write peft/ when PEFT reproduces the template, else say why not; require: fail instead",
    )
    parser.add_argument("--backbone", default=None, help=BACKBONE_HELP)
    args = parser.parse_args(argv)
    if not args.checkpoint.exists():
        parser.error(f"CHECKPOINT {args.checkpoint}: no such file or folder; pass a .ckpt written by fedlm fit.")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; name a folder.")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        parser.error(f"--out {args.out} exists and is not empty; pass --force to write the export into it anyway.")

    if args.checkpoint.is_dir():
        args.checkpoint = run_checkpoint(args.checkpoint)
        print(f"[fedlm export] exporting {args.checkpoint}, the latest version's with a checkpoint")
    prompt = TrainedPrompt.from_checkpoint(args.checkpoint)
    no_peft = write_export(prompt, args.out, args.backbone, require_peft=args.peft == "require")
    print(f"[fedlm export] {len(prompt.table)} virtual tokens of {prompt.backbone!r} written to {args.out}")
    if no_peft is None:
        print(f"[fedlm export] PEFT adapter: {args.out / PEFT_FOLDER}. {peft_usage(TaskConfig(**prompt.task))}")
    else:
        print(f"[fedlm export] no PEFT adapter written: {no_peft}.")


def peft_usage(task: TaskConfig) -> str:
    """How to get fedlm's answers from the PEFT adapter: the text to feed (the template without its leading marker and
    answer field), then the label words to score, or the ``generate`` call and the cuts that give fedlm's answer."""
    text = VIRTUAL_MARKER.sub("", task.template[: task.template.rindex("{")], count=1)  # the answer field ends it
    feed = (
        f"Feed PeftModel the text {text!r} with the record's fields in place of their {{names}} (tokenized without "
        "special tokens)"
    )
    if task.kind == "classification":
        return f"{feed} and score the label words' tokens after it."
    decoding = task.decoding
    if decoding.sample:  # fedlm draws from a generator seeded per example, which generate() has no place for
        call = (
            f"generate(input_ids, attention_mask=attention_mask, max_new_tokens={decoding.max_new_tokens}, "
            f"do_sample=True, temperature={decoding.temperature}, top_p={decoding.top_p}, top_k=0): the same "
            "distribution as fedlm's, not the same draws"
        )
    else:
        call = (
            f"generate(input_ids, attention_mask=attention_mask, max_new_tokens={decoding.max_new_tokens}, "
            "do_sample=False), which generates fedlm's tokens"
        )
    stop = f", cut before the first of {decoding.stop}" if decoding.stop else ""
    return (
        f"{feed} and call {call}; the answer is the new tokens before the end-of-sequence token, decoded without "
        f"special tokens{stop}, stripped."
    )
