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
from transformers import AttentionInterface, DynamicCache, PreTrainedModel

from fedlm.model.backbone import cache_argument


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
    mask = torch.ones_like(ids_tensor)
    model.base_model(input_ids=ids_tensor, attention_mask=mask, use_cache=True, **cache_argument(model, cache))
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


def slot_key_values(table: torch.Tensor, shape: SlotShape) -> torch.Tensor:
    """The (layers, 2, 1, heads, slots, head dim) key/values of a (slots, width) table, shared by every row, or the
    (layers, 2, rows, heads, slots, head dim) ones of a (rows, slots, width) table per row (DP-SGD's copies)."""
    per_row = table if table.dim() == 3 else table.unsqueeze(0)
    split = per_row.reshape(per_row.shape[0], per_row.shape[1], shape.layers, 2, shape.heads, shape.head_dim)
    return split.permute(2, 3, 0, 4, 1, 5)


@dataclass(frozen=True)
class SlotPast:
    """What each layer's attention reads besides the running tokens: the rows' prefix key/values (constants of the
    frozen LM, left-padded; absent when the slots come first) and the slots'."""

    prefix: torch.Tensor | None  # (layers, 2, rows, heads, prefix length, head dim)
    prefix_mask: torch.Tensor | None  # (rows, prefix length), True where a prefix token is
    slots: torch.Tensor  # (layers, 2, rows or 1, heads, slots, head dim)
    running_mask: torch.Tensor  # (rows, running length), True where a running token is


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    slot_past: SlotPast | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention of the running tokens over [prefix, slots, running tokens], registered with transformers as
    ``fedlm_slots`` and used for the deep forward only.

    Why not a cache: the LM's own attention would attend over one concatenated (rows, heads, prefix + slots +
    running, head dim) tensor per layer, copied every step, and its backward would compute gradients for the whole
    prefix, which is constant. Here the three blocks stay apart, the prefix gets no gradient, and the slots are
    shared by the rows without being copied. Query heads are grouped by the key/value head they share (GQA).
    """
    layer = module.layer_idx
    rows, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, (heads // kv_heads) * length, head_dim)  # heads j*g..j*g+g-1 share j
    slot_k, slot_v = slot_past.slots[layer, 0], slot_past.slots[layer, 1]
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    running = (causal & slot_past.running_mask[:, None, :])[:, None].repeat(1, 1, heads // kv_heads, 1)
    blocks = [(grouped @ slot_k.transpose(-1, -2), None, slot_v), (grouped @ key.transpose(-1, -2), running, value)]
    if slot_past.prefix is not None:
        prefix_k, prefix_v = slot_past.prefix[layer, 0], slot_past.prefix[layer, 1]
        blocks.insert(0, (grouped @ prefix_k.transpose(-1, -2), slot_past.prefix_mask[:, None, None, :], prefix_v))
    scores = [s if mask is None else s.masked_fill(~mask, float("-inf")) for s, mask, _ in blocks]
    weights = torch.softmax(torch.cat(scores, dim=-1).float() * scaling, dim=-1).to(query.dtype)
    parts = weights.split([s.shape[-1] for s in scores], dim=-1)
    out = sum(part @ v for part, (_, _, v) in zip(parts, blocks))
    return out.reshape(rows, heads, length, head_dim).transpose(1, 2), None


AttentionInterface.register("fedlm_slots", slot_attention)


def run_after_slots(
    model: PreTrainedModel, embeds: torch.Tensor, position_ids: torch.Tensor, past: SlotPast
) -> torch.Tensor:
    """The frozen LM's last hidden states of the running tokens, attending to ``past`` in every layer."""
    config = model.config
    previous, config._attn_implementation = config._attn_implementation, "fedlm_slots"
    try:  # the switch is for this forward only: the prefix cache and everything else keep the LM's own attention
        out = model.base_model(inputs_embeds=embeds, position_ids=position_ids, slot_past=past, use_cache=False)
    finally:
        config._attn_implementation = previous
    return out.last_hidden_state
