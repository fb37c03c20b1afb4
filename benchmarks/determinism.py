"""What bitwise reproducibility costs: deterministic algorithms on vs off, and the exact prefix-cache fill vs a
batched one, each pair measured in the same run.

(1) Training steps of fedlm's cached layout (the shipped configs' template, the module's own loss, AdamW on the
    encoder) with ``torch.use_deterministic_algorithms`` on (fedlm's default, ``trainer.deterministic: true``) and
    off, interleaved (on, off, on, off, ...) in one process over the same batches, every prefix already cached.
(2) Filling the prefix cache for the same sentences one prefix per forward (fedlm: an entry depends on its own
    tokens only) vs in padded batches of ``--batch-size`` (what fedlm did before; faster per sentence at best, but
    an entry's last bits then depend on its neighbours), also interleaved.

Data: the training split of Financial PhraseBank (``--fpb-dir`` or ``FEDLM_FPB_DIR``; never commit it):

    python benchmarks/determinism.py --examples 192 --steps 24 --repeats 3
"""

from __future__ import annotations

import argparse
import time
from itertools import cycle, islice

import torch
from throughput import CACHED_TEMPLATE, batch_plan, fedlm_setup, spread, training_examples
from transformers import DynamicCache

from fedlm.model.backbone import DEFAULT_BACKBONE
from fedlm.model.prefix_cache import PrefixCache, split_at_first_virtual


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fpb-dir", default=None, help="FinancialPhraseBank-v1.0 folder (default: $FEDLM_FPB_DIR)")
    parser.add_argument("--examples", type=int, default=192, help="training sentences used")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24, help="timed training steps per mode and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # what throughput.py's helpers read
    defaults = dict(backbone=DEFAULT_BACKBONE, dtype="fp32", cache_dtype="fp32", compile=False, bucket_batches=1,
                    cached_template=CACHED_TEMPLATE, virtual_tokens=10, encoder_hidden=512, device="cpu",
                    seed=1234)  # fmt: skip
    return argparse.Namespace(**defaults, **vars(args))


def padded_fill(cache: PrefixCache, prefixes: list[tuple[int, ...]]) -> None:
    """The former fill: one right-padded forward over a batch's new prefixes."""
    model, ids = cache.model, torch.zeros((len(prefixes), max(map(len, prefixes))), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prefix in enumerate(prefixes):
        ids[row, : len(prefix)], mask[row, : len(prefix)] = torch.tensor(prefix), 1
    past = DynamicCache(config=model.config)
    model.base_model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
    for row, prefix in enumerate(prefixes):
        cache.entries[prefix] = torch.stack(
            [torch.stack([k[row, :, : len(prefix)], v[row, :, : len(prefix)]]) for k, v, _ in past]
        )


def timed(action) -> float:  # noqa: ANN001
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    examples = training_examples(args)
    plan = batch_plan(args, examples)
    module, batches = fedlm_setup(args, [[examples[i] for i in batch] for batch in plan], cached=True)
    optimizer = torch.optim.AdamW(module.encoder.parameters(), lr=1e-3)
    prefix_batches = [list(dict.fromkeys(split_at_first_virtual(batch)[0])) for batch in batches]

    def train(steps: int) -> None:
        for batch in islice(cycle(batches), steps):
            optimizer.zero_grad(set_to_none=True)
            module.task.train_loss(module.lm, batch).backward()
            optimizer.step()

    def fill(batched: bool) -> None:
        module.prefix_cache.clear()
        with torch.no_grad():
            for prefixes in prefix_batches:
                padded_fill(module.prefix_cache, prefixes) if batched else module.prefix_cache._fill(prefixes)

    fill_times: dict[str, list[float]] = {"one prefix per forward (fedlm)": [], "padded batches (former)": []}
    step_rates: dict[str, list[float]] = {"deterministic on (fedlm)": [], "deterministic off": []}
    fill(False)
    train(3)  # warm-up, cache filled
    for repeat in range(args.repeats):
        for name, batched in zip(fill_times, (False, True)):
            fill_times[name].append(len(examples) / timed(lambda batched=batched: fill(batched)))
        fill(False)  # the steps below run on fedlm's own entries
        for name, mode in zip(step_rates, (True, False)):
            torch.use_deterministic_algorithms(mode)
            step_rates[name].append(args.steps * args.batch_size / timed(lambda: train(args.steps)))
        print(f"[repeat {repeat + 1}/{args.repeats}] done", flush=True)
    torch.use_deterministic_algorithms(False)

    print(f"\nSmolLM2 fp32, cached layout, batch {args.batch_size}, {len(examples)} sentences, {args.repeats} repeats, "
          f"torch threads {torch.get_num_threads()}; median [range], ratios taken within each repeat\n")  # fmt: skip
    print("| what | setting | examples/s | ratio to fedlm's setting |\n|---|---|---|---|")
    for what, rates in (("training step, cache warm", step_rates), ("prefix-cache fill", fill_times)):
        names = list(rates)
        for name in names:
            ratios = [x / y for x, y in zip(rates[name], rates[names[0]])]
            print(f"| {what} | {name} | {spread(rates[name])} | {spread(ratios)}x |")


if __name__ == "__main__":
    main()
