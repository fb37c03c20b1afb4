"""``fedlm predict``'s speed with the shipped prompt layout: the prefix cache filled one input per forward (as training
fills it, so that an entry's bits do not depend on its batch) against one padded forward per batch (what predict now
does), in fp32 and with the frozen LM in bf16; the same predicted labels are checked.

The prompt is the shipped layout (configs/fpb_federated.yaml's model section: deep slots after the cached sentence)
with its slots moved off their start, as training leaves them; speed does not depend on what the slots hold.

    python benchmarks/predict.py --sentences 512 --batch-size 64

Prints a markdown table (sentences/s, ratio to the one-at-a-time fill, labels equal to it); run it alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from fedlm.cli.predict import predictions
from fedlm.data.sources import phrasebank_file, read_phrasebank
from fedlm.ptuning import PTuningModule

REPO = Path(__file__).resolve().parents[1]


def shipped_module(dtype: str) -> PTuningModule:
    model = yaml.safe_load((REPO / "configs" / "fpb_federated.yaml").read_text())["model"]
    torch.manual_seed(0)
    module = PTuningModule(**{**model, "dtype": dtype})
    with torch.no_grad():
        for param in module.encoder.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return module.eval()


def timed(module: PTuningModule, inputs: list, batch_size: int, batch_fill: bool) -> tuple[float, list[str]]:
    module.prefix_cache.clear()
    module.prefix_cache.batch_fill = batch_fill
    start = time.perf_counter()
    labels = [row.label for row in predictions(module, inputs, batch_size)]
    return time.perf_counter() - start, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fpb-dir", default=None, help="the FinancialPhraseBank-v1.0 folder (default: $FEDLM_FPB_DIR)")
    args = parser.parse_args()
    records = read_phrasebank(phrasebank_file(args.fpb_dir, "50"))[: args.sentences]
    inputs = [(i + 1, r.fields["sentence"], {"sentence": r.fields["sentence"]}) for i, r in enumerate(records)]
    rows, reference = [], None
    for dtype in ("fp32", "bf16"):
        module = shipped_module(dtype)
        timed(module, inputs[: args.batch_size], args.batch_size, True)  # warm-up
        for batch_fill in (False, True):
            seconds, labels = timed(module, inputs, args.batch_size, batch_fill)
            if reference is None:
                reference = (seconds, labels)
            same = sum(a == b for a, b in zip(labels, reference[1]))
            fill = "one padded forward per batch" if batch_fill else "one forward per sentence"
            rows.append((dtype, fill, len(inputs) / seconds, reference[0] / seconds, f"{same}/{len(inputs)}"))
    print(f"| LM dtype | prefix fill | sentences/s | vs fp32 one per sentence | labels as it (of {len(inputs)}) |")
    print("|---|---|---|---|---|")
    for dtype, fill, rate, ratio, same in rows:
        print(f"| {dtype} | {fill} | {rate:.2f} | {ratio:.2f}x | {same} |")


if __name__ == "__main__":
    main()
