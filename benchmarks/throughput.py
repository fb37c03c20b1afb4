"""Steady-state training throughput: Hugging Face PEFT p-tuning vs fedlm's prefix and cached-prefix layouts.

All methods train the same prompt encoder shape (PEFT's MLP: three linear layers) on the same frozen backbone,
sentences, label words, batch size and batch order, with the same plain PyTorch loop (AdamW on the encoder), so
the figures compare what each layout costs per step, not the training frameworks around it:

(a) PEFT ``PromptEncoderConfig`` (MLP, ``task_type="CAUSAL_LM"``): virtual tokens before the whole input, loss from
    the model's own ``labels`` path;
(b) fedlm with ``<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}``: the same layout;
(c) fedlm with ``{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}`` and ``cache_prefix=True``: the first epoch
    (every prefix computed once) and later epochs (every prefix cached) are reported apart;
(d) fedlm deep prompts after the cached text (the template of (c)): per-layer key/value slots, so only
    " sentiment:" and the answer run each step;
(e) fedlm deep prompts before the text (P-tuning v2 as published, the template of (b)): the whole text runs each
    step, attending to the slots in every layer.
Deep prompts use ``--deep-encoder`` (``embedding``: the slots as parameters; ``mlp``: produced by an MLP of
``--encoder-hidden``), started from the key/values of ``--deep-init-text``.

Each method runs in a process of its own so that the peak memory printed is its own. A shared VM's speed drifts by
10-20 % over minutes, so ``--repeats R`` runs the methods R times interleaved (a, b, c, a, b, c, ...) and prints
each figure's median and range, and each ratio to (a) taken within a repeat (paired), with its median and range.
Data: the training split of Financial PhraseBank (``--fpb-dir`` or ``FEDLM_FPB_DIR``; CC BY-NC-SA, never commit
it). Needs ``peft``
(``pip install -r benchmarks/requirements.txt``) and fedlm importable from this checkout (the editable install, or
``PYTHONPATH=.``):

    python benchmarks/throughput.py --fpb-dir ~/data/FinancialPhraseBank-v1.0 --steps 50 --warmup 5
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from itertools import cycle, islice
from typing import Any

import torch
from peft import PromptEncoderConfig, get_peft_model

from fedlm.data.records import Record
from fedlm.data.sampler import ClientBlock, RoundBatchSampler
from fedlm.data.sources import phrasebank_file, read_phrasebank, split_examples
from fedlm.model import load_backbone
from fedlm.model.backbone import DEFAULT_BACKBONE
from fedlm.model.template import FPB_TEMPLATE, IGNORE_INDEX
from fedlm.ptuning import CacheConfig, PTuningModule
from fedlm.tasks import ClassificationTask, TaskConfig

CACHED_TEMPLATE = "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"
METHODS = {
    "peft": "(a) PEFT p-tuning",
    "fedlm-prefix": "(b) fedlm, prefix template",
    "fedlm-cached": "(c) fedlm, cached prefix",
    "fedlm-deep-cached": "(d) fedlm deep, slots after cached text",
    "fedlm-deep-first": "(e) fedlm deep, slots first (P-tuning v2)",
}
CACHED = ("fedlm-cached", "fedlm-deep-cached")
Batch = dict[str, torch.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="fedlm backbone: alias, model directory or hub id")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--fpb-dir", default=None, help="FinancialPhraseBank-v1.0 folder (default: $FEDLM_FPB_DIR)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="backbone dtype")
    parser.add_argument("--cache-dtype", choices=["fp32", "bf16"], default="fp32", help="cached key/value dtype")
    parser.add_argument("--examples", type=int, default=None, help="use only the first N training examples")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast around every method's forward")
    parser.add_argument("--compile", action="store_true", help="torch.compile every method's transformer body")
    parser.add_argument(
        "--bucket-batches", type=int, default=1, help="batches regrouped by length in windows of N (all methods)"
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="methods to run")
    parser.add_argument("--repeats", type=int, default=1, help="run the methods this many times, interleaved")
    parser.add_argument(
        "--cached-template",
        default=CACHED_TEMPLATE,
        help="template of (c); text before the first virtual token is cached",
    )
    parser.add_argument("--virtual-tokens", type=int, default=10)
    parser.add_argument("--encoder-hidden", type=int, default=512)
    parser.add_argument("--deep-encoder", choices=["embedding", "mlp"], default="embedding", help="(d), (e): slots")
    parser.add_argument("--deep-init-text", default="Classify the sentiment of this financial news sentence")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    if min(args.batch_size, args.steps, args.bucket_batches, args.repeats) <= 0 or args.warmup < 0:
        parser.error("--batch-size, --steps, --bucket-batches and --repeats must be positive, --warmup at least 0.")
    return args


def training_examples(args: argparse.Namespace) -> list[Record]:
    examples = split_examples(read_phrasebank(phrasebank_file(args.fpb_dir, "all")), 0.8, args.seed)["train"]
    return examples[: args.examples]


def batch_plan(args: argparse.Namespace, examples: list[Record]) -> list[list[int]]:
    """One pass in fedlm's seeded batch order (length-bucketed if asked): every method gets these batches."""
    task = ClassificationTask(
        TaskConfig(template=FPB_TEMPLATE), load_backbone(args.backbone).tokenizer, args.virtual_tokens
    )
    lengths = [len(task.encode(e.fields).input_ids) for e in examples]
    block = ClientBlock(0, tuple(range(len(examples))), len(examples) // args.batch_size)
    return list(
        RoundBatchSampler([block], args.batch_size, args.seed, lengths=lengths, bucket_batches=args.bucket_batches)
    )


def peft_batch(task: ClassificationTask, examples: list[Record]) -> Batch:
    """The prefix template's tokens without the virtual slots (PEFT inserts its own), labels on the answer only."""
    template = task.template
    rows = []
    for example in examples:
        encoded = task.encode(example.fields)
        ids = [t for t, v in zip(encoded.input_ids, encoded.virtual_index) if v < 0]
        answer = encoded.prompt_length - template.total_virtual_tokens
        rows.append((ids, [IGNORE_INDEX] * answer + ids[answer:]))
    length = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), template.pad_id),
        "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
        "labels": torch.full((len(rows), length), IGNORE_INDEX),
    }
    for row, (ids, labels) in enumerate(rows):
        batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][row, : len(ids)] = 1
        batch["labels"][row, : len(ids)] = torch.tensor(labels)
    return batch


