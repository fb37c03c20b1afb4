"""Batched decoding through the prompted LM's key/value cache: greedy, or sampled from per-row seeded generators.

Not ``generate()``: its handling of caches that already hold virtual tokens or deep slots changes between
transformers releases, while here the prompt is prefilled once (``PromptedLM.prefill``) and each step feeds one token
per row with its own position. A row stops at the end-of-sequence token, at a stop string, or after
``max_new_tokens``; the batch stops when every row has (and, with a sharded LM, when every rank's batch has).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from fedlm.errors import ConfigError
from fedlm.model.prefix_cache import idle_forward
from fedlm.model.prompted import Batch, PromptedLM
from fedlm.model.template import IGNORE_INDEX
from fedlm.seeding import derive_seed


@dataclass
class DecodingConfig:
    """``model.task.decoding``: how answers are generated.

    Args:
        max_new_tokens: the most tokens generated per answer.
        stop: strings that end an answer (the answer is cut before the first); the end-of-sequence token always does.
        sample: draw each token from the softmax at ``temperature``, within the ``top_p`` nucleus, instead of taking
            the most likely one. Each row draws from its own generator, seeded by ``seed`` and the example's index, so
            the same example gets the same text in any batch and any process.
        temperature, top_p, seed: sampling's settings.
    """

    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=lambda: ["\n"])
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise ConfigError(f"model.task.decoding.max_new_tokens={self.max_new_tokens} must be positive.")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"model.task.decoding: temperature={self.temperature} must be positive and top_p={self.top_p} in "
                "(0, 1]."
            )
        if any(not stop for stop in self.stop):
            raise ConfigError("model.task.decoding.stop holds an empty string, which would end every answer at once.")


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to the first stop string."""
    ends = [text.find(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text


class Chooser:
    """Picks each row's next token: the argmax, or a draw from the row's own generator."""

    def __init__(self, config: DecodingConfig, indices: list[int]) -> None:
        self.config = config
        self.generators = (
            [torch.Generator().manual_seed(derive_seed("decode", config.seed, index)) for index in indices]
            if config.sample
            else []
        )

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.config.sample:
            return logits.argmax(-1)
        probs = (logits.float().cpu() / self.config.temperature).softmax(-1)
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= self.config.top_p  # the nucleus keeps the first token
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        drawn = [
            int(order[row, torch.multinomial(sorted_probs[row], 1, generator=generator)])
            for row, generator in enumerate(self.generators)
        ]
        return torch.tensor(drawn, device=logits.device)


def decode(
    lm: PromptedLM,
    prompts: Batch | None,
    config: DecodingConfig,
    tokenizer: PreTrainedTokenizerBase,
    next_logits: Callable[..., tuple[object, torch.Tensor]] | None = None,
) -> list[list[int]]:
    """Each prompt's generated token ids (without the end-of-sequence token); ``prompts`` None: a rank with no rows,
    which still runs one forward per step of its lockstep group (``lm.lockstep``).

    ``next_logits`` replaces the cached steps (``recompute_logits``: the whole sequence at every step, the reference).
    """
    rows = 0 if prompts is None else len(prompts["input_ids"])
    if rows == 0 and lm.lockstep is None:
        return []
    eos = tokenizer.eos_token_id
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    state = None
    choose = Chooser(config, prompts["index"].tolist() if rows else [])
    for step in range(config.max_new_tokens):
        if rows == 0:  # the same forwards as a busy rank: a prefill (a prefix fill and a forward), then steps
            lm.idle_pass() if step == 0 else idle_forward(lm.backbone)
        else:
            if next_logits is not None:
                logits = next_logits(lm, prompts, generated)
            elif state is None:
                state, logits = lm.prefill(prompts)
            else:
                logits = lm.step(state, torch.tensor([g[-1] for g in generated], device=lm.device))
            for row, token in enumerate(choose(logits).tolist()):
                if not done[row]:
                    generated[row].append(token)
                    done[row] = token == eos or any(s in tokenizer.decode(generated[row]) for s in config.stop)
                else:
                    generated[row].append(eos)  # fed, never kept: the row's answer is over
        if not _group_running(lm, not all(done) and step < config.max_new_tokens - 1):
            break
    return [_kept(g, eos) for g in generated]


def _kept(tokens: list[int], eos: int | None) -> list[int]:
    """The tokens before the first end-of-sequence token."""
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def _group_running(lm: PromptedLM, running: bool) -> bool:
    """Whether any rank of the lockstep group still decodes (this rank alone without one)."""
    if lm.lockstep is None:
        return running
    flag = torch.tensor([int(running)], device=lm.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=lm.lockstep)
    return bool(flag.item())


@torch.no_grad()
def recompute_logits(lm: PromptedLM, prompts: Batch, generated: list[list[int]]) -> torch.Tensor:
    """The next-token logits of each row from its whole sequence (prompt and tokens so far) run afresh through the
    layout's own training forward: what cached decoding must reproduce, at the cost of the whole prefix per step."""
    rows = []
    for row, tokens in enumerate(generated):
        length = int(prompts["prompt_length"][row])
        ids = prompts["input_ids"][row, :length].tolist() + tokens + [0]  # the last column is never fed
        virtual = prompts["virtual_index"][row, :length].tolist() + [-1] * (len(tokens) + 1)
        rows.append((ids, virtual, length + len(tokens)))
    width = max(len(ids) for ids, _, _ in rows)
    batch = {
        "input_ids": torch.tensor([ids + [0] * (width - len(ids)) for ids, _, _ in rows]),
        "virtual_index": torch.tensor([v + [-1] * (width - len(v)) for _, v, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in rows]),
        "prompt_length": torch.tensor([end for _, _, end in rows]),
        "label": prompts["label"].cpu(),
    }
    batch["targets"] = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    batch = {name: tensor.to(lm.device) for name, tensor in batch.items()}
    hidden, aligned = lm.hidden_states(batch)
    return lm.last_prompt_logits(hidden, aligned)
