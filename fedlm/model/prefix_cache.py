"""Cached prefix key/values: the frozen LM runs the text before the first virtual token once per distinct prefix.

Under causal attention the tokens before the first virtual token never attend to the prompt encoder's output, so
their keys and values are constants of the frozen backbone. A template that puts the sentence first
(``"{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"``) then needs forward and backward passes only over the
suffix: virtual tokens, the remaining text and the answer.

Batch layout: each row's prefix key/values are left-padded to the batch's longest prefix (the padding is masked
out), the suffix stays right-padded, and every suffix token gets the position it has in the full sequence (its
row's prefix length plus its offset), so rotary and absolute position embeddings see what the uncached forward sees.

A fixed head that every prefix starts with (an instruction before the sentence) is stored once: each entry then
holds only the rest, computed with the head's key/values as its past, and ``past`` lays head and rest side by side.

With a byte budget the least recently used entries are dropped past it (``PrefixCache.budget_bytes``); a dropped
entry is read back from the store, or computed again, bit for bit the same.

With a ``PrefixStore`` the entries also live on disk, so that the runs of a search or an experiment (each its own
process) compute each sentence's key/values once between them instead of once each.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache, PreTrainedModel

from fedlm.errors import ConfigError
from fedlm.model.backbone import DTYPES, Dtype, cache_argument
from fedlm.model.template import IGNORE_INDEX

log = logging.getLogger(__name__)


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


def backbone_fingerprint(model: PreTrainedModel, dtype: torch.dtype) -> str:
    """A digest of everything a cached entry's bits depend on: the weights, the dtypes, torch and its thread count.

    The thread count is in it because a CPU kernel may split a sum differently over another number of threads, and an
    entry read from disk must equal the one this process would compute.
    """
    digest = hashlib.sha256(f"{torch.__version__}|{model.device.type}|{torch.get_num_threads()}|{dtype}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def device_kind(device: torch.device) -> str:
    """What an entry's bits depend on besides the fingerprint, off the CPU: the GPU model, whose kernels differ."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class PrefixStore:
    """Cache entries on disk, one file each, in a folder of their own per backbone fingerprint.

    A file is named by a digest of its key and holds the key too, so a digest collision reads as a miss. Files are
    written to a temporary name and renamed, so processes sharing the folder (ranks, parallel runs) never read half
    a file. The entries are derived from the data: keep the folder out of version control (``runs/`` is ignored).
    """

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.folder = Path(root) / fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.writes = 0

    def path(self, key: tuple[int, ...]) -> Path:
        return (
            self.folder
            / f"{hashlib.sha256(torch.tensor(key, dtype=torch.int64).numpy().tobytes()).hexdigest()[:32]}.pt"
        )

    def load(self, key: tuple[int, ...]) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        stored = torch.load(path, weights_only=True)
        if stored["key"].tolist() != list(key):
            return None
        self.hits += 1
        return stored["entry"]

    def save(self, key: tuple[int, ...], entry: torch.Tensor) -> None:
        handle, staging = tempfile.mkstemp(prefix=".entry-", dir=self.folder)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save({"key": torch.tensor(key, dtype=torch.int64), "entry": entry.cpu()}, file)
            os.replace(staging, self.path(key))
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
        self.writes += 1


def idle_forward(model: PreTrainedModel) -> None:
    """One token through the frozen LM, its output unused: what matters is that every sharded layer gathers its
    weights, as the busier ranks' forwards do (``fedlm.federation.sharding``)."""
    model.base_model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=model.device))


