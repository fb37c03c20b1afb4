"""Cached prefix key/values: the frozen LM runs the text before the first virtual token once per distinct prefix.

Under causal attention the tokens before the first virtual token never attend to the prompt encoder's output, so
their keys and values are constants of the frozen backbone. A template that puts the sentence first
(``"{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"``) then needs forward and backward passes only over the
suffix: virtual tokens, the remaining text and the answer.

Batch layout: each row's prefix key/values are left-padded to the batch's longest prefix (the padding is masked
out), the suffix stays right-padded, and every suffix token gets the position it has in the full sequence (its
row's prefix length plus its offset), so rotary and absolute position embeddings see what the uncached forward sees.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from fedlm.model.backbone import DTYPES, Dtype
from fedlm.model.template import IGNORE_INDEX


def split_at_first_virtual(batch: dict[str, torch.Tensor]) -> tuple[list[tuple[int, ...]], dict[str, torch.Tensor]]:
    """Each row's prefix token ids (everything before its first virtual token), and the batch cut to the suffixes.

    The suffix batch has the keys of a collated batch, aligned with the suffix: ``prompt_length`` counts from the
    suffix start, ``attention_mask`` covers the suffix only, and ``position_ids`` holds positions in the full
    sequence (0 at padding, which nothing reads).
    """
    virtual = batch["virtual_index"]
    starts = (virtual >= 0).int().argmax(1)
    lengths = batch["attention_mask"].sum(1)
    offsets = torch.arange(int((lengths - starts).max()), device=virtual.device)
    positions = starts[:, None] + offsets
    valid = positions < lengths[:, None]
    index = positions.clamp(max=virtual.shape[1] - 1)

    def take(name: str, fill: int) -> torch.Tensor:
        return torch.where(valid, batch[name].gather(1, index), fill)

    suffix = {
        "input_ids": take("input_ids", 0),
        "virtual_index": take("virtual_index", -1),
        "attention_mask": valid.long(),
        "targets": take("targets", IGNORE_INDEX),
        "prompt_length": batch["prompt_length"] - starts,
        "label": batch["label"],
        "position_ids": torch.where(valid, positions, 0),
    }
    prefixes = [tuple(row[:start]) for row, start in zip(batch["input_ids"].tolist(), starts.tolist())]
    return prefixes, suffix


class PrefixCache:
    """The frozen LM's key/values of each distinct prefix, content-addressed by the prefix token ids.

    Entries are filled on first sight, so a process holds only the prefixes of the examples it has seen (in a
    federated run: its own clients' data plus the evaluation splits it scores). The backbone is frozen, so an entry
    never goes stale. Each entry is a (layers, 2, key/value heads, prefix length, head dim) tensor in ``dtype``.
    """

    def __init__(self, model: PreTrainedModel, dtype: Dtype = "fp32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"model.cache_dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}.")
        if any(DynamicCache(config=model.config).is_sliding):
            raise ValueError(
                "model.cache_prefix=true needs full attention in every layer, but this backbone has sliding-window "
                "layers; set model.cache_prefix=false."
            )
        self.model = model
        self.dtype = DTYPES[dtype]
        self.entries: dict[tuple[int, ...], torch.Tensor] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def past(self, prefixes: list[tuple[int, ...]]) -> tuple[DynamicCache, torch.Tensor]:
        """A fresh cache of the rows' prefix key/values, left-padded to the longest, and its (rows, longest) mask.

        Fresh on every call because the forward appends the suffix's key/values to it.
        """
        self._fill([prefix for prefix in dict.fromkeys(prefixes) if prefix not in self.entries])
        longest = max(map(len, prefixes))
        layers, _, heads, _, head_dim = self.entries[prefixes[0]].shape
        device = self.model.device
        shape = (layers, 2, len(prefixes), heads, longest, head_dim)
        stacked = torch.zeros(shape, dtype=self.model.dtype, device=device)
        mask = torch.zeros((len(prefixes), longest), dtype=torch.long, device=device)
        for row, prefix in enumerate(prefixes):
            stacked[:, :, row, :, longest - len(prefix) :] = self.entries[prefix]
            mask[row, longest - len(prefix) :] = 1
        return DynamicCache([(layer[0], layer[1]) for layer in stacked], config=self.model.config), mask

    @torch.no_grad()
    def _fill(self, prefixes: list[tuple[int, ...]]) -> None:
        """Run the frozen LM once over the new prefixes (right-padded: causal attention keeps padding out of them)."""
        if not prefixes:
            return
        device = self.model.device
        ids = torch.zeros((len(prefixes), max(map(len, prefixes))), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, prefix in enumerate(prefixes):
            ids[row, : len(prefix)] = torch.tensor(prefix, device=device)
            mask[row, : len(prefix)] = 1
        cache = DynamicCache(config=self.model.config)
        self.model.base_model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        layers = [(keys, values) for keys, values, _ in cache]
        for row, prefix in enumerate(prefixes):
            n = len(prefix)
            entry = torch.stack([torch.stack([k[row, :, :n], v[row, :, :n]]) for k, v in layers]).to(self.dtype)
            self.entries[prefix] = entry
            self.nbytes += entry.numel() * entry.element_size()