LossFn = Callable[[Batch], torch.Tensor]


def peft_setup(args: argparse.Namespace, groups: list[list[Record]]) -> tuple[LossFn, list[Batch], list[torch.Tensor]]:
    loaded = load_backbone(args.backbone, args.dtype)
    if args.compile:
        loaded.model.base_model.compile(dynamic=True)
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=args.virtual_tokens,
        encoder_reparameterization_type="MLP",
        encoder_hidden_size=args.encoder_hidden,
    )
    model = get_peft_model(loaded.model, config).to(args.device)
    model.eval()  # the frozen LM without dropout, as in fedlm; PEFT's encoder has no dropout either
    task = ClassificationTask(TaskConfig(template=FPB_TEMPLATE), loaded.tokenizer, args.virtual_tokens)
    batches = [peft_batch(task, group) for group in groups]
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda batch: model(**batch).loss, batches, params


def fedlm_setup(args: argparse.Namespace, groups: list[list[Record]], method: str) -> tuple[PTuningModule, list[Batch]]:
    """The module with PEFT's encoder shape (an MLP of three linear layers) or deep slots, and the collated
    batches."""
    cached, deep = method in CACHED, method.startswith("fedlm-deep")
    encoder = dict(type="mlp", virtual_tokens=args.virtual_tokens, hidden_size=args.encoder_hidden, num_layers=3)
    if deep:
        encoder = dict(
            type=args.deep_encoder,
            virtual_tokens=args.virtual_tokens,
            hidden_size=args.encoder_hidden,
            deep=True,
            init_text=args.deep_init_text,
        )
    module = PTuningModule(
        backbone=args.backbone,
        dtype=args.dtype,
        task=TaskConfig(template=args.cached_template if cached else FPB_TEMPLATE),
        encoder=encoder,
        cache=CacheConfig(prefix=cached, dtype=args.cache_dtype),
    )
    if args.compile:
        module.backbone.base_model.compile(dynamic=True)
    task = module.task
    batches = [task.template.collate([task.encode(e.fields) for e in group]) for group in groups]
    return module.to(args.device).train(), batches


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(step: Callable[[Batch], None], batches: Iterable[Batch], device: str) -> float:
    """Examples per second over ``batches``."""
    sync(device)
    start, examples = time.perf_counter(), 0
    for batch in batches:
        step(batch)
        examples += len(batch["input_ids"])
    sync(device)
    return examples / (time.perf_counter() - start)


