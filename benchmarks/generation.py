"""Generation speed on WordNet definitions (SmolLM2-135M-Instruct): fedlm's cached decoding and generative training
against recomputing the whole sequence every step and against Hugging Face PEFT.

1. Decoding: the same ``--examples`` test-split prompts (word, part of speech, usage example) in batches of
   ``--batch-size``, greedy, at most ``--max-new-tokens``, no stop strings; a row ends at its end-of-sequence token
   or at the limit. New tokens are counted up to each row's end-of-sequence token, without it (what ``decode``
   returns), for every method alike. Two layouts, both with an MLP encoder started from ``INIT_TEXT`` and then
   perturbed (as ``tests/test_decoding.py``'s ``trained_looking``, with noise of std ``--perturb``: the test's 0.5
   makes SmolLM2 write gibberish, 0.02 still definitions), so that the prompt is not the untrained one:
   deep, the shipped generative layout (``DEEP_CACHED``: per-layer slots after the cached word and example), and
   shallow (``SHALLOW_FIRST``: virtual tokens before the text, uncached). Methods:
   (a) fedlm ``decode``: the prompt prefilled once, then one token per step through the key/value cache (the deep
       layout's prefix cache is filled first, as at evaluation, where the teacher-forced loss runs before decoding);
   (b) fedlm ``decode(next_logits=recompute_logits)``: the whole sequence run afresh at every step; its tokens must
       equal (a)'s (the script stops if not);
   (c) PEFT ``generate()`` (shallow only): a ``PromptTuningConfig`` adapter holding (a)'s virtual-token table, fed
       the same token ids without the virtual tokens (PEFT puts them before the whole input; SmolLM2's tokenizer
       adds no special tokens before it), left-padded. The table counts its rows whose tokens equal (a)'s, over all
       rows and over the rows no shorter than their batch's longest: PEFT's prompt-learning
       ``prepare_inputs_for_generation`` sets ``position_ids=None``, so a left-padded row's positions count its
       padding and its tokens may differ from (a)'s, which a row decoded alone by ``generate()`` matched when checked.
2. Training (forward, backward and an AdamW step on the encoder) on the same ``--train-examples`` training records,
   in the same batches for every method, answer-only loss with the end-of-sequence token: fedlm deep after cached
   text (its first epoch fills the prefix cache and is reported apart), fedlm shallow, and PEFT p-tuning
   (``PromptEncoderConfig``, MLP of ``--encoder-hidden``, as ``benchmarks/throughput.py``'s method (a)).

``--repeats R`` runs each part R times, methods interleaved, and prints each figure's median [range] and each
ratio taken within a repeat (paired). Needs ``peft`` (``pip install -r benchmarks/requirements.txt``) and WordNet 3.0
(/usr/share/wordnet or ``--wordnet-dir``). The table in ``results/speed.md`` comes from:

    python benchmarks/generation.py
"""

from __future__ import annotations

import argparse
import random
import traceback
from collections.abc import Callable
from typing import Any

import torch
from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model
from throughput import Batch, peft_batch, spread, sync, throughput

from fedlm.data.records import Record
from fedlm.data.wordnet import read_wordnet, split_records, task_records, wordnet_dir
from fedlm.model import load_backbone
from fedlm.model.backbone import DEFAULT_BACKBONE
from fedlm.model.decoding import DecodingConfig, decode, recompute_logits
from fedlm.ptuning import CacheConfig, PTuningModule
from fedlm.tasks import TaskConfig

DEEP_CACHED = "{word} ({pos}): {example} <|VIRTUAL_PROMPT_0|> Definition:{gloss}"  # configs/wordnet/definition_*
SHALLOW_FIRST = "<|VIRTUAL_PROMPT_0|> {word} ({pos}): {example} Definition:{gloss}"
INIT_TEXT = "Write the dictionary definition of the word as it is used in this sentence"
LAYOUTS = {"deep": "deep slots after cached text (shipped)", "shallow": "shallow, virtual tokens first"}
DECODERS = {"a": "(a) fedlm cached decode", "b": "(b) fedlm recompute", "c": "(c) PEFT generate"}
TRAINERS = {"deep": "fedlm deep after cached text (shipped)", "shallow": "fedlm shallow first", "peft": "PEFT p-tuning"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="fedlm backbone: alias, model directory or hub id")
    parser.add_argument("--wordnet-dir", default=None, help="WordNet 3.0 folder (default: $FEDLM_WORDNET_DIR)")
    parser.add_argument("--examples", type=int, default=64, help="test prompts decoded")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--train-examples", type=int, default=256, help="training records (one epoch)")
    parser.add_argument("--epochs", type=int, default=2, help="timed training epochs after the first")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before each method's timing")
    parser.add_argument("--repeats", type=int, default=3, help="run the methods this many times, interleaved")
    parser.add_argument("--virtual-tokens", type=int, default=10)
    parser.add_argument("--encoder-hidden", type=int, default=512)
    parser.add_argument("--perturb", type=float, default=0.02, help="std of the noise added to encoder parameters")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    counts = (args.examples, args.batch_size, args.max_new_tokens, args.train_examples, args.epochs, args.repeats)
    if min(counts) <= 0 or args.warmup < 0:
        parser.error("sizes, --epochs and --repeats must be positive, --warmup at least 0.")
    return args


