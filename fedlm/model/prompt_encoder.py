"""Prompt encoders: the only trainable part of fedlm, and the only thing federated clients exchange.

Each encoder maps a learned input table of shape (virtual tokens, hidden) to the virtual-token embeddings
fed to the frozen LM, plus a fixed ``table_offset`` (zero unless a federation averages tables instead of
parameters: then the offset moves a client's encoder output onto the global table at the start of a round). In
eval mode the output depends only on the parameters and the offset, so it is computed once and kept as the
*inference table* (a buffer, saved in checkpoints, so prediction needs no encoder). The table is recomputed
whenever the parameters or offset differ from those it was computed from, however they changed (optimizer step,
FedAvg, load_state_dict): mode flags are no signal, since Lightning restores ``.training`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from fedlm.errors import ConfigError

EncoderType = Literal["mlp", "lstm", "embedding"]


@dataclass
class PromptEncoderConfig:
    """The ``model.encoder:`` section: what produces the virtual-token embeddings.

    Args:
        type: ``mlp`` or ``lstm`` (P-tuning's reparameterizations of a learned input table), or ``embedding``
            (the table itself, as in prompt tuning).
        virtual_tokens: how many virtual tokens; a list gives one block per ``<|VIRTUAL_PROMPT_i|>`` marker.
        hidden_size: width of the MLP's hidden layers or of the LSTM.
        num_layers: mlp: linear layers; lstm: stacked LSTM layers.
        dropout: dropout inside the encoder while training (0: none).
        init_text: null: random input table; else the backbone's embeddings of this text, repeated to fill it.
            With ``deep``: the text whose key/values the slots start as (needed: random slots train badly).
        deep: per-layer key/value slots instead of input embeddings (P-tuning v2, prefix tuning;
            ``fedlm.model.slots``): ``virtual_tokens`` slots in every layer. ``embedding`` trains the slots directly;
            ``mlp`` and ``lstm`` produce them from a small input table, starting exactly at ``init_text``'s
            key/values. Where they sit is the template's virtual-token block: after cached text
            (``cache.prefix: true``, the fast layout) or before the text (P-tuning v2 as published).
    """

    type: EncoderType = "mlp"
    virtual_tokens: int | list[int] = 10
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.0
    init_text: str | None = None
    deep: bool = False

    @property
    def total_virtual_tokens(self) -> int:
        return self.virtual_tokens if isinstance(self.virtual_tokens, int) else sum(self.virtual_tokens)

    def validate(self) -> None:
        if self.type not in ("mlp", "lstm", "embedding"):
            raise ConfigError(f"model.encoder.type={self.type!r} is unknown; use 'mlp', 'lstm' or 'embedding'.")
        counts = [self.virtual_tokens] if isinstance(self.virtual_tokens, int) else self.virtual_tokens
        if not counts or any(n <= 0 for n in counts):
            raise ConfigError(f"model.encoder.virtual_tokens={self.virtual_tokens!r} must be positive (e.g. 10).")
        if self.hidden_size <= 0 or self.num_layers <= 0:
            raise ConfigError("model.encoder.hidden_size and model.encoder.num_layers must be positive.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.encoder.dropout={self.dropout} must be in [0, 1).")
        if self.deep and self.init_text is None:
            raise ConfigError(
                "model.encoder.deep=true starts the slots as the key/values of model.encoder.init_text (random slots "
                "train badly); set it, e.g. model.encoder.init_text: 'Classify the sentiment of this sentence'."
            )


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class PromptEncoder(nn.Module):
    def __init__(
        self, config: PromptEncoderConfig, embed_dim: int, init: torch.Tensor, start: torch.Tensor | None = None
    ) -> None:
        """``init`` is the (virtual tokens, input width) starting input table (random or from a text). ``start``, for
        an mlp or lstm whose output is wider than its input (deep slots), is where the output starts: the last
        layer starts at zero and ``start`` becomes the output's fixed offset, so training moves the slots from it."""
        super().__init__()
        self.config = config  # validated by the module that built it (PromptEncoderConfig.validate)
        self.input_table = nn.Parameter(init.detach().clone().float())
        out_dim = embed_dim if start is None else start.shape[1]
        if config.type == "mlp":
            hidden = [config.hidden_size] * (config.num_layers - 1)
            self.head: nn.Module = mlp([init.shape[1], *hidden, out_dim], config.dropout)
        elif config.type == "lstm":
            self.lstm = nn.LSTM(
                init.shape[1],
                config.hidden_size,
                num_layers=config.num_layers,
                dropout=config.dropout if config.num_layers > 1 else 0.0,
                bidirectional=True,
                batch_first=True,
            )
            self.head = mlp([2 * config.hidden_size, config.hidden_size, out_dim], config.dropout)
        output = self.input_table.data if config.type == "embedding" else torch.zeros(len(init), out_dim)
        self.register_buffer("table_offset", torch.zeros_like(output))
        self.register_buffer("inference_table", torch.zeros_like(output))
        if start is not None and config.type != "embedding":
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)
            self.table_offset.copy_(start)
        self._table_params: torch.Tensor | None = None  # the parameters the table was computed from
        self.register_load_state_dict_post_hook(_loaded_table_is_current)

    def compute(self) -> torch.Tensor:
        if self.config.type == "embedding":
            return self.input_table + self.table_offset
        x = self.input_table
        if self.config.type == "lstm":
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.head(x) + self.table_offset

    def forward(self) -> torch.Tensor:
        """The virtual-token embeddings, (virtual tokens, embed_dim)."""
        if self.training:
            return self.compute()
        self.refresh_table()
        return self.inference_table

    def _parameters_now(self) -> torch.Tensor:
        return torch.cat([parameters_to_vector(self.parameters()).detach(), self.table_offset.reshape(-1)])

    @torch.no_grad()
    def refresh_table(self) -> None:
        """Recompute the inference table (in eval mode: no dropout) unless the parameters and offset are unchanged."""
        params = self._parameters_now()
        if self._table_params is not None and torch.equal(params, self._table_params):
            return
        was_training = self.training
        self.eval()
        self.inference_table.copy_(self.compute())
        self.train(was_training)
        self._table_params = params

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self.refresh_table()  # a saved table always matches the saved parameters
        super()._save_to_state_dict(destination, prefix, keep_vars)


def _loaded_table_is_current(module: PromptEncoder, incompatible_keys: Any) -> None:
    """A loaded table was saved with the loaded parameters, so it is current: prediction needs no recomputation."""
    module._table_params = module._parameters_now()


def eval_table(encoder: PromptEncoder) -> torch.Tensor:
    """The encoder's output without dropout and without grad, whatever its mode: what a client sends."""
    encoder.refresh_table()
    return encoder.inference_table.detach().clone()


def initial_table(
    config: PromptEncoderConfig, embeddings: torch.Tensor, tokenize: Any, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random rows with the backbone embeddings' scale, or the embeddings of ``config.init_text`` repeated."""
    n = config.total_virtual_tokens
    embeddings = embeddings.detach().float()
    if config.init_text is None:
        return torch.randn(n, embeddings.shape[1], generator=generator) * embeddings.std()
    ids = tokenize(config.init_text)
    if not ids:
        raise ConfigError(f"model.encoder.init_text={config.init_text!r} tokenizes to nothing.")
    ids = (ids * (n // len(ids) + 1))[:n]
    return embeddings[torch.tensor(ids)].clone()
