"""``fedlm export CHECKPOINT --out DIR``: a trained prompt as files that need neither fedlm's encoder nor Lightning.

DIR gets ``prompt.safetensors`` (the virtual-token table), ``prompt.json`` (template, label words, backbone) and,
when the template puts one block of virtual tokens before everything else, ``peft/``: a PEFT prompt-tuning adapter
(``PeftModel.from_pretrained(base_model, "DIR/peft")``). ``fedlm predict DIR ...`` reads the folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedlm.model.export import PEFT_FOLDER, TrainedPrompt, write_export
from fedlm.model.template import VIRTUAL_MARKER

BACKBONE_HELP = "where the frozen LM is now, when not where the checkpoint's model.backbone says (files move)"


def export_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedlm export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT", type=Path, help="a .ckpt written by fedlm fit")
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
    if not args.checkpoint.is_file():
        parser.error(f"CHECKPOINT {args.checkpoint}: no such file; pass a .ckpt written by fedlm fit.")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; name a folder.")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
        parser.error(f"--out {args.out} exists and is not empty; pass --force to write the export into it anyway.")

    prompt = TrainedPrompt.from_checkpoint(args.checkpoint)
    no_peft = write_export(prompt, args.out, args.backbone, require_peft=args.peft == "require")
    print(f"[fedlm export] {len(prompt.table)} virtual tokens of {prompt.backbone!r} written to {args.out}")
    if no_peft is None:
        text = VIRTUAL_MARKER.sub("", prompt.template, count=1).removesuffix("{label}")
        print(
            f"[fedlm export] PEFT adapter: {args.out / PEFT_FOLDER}. Feed PeftModel the text {text!r} with the "
            "sentence in place of {sentence} (tokenized without special tokens) and score the label words' "
            "tokens after it."
        )
    else:
        print(f"[fedlm export] no PEFT adapter written: {no_peft}.")