def run_method(method: str, args: argparse.Namespace, plan: list[list[int]]) -> dict[str, Any]:
    """Warm up, then time; in a process of its own so that the peak memory is this method's."""
    torch.manual_seed(args.seed)
    examples = training_examples(args)
    groups = [[examples[i] for i in batch] for batch in plan]
    module = None
    if method == "peft":
        loss_fn, batches, params = peft_setup(args, groups)
    else:
        module, batches = fedlm_setup(args, groups, method)
        loss_fn, params = lambda batch: module.task.train_loss(module.lm, batch), list(module.encoder.parameters())
    batches = [{k: v.to(args.device) for k, v in batch.items()} for batch in batches]
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    def step(batch: Batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast):
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result: dict[str, Any] = {}
    throughput(step, islice(cycle(batches), args.warmup), args.device)
    if module is not None and module.prefix_cache is not None:
        module.prefix_cache.clear()  # the warm-up filled some; the first epoch starts cold
        result["first epoch"] = throughput(step, batches, args.device)
        result["cache"] = (len(module.prefix_cache), module.prefix_cache.nbytes)
    result["steady"] = throughput(step, islice(cycle(batches), args.warmup, args.warmup + args.steps), args.device)
    result["trainable"] = sum(p.numel() for p in params)
    if module is not None:
        result["table_bytes"] = module.encoder.inference_table.numel() * module.encoder.inference_table.element_size()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if args.device.startswith("cuda"):
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def spread(values: list[float]) -> str:
    """Median, and the range when there is more than one value."""
    return f"{statistics.median(values):.2f}" + (f" [{min(values):.2f}-{max(values):.2f}]" if len(values) > 1 else "")


def report(args: argparse.Namespace, repeats: list[dict[str, dict[str, Any]]], examples: int) -> None:
    """One line per method and phase: examples/s and the ratio to (a) within each repeat, as median [min-max]."""
    print(
        f"backbone={args.backbone} device={args.device} dtype={args.dtype} cache_dtype={args.cache_dtype} "
        f"batch_size={args.batch_size} train_examples={examples} warmup={args.warmup} steps={args.steps} "
        f"repeats={args.repeats} autocast={args.autocast} compile={args.compile} bucket_batches={args.bucket_batches} "
        f"torch_threads={torch.get_num_threads()}"
    )
    print(f"cached template (c): {args.cached_template!r}")
    cuda = args.device.startswith("cuda")
    header = f"{'method':<70}{'examples/s':>20}{'vs (a), per repeat':>22}{'peak RSS MiB':>14}{'trainable':>11}"
    print(header + (f"{'peak CUDA MiB':>15}" if cuda else ""))
    for method in args.methods:
        runs = [results[method] for results in repeats]
        memory = f"{max(r['peak_rss_mib'] for r in runs):>14.0f}{runs[0]['trainable']:>11}" + (
            f"{max(r['peak_cuda_mib'] for r in runs):>15.0f}" if cuda else ""
        )
        phases = [("first epoch, filling the cache", "first epoch")] if "first epoch" in runs[0] else []
        phases.append(("later epochs" if phases else "steady state", "steady"))
        for phase, key in phases:
            ratios = [r[method][key] / r["peft"]["steady"] for r in repeats] if "peft" in args.methods else []
            ratio = spread(ratios) + "x" if ratios else "-"
            name = f"{METHODS[method]}, {phase}"
            print(f"{name:<70}{spread([r[key] for r in runs]):>20}{ratio:>22}{memory}")
    for method in (m for m in args.methods if m in CACHED):
        entries, nbytes = repeats[0][method]["cache"]
        print(f"{METHODS[method]}: prefix cache after the first epoch: {entries} entries, {nbytes / 2**20:.1f} MiB")
    for method in (m for m in args.methods if m != "peft"):
        print(f"{METHODS[method]}: table sent per round {repeats[0][method]['table_bytes'] / 2**10:.1f} KiB (fp32)")


def main() -> None:
    args = parse_args()
    examples = training_examples(args)  # fails here, early, on a bad data path
    plan = batch_plan(args, examples)
    repeats = []
    for repeat in range(args.repeats):
        results = {}
        for method in args.methods:
            # A fresh process per method: ru_maxrss is a lifetime peak.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                results[method] = pool.submit(run_method, method, args, plan).result()
            print(
                f"[repeat {repeat + 1}/{args.repeats}] {method}: {results[method]['steady']:.2f} examples/s", flush=True
            )
        repeats.append(results)
    report(args, repeats, len(examples))


if __name__ == "__main__":
    main()