def wordnet_splits(args: argparse.Namespace) -> dict[str, list[Record]]:
    """A seeded sample of the test split (decoding) and of the training split (training), as the WordNet data module
    splits them (no word in two splits)."""
    records = task_records(read_wordnet(wordnet_dir(args.wordnet_dir)), "definition")
    splits = split_records(records, 1800, 200, 300, args.seed)
    rng = random.Random(args.seed)
    sizes = {"test": args.examples, "train": args.train_examples}
    return {
        name: [Record(fields, origin) for fields, origin in rng.sample(splits[name], min(size, len(splits[name])))]
        for name, size in sizes.items()
    }


def build_module(args: argparse.Namespace, layout: str) -> PTuningModule:
    """The layout's module with its encoder parameters moved away from their start, as after training."""
    deep = layout == "deep"
    module = PTuningModule(
        backbone=args.backbone,
        task=TaskConfig(
            kind="generation",
            template=DEEP_CACHED if deep else SHALLOW_FIRST,
            truncate_field="example",
            max_length=160,
        ),
        encoder=dict(
            type="mlp",
            virtual_tokens=args.virtual_tokens,
            hidden_size=args.encoder_hidden,
            deep=deep,
            init_text=INIT_TEXT,
        ),
        cache=CacheConfig(prefix=deep),
    )
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for param in module.encoder.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * args.perturb)
    return module.to(args.device).eval()


def on(device: str, batch: Batch) -> Batch:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


# -- 1. decoding -----------------------------------------------------------------------------------------------------


def prompt_batches(args: argparse.Namespace, module: PTuningModule, records: list[Record]) -> list[Batch]:
    task = module.task
    encoded = [task.encode_prompt(record.fields, index) for index, record in enumerate(records)]
    return [on(args.device, task.template.collate(group)) for group in chunks(encoded, args.batch_size)]


def left_padded(prompts: Batch, pad_id: int) -> Batch:
    """The prompts' text tokens without the virtual slots, left-padded, as ``generate()`` takes them."""
    rows = [
        prompts["input_ids"][row, :length][prompts["virtual_index"][row, :length] < 0]
        for row, length in enumerate(prompts["prompt_length"].tolist())
    ]
    width = max(len(ids) for ids in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, device=rows[0].device),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long, device=rows[0].device),
    }
    for row, ids in enumerate(rows):
        batch["input_ids"][row, width - len(ids) :] = ids
        batch["attention_mask"][row, width - len(ids) :] = 1
    return batch