class PrefixCache:
    """The frozen LM's key/values of each distinct prefix, content-addressed by the prefix token ids.

    Entries are filled on first sight, so a process holds only the prefixes of the examples it has seen (in a
    federated run: its own clients' data plus the evaluation splits it scores). The backbone is frozen, so an entry
    never goes stale. Each entry is a (layers, 2, key/value heads, length, head dim) tensor in ``dtype``, over the
    whole prefix, or over what follows ``head`` for a prefix that starts with it (``head`` itself is stored once).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        dtype: Dtype = "fp32",
        head: tuple[int, ...] = (),
        store: str | Path | None = None,
        budget_bytes: int | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"model.cache.dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}.")
        if any(DynamicCache(config=model.config).is_sliding):
            raise ConfigError(
                "model.cache.prefix=true needs full attention in every layer, but this backbone has sliding-window "
                "layers; set model.cache.prefix=false."
            )
        self.model = model
        self.dtype = DTYPES[dtype]
        self.entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.budget_bytes = budget_bytes
        self.head = tuple(head)
        self.head_entry: torch.Tensor | None = None
        # of the whole LM where it is built (before any sharding): the store's folder, with the device's kind once
        # the LM has moved (_follow_device)
        self.fingerprint = backbone_fingerprint(model, self.dtype)
        self.device = model.device
        self.store = PrefixStore(store, self.fingerprint) if store is not None else None
        # A sharded LM's ranks (fedlm.federation.sharding): each forward is their collective, so every fill runs as
        # many forwards as the busiest of them does.
        self.lockstep: dist.ProcessGroup | None = None
        # Inference only (``fedlm predict``): fill a batch's new prefixes in one padded forward. Faster, but an entry's
        # bits then depend on its batch, which training and evaluation must not allow (``_fill``).
        self.batch_fill = False
        if self.store is not None:
            log.info("Prefix cache on disk: %s", self.store.folder)

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.head_entry = None
        self.nbytes = 0

    def starts_with_head(self, prefix: tuple[int, ...]) -> bool:
        return 0 < len(self.head) < len(prefix) and prefix[: len(self.head)] == self.head

    def past(self, prefixes: list[tuple[int, ...]]) -> tuple[DynamicCache, torch.Tensor]:
        """A fresh cache of the rows' prefix key/values, left-padded to the longest, and its (rows, longest) mask.

        Fresh on every call because the forward appends the suffix's key/values to it.
        """
        stacked, mask = self.stacked(prefixes)
        return DynamicCache([(layer[0], layer[1]) for layer in stacked], config=self.model.config), mask

    def stacked(self, prefixes: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' prefix key/values as one (layers, 2, rows, heads, longest, head dim) tensor in the model's
        dtype, left-padded with zeros, and its (rows, longest) mask: one padding call for the batch."""
        self._follow_device()
        self._fill([prefix for prefix in dict.fromkeys(prefixes) if prefix not in self.entries])
        whole = [self._whole(prefix).permute(3, 0, 1, 2, 4) for prefix in prefixes]  # (length, layers, 2, heads, dim)
        self._evict(prefixes)
        padded = pad_sequence(whole, batch_first=True, padding_side="left")  # (rows, longest, layers, 2, heads, dim)
        stacked = padded.permute(2, 3, 0, 4, 1, 5).to(self.model.dtype).contiguous()
        lengths = torch.tensor([len(prefix) for prefix in prefixes], device=self.model.device)
        longest = stacked.shape[4]
        mask = (torch.arange(longest, device=lengths.device) >= longest - lengths[:, None]).long()
        return stacked, mask

    def _evict(self, used: list[tuple[int, ...]]) -> None:
        """Mark the batch's entries recently used, then drop the least recently used past the budget (this batch's
        key/values are already gathered)."""
        for prefix in used:
            self.entries.move_to_end(prefix)
        while self.budget_bytes is not None and self.nbytes > self.budget_bytes and self.entries:
            _, entry = self.entries.popitem(last=False)
            self.nbytes -= entry.numel() * entry.element_size()

    def _whole(self, prefix: tuple[int, ...]) -> torch.Tensor:
        """A prefix's key/values over all of its tokens: its entry, after the head's if it starts with it."""
        if self.starts_with_head(prefix):
            return torch.cat([self.head_entry, self.entries[prefix]], dim=3)
        return self.entries[prefix]

    @torch.no_grad()
    def _fill(self, prefixes: list[tuple[int, ...]]) -> None:
        """Run the frozen LM over each new prefix on its own: after the head if it starts with it, else whole.

        One prefix per forward because a batch is not neutral to the last bit: beside other rows (padded or not), a
        prefix's key/values come out of kernels of another shape, which sum in another order. Alone, an entry depends
        on its own tokens only, so the cache's contents do not depend on which prefixes arrived together (a resumed
        run starts with an empty cache; another rank hosts other clients). Measured on SmolLM2, batching the fill
        saved less than the run-to-run noise of its time (results/reproducibility.md).
        """
        if self.batch_fill and prefixes:
            self._fill_batch(prefixes)
            return
        idle = self._owed_forwards(prefixes) if self.lockstep is not None else 0
        for prefix in prefixes:
            if self.starts_with_head(prefix):
                if self.head_entry is None:
                    self.head_entry = self._computed(self.head, self.head)  # the head alone is a whole prefix
                    self.nbytes += self.head_entry.numel() * self.head_entry.element_size()
                # -2 marks an entry computed after a head of this length: not the bits of the same tokens
                # computed whole.
                entry = self._computed((-2, len(self.head), *prefix), prefix[len(self.head) :], after_head=True)
            else:
                entry = self._computed(prefix, prefix)
            self.entries[prefix] = entry
            self.nbytes += entry.numel() * entry.element_size()
        for _ in range(idle):
            idle_forward(self.model)

    def _fill_batch(self, prefixes: list[tuple[int, ...]]) -> None:
        """The new prefixes in two padded forwards at most: those after the head (with its key/values as their past)
        and the others. Nothing is stored on disk: these bits are not the ones a one-at-a-time fill gives."""
        after = [prefix for prefix in prefixes if self.starts_with_head(prefix)]
        if after and self.head_entry is None:
            self.head_entry = self._forward(self.head)
            self.nbytes += self.head_entry.numel() * self.head_entry.element_size()
        whole = [prefix for prefix in prefixes if not self.starts_with_head(prefix)]
        for group, after_head in ((whole, False), (after, True)):
            if group:
                cut = len(self.head) if after_head else 0
                for prefix, entry in zip(group, self._forward_batch([p[cut:] for p in group], after_head)):
                    self.entries[prefix] = entry
                    self.nbytes += entry.numel() * entry.element_size()

    def _forward_batch(self, sequences: list[tuple[int, ...]], after_head: bool) -> list[torch.Tensor]:
        """``_forward`` of several sequences at once, left-padded, each with its own positions."""
        device, rows, longest = self.model.device, len(sequences), max(map(len, sequences))
        ids = torch.zeros((rows, longest), dtype=torch.long, device=device)
        mask = torch.zeros((rows, longest), dtype=torch.long, device=device)
        for row, sequence in enumerate(sequences):
            ids[row, longest - len(sequence) :] = torch.tensor(sequence, device=device)
            mask[row, longest - len(sequence) :] = 1
        cache = DynamicCache(config=self.model.config)
        if after_head:
            head = self.head_entry.to(self.model.dtype).unsqueeze(2).expand(-1, -1, rows, -1, -1, -1)
            cache = DynamicCache([(layer[0], layer[1]) for layer in head], config=self.model.config)
        skip = cache.get_seq_length()
        self.model.base_model(
            input_ids=ids,
            attention_mask=torch.cat([torch.ones((rows, skip), dtype=torch.long, device=device), mask], dim=1),
            position_ids=skip + (mask.cumsum(1) - 1).clamp(min=0),
            use_cache=True,
            **cache_argument(self.model, cache),
        )
        layers = torch.stack([torch.stack([keys[:, :, skip:], values[:, :, skip:]]) for keys, values, _ in cache])
        return [
            layers[:, :, row, :, longest - len(sequence) :].to(self.dtype).contiguous()
            for row, sequence in enumerate(sequences)
        ]

    def _follow_device(self) -> None:
        """Entries hold the bits of the device that computed them, and Lightning moves the LM to its device after
        this cache is built: on another device the cache starts over, with a store of that device's entries."""
        device = self.model.device
        if device == self.device:
            return
        self.device = device
        self.clear()
        if self.store is not None:
            self.store = PrefixStore(self.store.folder.parent, f"{self.fingerprint}-{device_kind(device)}")

    def join_fill(self) -> None:
        """Take part in the sharded ranks' fill without a batch (an idle evaluation step)."""
        self._follow_device()
        self._fill([])

    def _owed_forwards(self, prefixes: list[tuple[int, ...]]) -> int:
        """The forwards this rank's fill must add to its own to match the busiest rank of its lockstep group, agreed
        before any of them runs: a rank that asked while another still ran forwards would mismatch collectives."""
        keys = [(-2, len(self.head), *prefix) if self.starts_with_head(prefix) else prefix for prefix in prefixes]
        head = self.head_entry is None and any(map(self.starts_with_head, prefixes)) and not self._stored(self.head)
        own = sum(not self._stored(key) for key in keys) + int(head)
        most = torch.tensor([own], device=self.model.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.lockstep)
        return int(most.item()) - own

    def _stored(self, key: tuple[int, ...]) -> bool:
        return self.store is not None and self.store.path(key).is_file()

    def _computed(self, key: tuple[int, ...], sequence: tuple[int, ...], after_head: bool = False) -> torch.Tensor:
        """The entry of ``sequence``: read from the store if it has ``key``, else computed (and then stored)."""
        if self.store is None:
            return self._forward(sequence, after_head)
        entry = self.store.load(key)
        if entry is None:
            entry = self._forward(sequence, after_head)
            self.store.save(key, entry)
        return entry.to(self.model.device)

    def _forward(self, sequence: tuple[int, ...], after_head: bool = False) -> torch.Tensor:
        """One sequence's (layers, 2, heads, length, head dim) key/values; with ``after_head``, the head's are
        its past."""
        device = self.model.device
        ids = torch.tensor([sequence], dtype=torch.long, device=device)
        cache = DynamicCache(config=self.model.config)
        if after_head:
            head = self.head_entry.to(self.model.dtype).unsqueeze(2)
            cache = DynamicCache([(layer[0], layer[1]) for layer in head], config=self.model.config)
        skip = cache.get_seq_length()
        mask = torch.ones((1, skip + len(sequence)), dtype=torch.long, device=device)
        self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_argument(self.model, cache))
        return torch.stack([torch.stack([keys[0, :, skip:], values[0, :, skip:]]) for keys, values, _ in cache]).to(
            self.dtype
        )
