"""The frozen LM with its prompt: the forward passes of every layout, and the key/value state decoding starts from.

Layouts (``fedlm.model.prefix_cache``, ``fedlm.model.slots``): virtual-token embeddings fed with the text, with or
without the text before them cached; or deep key/value slots in every layer after cached text (or after the
tokenizer's special tokens). Training reads hidden states at the answer; decoding prefills the prompt once into an
ordinary ``DynamicCache`` and then feeds one token a step with explicit per-row positions, so padded rows of
mixed lengths decode as they would alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from fedlm.model.backbone import cache_argument
from fedlm.model.prefix_cache import PrefixCache, idle_forward, split_at_first_virtual
from fedlm.model.prompt_encoder import PromptEncoder
from fedlm.model.slots import SlotPast, SlotShape, run_after_slots, slot_key_values
from fedlm.model.template import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


def without_last_column(batch: Batch) -> Batch:
    """The per-token tensors of a right-padded batch minus their last column, which predicts nothing."""
    per_token = ("input_ids", "virtual_index", "attention_mask", "position_ids")
    return {name: batch[name][:, :-1] for name in per_token if name in batch}


@dataclass
class DecodeState:
    """What the next decoding step needs: the rows' key/values so far, the mask over them, and each row's next
    position (its real length so far: padding holes take none)."""

    cache: DynamicCache
    mask: torch.Tensor  # (rows, cached length)
    positions: torch.Tensor  # (rows,)


class PromptedLM:
    """A frozen causal LM and the trainable prompt encoder whose output it reads (both owned, as modules, by whoever
    trains them: this only runs them)."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        encoder: PromptEncoder,
        prefix_cache: PrefixCache | None,
        slot_shape: SlotShape | None,
    ) -> None:
        self.backbone, self.encoder = backbone, encoder
        self.prefix_cache, self.slot_shape = prefix_cache, slot_shape
        # A sharded LM's ranks (fedlm.federation.sharding): each forward is their collective, so they decode as many
        # steps as the longest of them.
        self.lockstep: dist.ProcessGroup | None = None

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    # -- training and scoring ----------------------------------------------------------------------------------

    def input_embeddings(self, batch: Batch, tables: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the encoder's virtual-token rows placed where the template put them.

        ``tables``: one table per example, (batch, virtual tokens, hidden) (DP-SGD's per-example gradients);
        by default the encoder's output, computed once per step and shared by the batch.
        """
        token_embeds = self.backbone.get_input_embeddings()(batch["input_ids"])
        virtual = batch["virtual_index"]
        if tables is None:
            rows = self.encoder().to(token_embeds.dtype)[virtual.clamp(min=0)]
        else:
            examples = torch.arange(len(virtual), device=virtual.device).unsqueeze(1)
            rows = tables.to(token_embeds.dtype)[examples, virtual.clamp(min=0)]
        return torch.where((virtual >= 0).unsqueeze(-1), rows, token_embeds)

    def hidden_states(self, batch: Batch, tables: torch.Tensor | None = None) -> tuple[torch.Tensor, Batch]:
        """Last hidden states and the batch they align with: the batch itself, or its suffixes if the prefix is cached.

        The base model without the LM head: logits are needed only at a few positions. The last column is not fed:
        position t predicts token t + 1, so nothing reads the hidden state of the final one.
        """
        if self.slot_shape is not None:
            return self._deep_hidden_states(batch, tables)
        if self.prefix_cache is None:
            inputs = without_last_column(batch)
            embeds = self.input_embeddings(inputs, tables)
            out = self.backbone.base_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
            return out.last_hidden_state, batch
        prefixes, suffix = split_at_first_virtual(batch)
        past, past_mask = self.prefix_cache.past(prefixes)
        inputs = without_last_column(suffix)
        out = self.backbone.base_model(
            inputs_embeds=self.input_embeddings(inputs, tables),
            attention_mask=torch.cat([past_mask, inputs["attention_mask"]], dim=1),
            position_ids=inputs["position_ids"],
            use_cache=True,
            **cache_argument(self.backbone, past),
        )
        return out.last_hidden_state, suffix

    def _after_slots(self, batch: Batch) -> tuple[list[tuple[int, ...]], Batch]:
        """Each row's prefix and the batch cut to what follows the deep slots (positions in the full sequence)."""
        prefixes, suffix = split_at_first_virtual(batch)
        slots = self.encoder.config.total_virtual_tokens
        rest = {name: tensor[:, slots:] for name, tensor in suffix.items() if tensor.dim() == 2}
        rest.update({name: suffix[name] for name in ("label", "index") if name in suffix})
        rest["prompt_length"] = suffix["prompt_length"] - slots
        return prefixes, rest

    def _prefix(self, prefixes: list[tuple[int, ...]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The rows' cached prefix key/values and mask, or none when the slots come first."""
        return self.prefix_cache.stacked(prefixes) if self.prefix_cache is not None else (None, None)

    def _deep_hidden_states(self, batch: Batch, tables: torch.Tensor | None = None) -> tuple[torch.Tensor, Batch]:
        """Deep prompts: every layer attends to the prefix (cached text, or only the tokenizer's special tokens) and
        the slots (``fedlm.model.slots``), and only what follows the slots runs through the frozen LM."""
        prefixes, rest = self._after_slots(batch)
        table = self.encoder() if tables is None else tables
        prefix, prefix_mask = self._prefix(prefixes)
        inputs = without_last_column(rest)
        past = SlotPast(
            prefix=prefix,
            prefix_mask=None if prefix_mask is None else prefix_mask.bool(),
            slots=slot_key_values(table.to(self.backbone.dtype), self.slot_shape),
            running_mask=inputs["attention_mask"].bool(),
        )
        embeds = self.backbone.get_input_embeddings()(inputs["input_ids"])
        return run_after_slots(self.backbone, embeds, inputs["position_ids"], past), rest

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_output_embeddings()(hidden).float()

    def answer_log_probs(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the answer tokens (flattened) and the batch row each belongs to.

        ``hidden`` holds every column of ``targets`` but the last (see ``hidden_states``).
        """
        targets = targets[:, 1:]
        predicts_answer = targets != IGNORE_INDEX  # position t predicts token t+1
        logits = self.logits(hidden[predicts_answer])
        token_log_probs = -F.cross_entropy(logits, targets[predicts_answer], reduction="none")
        return token_log_probs, predicts_answer.nonzero()[:, 0]

    def example_losses(self, batch: Batch, tables: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's mean answer-token loss (DP-SGD clips per example)."""
        hidden, aligned = self.hidden_states(batch, tables)
        token_log_probs, rows = self.answer_log_probs(hidden, aligned["targets"])
        size = len(batch["input_ids"])
        sums = torch.zeros(size, device=hidden.device).index_add_(0, rows, -token_log_probs)
        counts = torch.zeros(size, device=hidden.device).index_add_(0, rows, torch.ones_like(token_log_probs))
        return sums / counts

    def last_prompt_logits(self, hidden: torch.Tensor, aligned: Batch) -> torch.Tensor:
        """Each row's full-vocabulary logits after its prompt: where the answer's first token is read."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.logits(hidden[rows, aligned["prompt_length"] - 1])

    @torch.no_grad()
    def idle_pass(self) -> None:
        """What one forward of a batch runs through the frozen LM (a prefix fill and a forward), on one token: what a
        rank with no rows runs while the other ranks of a sharded LM run theirs."""
        if self.prefix_cache is not None:
            self.prefix_cache.join_fill()
        idle_forward(self.backbone)

    # -- decoding ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompts: Batch) -> tuple[DecodeState, torch.Tensor]:
        """Run right-padded prompts (no answers) into a fresh key/value cache; the state and each row's logits for
        its first new token.

        The cache holds, per layer, the cached prefix (left-padded), the deep slots if any (as plain key/values:
        ordinary attention reads them as the slot attention does) and the rest of the prompt (right-padded); the
        mask keeps each row to its own tokens.
        """
        if self.slot_shape is not None:
            prefixes, run = self._after_slots(prompts)
            prefix, prefix_mask = self._prefix(prefixes)
            rows = len(prompts["input_ids"])
            slots = slot_key_values(self.encoder().to(self.backbone.dtype), self.slot_shape).expand(
                -1, -1, rows, -1, -1, -1
            )
            slot_mask = torch.ones(rows, slots.shape[4], dtype=torch.long, device=self.device)
            layers = slots if prefix is None else torch.cat([prefix, slots], dim=4)
            mask = slot_mask if prefix is None else torch.cat([prefix_mask, slot_mask], dim=1)
            cache = DynamicCache([(layer[0], layer[1]) for layer in layers], config=self.backbone.config)
            embeds = self.backbone.get_input_embeddings()(run["input_ids"])
        elif self.prefix_cache is not None:
            prefixes, run = split_at_first_virtual(prompts)
            cache, mask = self.prefix_cache.past(prefixes)
            embeds = self.input_embeddings(run)
        else:
            run = dict(prompts, position_ids=(prompts["attention_mask"].cumsum(1) - 1).clamp(min=0))
            cache = DynamicCache(config=self.backbone.config)
            mask = torch.zeros(len(prompts["input_ids"]), 0, dtype=torch.long, device=self.device)
            embeds = self.input_embeddings(run)
        mask = torch.cat([mask, run["attention_mask"]], dim=1)
        out = self.backbone.base_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=run["position_ids"],
            use_cache=True,
            **cache_argument(self.backbone, cache),
        )
        logits = self.last_prompt_logits(out.last_hidden_state, run)
        positions = run["position_ids"].gather(1, (run["prompt_length"] - 1)[:, None])[:, 0] + 1
        return DecodeState(cache, mask, positions), logits

    @torch.no_grad()
    def step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row's newest token (rows,); the logits for the token after it. Updates ``state`` in place."""
        state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
        out = self.backbone.base_model(
            input_ids=tokens[:, None],
            attention_mask=state.mask,
            position_ids=state.positions[:, None],
            use_cache=True,
            **cache_argument(self.backbone, state.cache),
        )
        state.positions = state.positions + 1
        return self.logits(out.last_hidden_state[:, -1])