def peft_generator(args: argparse.Namespace, module: PTuningModule) -> Callable[[Batch], list[list[int]]]:
    """PEFT prompt tuning with ``module``'s virtual-token table (as ``fedlm.ptuning.export.save_peft_adapter``
    builds it), greedy ``generate()``, each row cut before its end-of-sequence token."""
    table = module.encoder().detach()
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=len(table), token_dim=table.shape[1])
    model = get_peft_model(load_backbone(args.backbone).model, config)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(table)
    model = model.to(args.device).eval()
    eos = module.tokenizer.eos_token_id

    def generate(batch: Batch) -> list[list[int]]:
        out = model.generate(
            **batch, max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        return [row[: row.index(eos)] if eos in row else row for row in new]

    return generate


Generate = Callable[[Batch], list[list[int]]]


def fedlm_decoder(module: PTuningModule, config: DecodingConfig, recompute: bool) -> Generate:
    next_logits = recompute_logits if recompute else None
    return lambda batch: decode(module.lm, batch, config, module.tokenizer, next_logits)


def timed_decode(generate: Generate, batches: list[Batch], device: str) -> dict[str, Any]:
    outputs: list[list[int]] = []
    rate = throughput(lambda batch: outputs.extend(generate(batch)), batches, device)
    tokens = sum(map(len, outputs))
    return {"examples/s": rate, "tokens/s": rate * tokens / len(outputs), "tokens": tokens, "outputs": outputs}


def paired(repeats: list[dict], key: Any, other: Any, figure: str) -> str:
    """``key``'s figure over ``other``'s, taken within each repeat: median [range]."""
    return spread([r[key][figure] / r[other][figure] for r in repeats]) + "x"


def decoding(args: argparse.Namespace, modules: dict[str, PTuningModule], records: list[Record]) -> None:
    config = DecodingConfig(max_new_tokens=args.max_new_tokens, stop=[])
    methods: dict[tuple[str, str], tuple[Generate, list[Batch]]] = {}
    for layout, module in modules.items():
        batches = prompt_batches(args, module, records)
        if module.prefix_cache is not None:  # filled as at evaluation, by the teacher-forced loss before decoding
            for batch in batches:
                module.lm.prefill(batch)
        methods[layout, "a"] = (fedlm_decoder(module, config, recompute=False), batches)
        methods[layout, "b"] = (fedlm_decoder(module, config, recompute=True), batches)
    peft_failure, unpadded = None, []
    try:
        pad = modules["shallow"].task.template.pad_id
        peft_batches = [left_padded(batch, pad) for batch in methods["shallow", "a"][1]]
        generate = peft_generator(args, modules["shallow"])
        generate(peft_batches[0])  # fails here, before any timing, if generate() breaks on this version
        methods["shallow", "c"] = (generate, peft_batches)
        unpadded = [bool(mask.all()) for batch in peft_batches for mask in batch["attention_mask"]]
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()  # PEFT's generate() breaks on some transformers releases: time (a) and (b) anyway
        peft_failure = f"fails: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    repeats = []
    for repeat in range(args.repeats):
        results = {}
        for key, (generate, batches) in methods.items():
            for batch in batches[: args.warmup]:
                generate(batch)
            results[key] = timed_decode(generate, batches, args.device)
            print(f"[decode {repeat + 1}/{args.repeats}] {key}: {results[key]['tokens/s']:.1f} tokens/s", flush=True)
        for layout in modules:
            cached, recomputed = results[layout, "a"]["outputs"], results[layout, "b"]["outputs"]
            if cached != recomputed:
                first = next(i for i, (a, b) in enumerate(zip(cached, recomputed)) if a != b)
                raise RuntimeError(f"{layout}: cached decoding differs from recomputing at example {first}.")
        repeats.append(results)
    decoding_table(args, repeats, peft_failure, unpadded, modules["shallow"])


def decoding_table(
    args: argparse.Namespace, repeats: list[dict], peft_failure: str | None, unpadded: list[bool], module: Any
) -> None:
    """One row per layout and method; (c)'s agreement with (a) also over the rows that ``generate()`` got unpadded."""
    keys = list(repeats[0])
    examples = len(repeats[0][keys[0]]["outputs"])
    print(
        f"\n### Decoding: {examples} WordNet test prompts, batch {args.batch_size}, greedy, at most "
        f"{args.max_new_tokens} new tokens, no stop strings; new tokens counted up to each row's EOS\n"
    )
    print(
        "| layout | method | new tokens | new tokens/s | examples/s | vs (b), same layout | vs (c) PEFT | same as (a) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    peft = ("shallow", "c")
    for layout, method in [*keys, *([peft] if peft_failure else [])]:
        name = f"| {LAYOUTS[layout]} | {DECODERS[method]} |"
        if (layout, method) not in keys:
            print(f"{name} {peft_failure} | | | | | |")
            continue
        runs = [r[layout, method] for r in repeats]
        equal = [a == b for a, b in zip(runs[0]["outputs"], repeats[0][layout, "a"]["outputs"])]
        same = "-" if method == "a" else f"{sum(equal)}/{examples}"
        if method == "c":
            same += f" (unpadded rows: {sum(e for e, u in zip(equal, unpadded) if u)}/{sum(unpadded)})"
        versus_b = "-" if method == "b" else paired(repeats, (layout, method), (layout, "b"), "tokens/s")
        versus_c = "-" if method == "c" or peft not in keys else paired(repeats, (layout, method), peft, "tokens/s")
        print(
            f"{name} {runs[0]['tokens']} | {spread([r['tokens/s'] for r in runs])} | "
            f"{spread([r['examples/s'] for r in runs])} | {versus_b} | {versus_c} | "
            f"{same} |"
        )
    sample = module.tokenizer.decode(repeats[0]["shallow", "a"]["outputs"][0])
    print(f"\nRatios are of new tokens/s (the deep layout generates its own tokens). First shallow answer: {sample!r}")


# -- 2. training -----------------------------------------------------------------------------------------------------


def trainer(loss_fn: Callable[[Batch], torch.Tensor], params: list[torch.nn.Parameter], lr: float) -> Callable:
    """One training step: forward, backward and AdamW on ``params``."""
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step(batch: Batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(batch).backward()
        optimizer.step()

    return step


def fedlm_trainer(module: PTuningModule, lr: float) -> tuple[Callable, int]:
    params = list(module.train().encoder.parameters())
    return trainer(lambda batch: module.task.train_loss(module.lm, batch), params, lr), sum(p.numel() for p in params)


def peft_trainer(args: argparse.Namespace) -> tuple[Callable, int]:
    """PEFT p-tuning with ``benchmarks/throughput.py``'s method (a) encoder, loss from the model's ``labels``."""
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=args.virtual_tokens,
        encoder_reparameterization_type="MLP",
        encoder_hidden_size=args.encoder_hidden,
    )
    model = get_peft_model(load_backbone(args.backbone).model, config).to(args.device)
    model.eval()  # the frozen LM without dropout, as in fedlm
    params = [p for p in model.parameters() if p.requires_grad]
    return trainer(lambda batch: model(**batch).loss, params, args.lr), sum(p.numel() for p in params)


def training(args: argparse.Namespace, modules: dict[str, PTuningModule], records: list[Record]) -> None:
    groups = chunks(records, args.batch_size)
    shallow = modules["shallow"].task
    methods = {"peft": (*peft_trainer(args), [on(args.device, peft_batch(shallow, group)) for group in groups], None)}
    for layout, module in modules.items():
        task = module.task
        batches = [on(args.device, task.template.collate([task.encode(r.fields) for r in group])) for group in groups]
        methods[layout] = (*fedlm_trainer(module, args.lr), batches, module.prefix_cache)
    repeats = []
    for repeat in range(args.repeats):
        results = {}
        for name, (step, _, batches, cache) in methods.items():
            throughput(step, batches[: args.warmup], args.device)
            if cache is not None:
                cache.clear()  # the warm-up (and decoding) filled some: the first epoch starts cold
            first = throughput(step, batches, args.device)
            results[name] = {"first": first, "later": throughput(step, batches * args.epochs, args.device)}
            print(f"[train {repeat + 1}/{args.repeats}] {name}: {results[name]['later']:.2f} examples/s", flush=True)
        repeats.append(results)
    print(
        f"\n### Training: {len(records)} WordNet training records, batch {args.batch_size}, answer-only loss with "
        f"EOS, AdamW on the encoder; later epochs: the {args.epochs} after the first\n"
    )
    print("| method | trained parameters | phase | examples/s | vs PEFT p-tuning |")
    print("|---|---|---|---|---|")
    for name, (_, trained, _, cache) in methods.items():
        phases = [("first epoch, filling the cache", "first")] if cache is not None else []
        for phase, key in [*phases, ("later epochs", "later")]:
            runs = [r[name][key] for r in repeats]
            ratio = spread([r[name][key] / r["peft"]["later"] for r in repeats]) + "x"
            print(f"| {TRAINERS[name]} | {trained} | {phase} | {spread(runs)} | {ratio} |")


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    records = wordnet_splits(args)
    modules = {layout: build_module(args, layout) for layout in LAYOUTS}
    print(
        f"backbone={args.backbone} device={args.device} dtype=fp32 batch_size={args.batch_size} "
        f"repeats={args.repeats} warmup={args.warmup} virtual_tokens={args.virtual_tokens} "
        f"encoder_hidden={args.encoder_hidden} perturb={args.perturb} torch_threads={torch.get_num_threads()}"
    )
    with torch.no_grad():
        decoding(args, modules, records["test"])
    sync(args.device)
    training(args, modules, records["train"])


if __name__ == "__main__":
    main()
