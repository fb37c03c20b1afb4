"""Deep prompts: trainable key/value slots in every layer of the frozen LM (prefix tuning, Li & Liang 2021;
P-tuning v2, Liu et al. 2022), instead of virtual-token embeddings fed to the first.

The prompt encoder's table has one row per slot, holding that slot's keys and values for every layer and key/value
head, flattened: (slots, layers * 2 * kv heads * head dim). In the forward the rows become past key/values placed
where the template's virtual-token block is, so nothing runs for the slots themselves: only what follows them.

Positions: the slots take the positions of the virtual-token block (its first token's position and on), so the text
after them has the positions it would have with virtual tokens in their place. Their keys are used as they are,
with no position embedding applied (rotary models rotate only the keys the LM computes), as in prefix tuning and
PEFT: a slot key is learned directly in the space the rotated keys live in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass(frozen=True)
class SlotShape:
    layers: int
    heads: int  # key/value heads
    head_dim: int

    @property
    def width(self) -> int:
        """One slot's values: keys and values of every layer and head."""
        return self.layers * 2 * self.heads * self.head_dim


@torch.no_grad()
def text_key_values(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """The frozen LM's (layers, 2, heads, len(ids), head dim) key/values of ``ids`` run alone, in fp32."""
    cache = DynamicCache(config=model.config)
    ids_tensor = torch.tensor([ids], dtype=torch.long, device=model.device)
    model.base_model(input_ids=ids_tensor, attention_mask=torch.ones_like(ids_tensor), past_key_values=cache)
    return torch.stack([torch.stack([keys[0], values[0]]) for keys, values, _ in cache]).float().cpu()


def slot_shape(model: PreTrainedModel) -> SlotShape:
    """Read off the key/values of one token, whatever the architecture names its head counts."""
    layers, _, heads, _, head_dim = text_key_values(model, [0]).shape
    return SlotShape(layers, heads, head_dim)


def initial_slots(model: PreTrainedModel, ids: list[int], slots: int) -> torch.Tensor:
    """(slots, width) rows: the key/values of the text ``ids``, its tokens repeated to fill the slots.

    Random slots start at the wrong scale in every layer and train badly; a text's own key/values are ones the LM
    knows how to attend to.
    """
    kv = text_key_values(model, ids)  # (layers, 2, heads, tokens, head dim)
    rows = kv.permute(3, 0, 1, 2, 4).reshape(len(ids), -1)  # (tokens, width)
    return rows[torch.arange(slots) % len(ids)].clone()


def slot_key_values(table: torch.Tensor, shape: SlotShape, rows: int) -> torch.Tensor:
    """The (layers, 2, rows, heads, slots, head dim) key/values of a (slots, width) table shared by ``rows`` batch
    rows, or of a (rows, slots, width) table per row (DP-SGD's per-example copies)."""
    per_row = table if table.dim() == 3 else table.unsqueeze(0).expand(rows, -1, -1)
    slots = per_row.shape[1]
    split = per_row.reshape(rows, slots, shape.layers, 2, shape.heads, shape.head_dim)
    return split.permute(2, 3, 0, 4, 1, 5)


def past_with_slots(
    prefix: torch.Tensor | None, prefix_mask: torch.Tensor | None, slots: torch.Tensor, config: object
) -> tuple[DynamicCache, torch.Tensor]:
    """A fresh cache holding each row's prefix key/values (left-padded, may be absent) followed by the slots, and
    its (rows, prefix + slots) attention mask. Fresh on every call because the forward appends to it."""
    rows, length = slots.shape[2], slots.shape[4]
    ones = torch.ones((rows, length), dtype=torch.long, device=slots.device)
    if prefix is None:
        layers, mask = slots, ones
    else:
        layers, mask = torch.cat([prefix.to(slots.dtype), slots], dim=4), torch.cat([prefix_mask, ones], dim=1)
    return DynamicCache([(layer[0], layer[1]) for layer in layers], config=config), mask
