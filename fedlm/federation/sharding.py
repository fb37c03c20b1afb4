"""The frozen LM sharded over a client's ranks (``federation.shard_backbone``): FSDP2's ``fully_shard`` on each
decoder layer, over the client's own process group, so that a client of R ranks holds one copy of the LM instead of
R. The encoder is untouched: it still trains data-parallel inside the client and is averaged across clients.

What is sharded: every decoder layer (``model._no_split_modules``, the blocks transformers keeps whole), each
gathered for its forward and again for the backward that carries the encoder's gradient through it, then freed. The
token embeddings, final norm and LM head stay whole on every rank: fedlm calls them outside the layers' forward, and
they are a few percent of a large model (SmolLM2-135M: 21 %; a 7 B Llama: 4 %).

Every forward through a sharded layer is a collective of the client's ranks, so they must run the same forwards in
the same order: their training batches already come in lockstep (each rank takes its slice of the client's global
batch), evaluation pads the shorter ranks with empty batches that run an idle forward, and the prefix cache makes
every rank of a client compute as many new entries as the busiest (``PrefixCache.lockstep``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from fedlm.errors import ConfigError


@dataclass(frozen=True)
class ShardedBytes:
    """What this rank holds of the decoder layers' weights, and what they hold in all."""

    layers: int
    local: int
    whole: int


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The model's decoder layers: the modules transformers never splits across devices."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    # by the class's ancestry: fully_shard swaps a module's class for an FSDP subclass of it
    layers = [module for module in model.modules() if any(c.__name__ in kinds for c in type(module).__mro__)]
    if not layers:
        raise ConfigError(
            f"federation.shard_backbone: {type(model).__name__} names no decoder layer class (_no_split_modules), "
            "so fedlm cannot tell what to shard; use a transformers model that does, or shard_backbone: false."
        )
    return layers


def local_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole) of ``module``'s parameters, sharded or not."""
    local = whole = 0
    for param in module.parameters():
        size = param.element_size()
        local += (param.to_local() if isinstance(param, DTensor) else param).numel() * size
        whole += param.numel() * size
    return local, whole


def shard_backbone(model: PreTrainedModel, group: dist.ProcessGroup, device_type: str) -> ShardedBytes:
    """Shard ``model``'s decoder layers over ``group``, on ``device_type`` (the trainer's device: Lightning moves the
    module there only after the callbacks' setup, so ``model`` may still be on the CPU; fully_shard moves the layers
    to the mesh's device, the current CUDA device on GPUs)."""
    layers = decoder_layers(model)
    mesh = DeviceMesh.from_group(group, device_type)
    for layer in layers:
        # explicit, so that each layer, a root of its own, still frees its gathered weights after its forward
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    held = [local_bytes(layer) for layer in layers]
    return ShardedBytes(len(layers), sum(local for local, _ in held), sum(whole for _, whole in held))


def sharded_names(module: nn.Module) -> list[str]:
    """The names of ``module``'s sharded parameters."""
    return [name for name, param in module.named_parameters() if isinstance(param, DTensor)]
