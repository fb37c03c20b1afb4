"""What a client sends at a round boundary: its encoder's parameters or its virtual-token table, minus the
virtual tokens it keeps private.

- ``average: parameters`` (the default): the flat parameter vector. Private tokens are the last rows of the
  encoder's input table; the rest of the encoder (the MLP or LSTM that every row goes through) is shared.
- ``average: table``: the encoder's output, (virtual tokens, hidden), far smaller than the parameters. A round
  starts every client from the encoder's initial parameters plus a fixed offset that puts its output exactly on
  the global table, so local training moves the table from the global one as FedAvg would, with the encoder
  reparameterizing the update. Private tokens are the last rows of the table.

Either way the loop only ever sees vectors and a ``shared`` mask over them: the all-reduce carries ``vector[shared]``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from fedlm.errors import ConfigError
from fedlm.model.prompt_encoder import PromptEncoder, eval_table

Averaged = Literal["parameters", "table"]


class EncoderExchange:
    def __init__(self, encoder: PromptEncoder, average: Averaged, private_tokens: int) -> None:
        total = encoder.input_table.shape[0]
        if not 0 <= private_tokens < total:
            raise ConfigError(
                f"federation.private_tokens={private_tokens} must be between 0 and the encoder's virtual tokens "
                f"minus one ({total - 1}): at least one token has to be shared."
            )
        self.encoder, self.average = encoder, average
        self.initial_params = self.parameters()
        if average == "table":
            offset = encoder.table_offset.clone()
            encoder.table_offset.zero_()
            self.initial_output = eval_table(encoder)  # the initial parameters' table, without any offset
            encoder.table_offset.copy_(offset)
        self.shared = self._shared_mask(private_tokens)

    def _shared_mask(self, private_tokens: int) -> torch.Tensor:
        if self.average == "table":
            rows = torch.ones_like(self.encoder.inference_table, dtype=torch.bool)
            rows[rows.shape[0] - private_tokens :] = False
            return rows.reshape(-1)
        pieces = []
        for name, param in self.encoder.named_parameters():
            keep = torch.ones_like(param, dtype=torch.bool)
            if name == "input_table":
                keep[keep.shape[0] - private_tokens :] = False
            pieces.append(keep.reshape(-1))
        return torch.cat(pieces)

    def parameters(self) -> torch.Tensor:
        return parameters_to_vector(self.encoder.parameters()).detach().clone()

    def read(self) -> torch.Tensor:
        """The vector this encoder stands for (parameters, or its eval-mode table)."""
        return self.parameters() if self.average == "parameters" else eval_table(self.encoder).reshape(-1)

    @torch.no_grad()
    def write(self, vector: torch.Tensor) -> None:
        """Set the encoder so that ``read()`` gives ``vector`` (tables: up to float rounding of the offset)."""
        params = list(self.encoder.parameters())
        if self.average == "parameters":
            vector_to_parameters(vector.clone(), params)
            return
        vector_to_parameters(self.initial_params.clone(), params)
        self.encoder.table_offset.copy_(vector.view_as(self.initial_output) - self.initial_output)
