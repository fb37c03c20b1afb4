"""Global versus personalized models, evaluated per client at the end of a federated run.

For each client, on its own held-out examples (``data.client_holdout``) and on the shared test set:
- ``global``: the final global model (private tokens, if any, at their initial values: what a new site gets);
- ``private``: split prompts, the global shared part with the client's own private tokens;
- ``finetuned``: the client's model (``private`` if it has private tokens, else ``global``) after
  ``federation.personalize_steps`` more local steps on its own training data.

Each client's lead rank evaluates its own clients in plain loops (no Lightning: nothing here is logged per step
or checkpointed); only the accuracies travel, as a float64 row per client (never pickled), to rank 0, which writes
``personalization.json`` and prints the table. The caller hands in the vectors to evaluate; the module is left
holding whichever was written last.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from fedlm.federation import wire
from fedlm.federation.exchange import EncoderExchange
from fedlm.seeding import derive_seed
from fedlm.tasks.outputs import gather_rows

MODELS = ("global", "private", "finetuned")  # in the order of the table; ties on held-out data go to the first


def move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


@torch.no_grad()
def accuracy(module: L.LightningModule, dataset: Dataset, batch_size: int) -> float:
    """Constrained label-word accuracy of the module's current encoder."""
    module.eval()
    correct = 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=module.task.template.collate):
        _, scores = module.task.loss_and_scores(module.lm, move(batch, module.device))
        correct += int((scores.argmax(-1).cpu() == batch["label"]).sum())
    return correct / len(dataset)


def finetune(module: L.LightningModule, dataset: Dataset, steps: int, batch_size: int, seed: int) -> None:
    """``steps`` AdamW steps (the module's lr and weight decay, fresh moments) on batches in a seeded order."""
    c = module.optimizer_config
    optimizer = torch.optim.AdamW(module.encoder.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    module.train()
    with torch.enable_grad():
        for _ in range(steps):
            if len(order) < batch_size:
                order += torch.randperm(len(dataset), generator=generator).tolist()
            batch = module.task.template.collate([dataset[i] for i in order[:batch_size]])
            order = order[batch_size:]
            loss = module.task.train_loss(module.lm, move(batch, module.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    module.eval()


def personalize(
    trainer: L.Trainer,
    module: L.LightningModule,
    exchange: EncoderExchange,
    models: dict[int, dict[str, torch.Tensor]],
    finetune_steps: int,
    seed: int,
    clients: int,
) -> list[dict[str, Any]] | None:
    """Evaluate ``models`` (per hosted client, on its lead rank: ``global`` and, with split prompts, ``private``),
    and the last of them fine-tuned ``finetune_steps`` steps; on rank 0, return the ``clients`` clients' results
    (each evaluated on one rank)."""
    datamodule = trainer.datamodule
    batch_size = datamodule.eval_batch_size
    test = datamodule.encoded("test")
    results = []
    for client, vectors in models.items():
        train, held = datamodule.client_data(client)
        row: dict[str, Any] = {"client": client, "holdout_examples": len(held), "train_examples": len(train)}

        def score(held: Dataset = held) -> dict[str, float]:
            return {"holdout_acc": accuracy(module, held, batch_size), "test_acc": accuracy(module, test, batch_size)}

        for name, vector in vectors.items():
            exchange.write(vector)
            row[name] = score()
        if finetune_steps > 0:
            exchange.write(list(vectors.values())[-1])
            finetune(module, train, finetune_steps, datamodule.batch_size, derive_seed("personalize", seed, client))
            row["finetuned"] = score()
        results.append(row)
    results = gather_results(results, clients)  # a collective: every rank takes part
    return results if trainer.is_global_zero else None


# -- a client's results as one float64 row, gathered as a tensor, never pickled ------------------------------------

COUNTS = ("client", "holdout_examples", "train_examples")
SPLITS = ("holdout_acc", "test_acc")
WIDTH = len(COUNTS) + len(MODELS) * len(SPLITS)  # every model's slots, NaN for those a run does not evaluate


def to_row(results: dict[str, Any]) -> torch.Tensor:
    scores = [results[name][split] if name in results else math.nan for name in MODELS for split in SPLITS]
    return torch.tensor([*(results[count] for count in COUNTS), *scores], dtype=torch.float64)


def from_row(row: torch.Tensor) -> dict[str, Any]:
    """A client's results, and the model that did best on its held-out data (ties: the first in ``MODELS``)."""
    results: dict[str, Any] = {count: int(value) for count, value in zip(COUNTS, row.tolist())}
    scores = row[len(COUNTS) :].view(len(MODELS), len(SPLITS)).tolist()
    for name, model_scores in zip(MODELS, scores):
        if not math.isnan(model_scores[0]):
            results[name] = dict(zip(SPLITS, model_scores))
    named = [name for name in MODELS if name in results]
    results["best_on_holdout"] = max(named, key=lambda name: results[name]["holdout_acc"])
    return results


def gather_results(results: list[dict[str, Any]], clients: int) -> list[dict[str, Any]]:
    """Every rank's results on every rank, by client: float64 rows through ``gather_rows`` (a tensor collective),
    checked on receipt for one row per client, so that every rank stops together if they are not."""
    local = torch.stack([to_row(r) for r in results]) if results else torch.zeros(0, WIDTH, dtype=torch.float64)
    gathered = gather_rows(local, clients)
    wire.check(gathered, (clients, WIDTH), torch.float64, "personalization results (a row per client)")
    return sorted(map(from_row, gathered), key=lambda row: row["client"])


def write_personalization(results: list[dict[str, Any]], folder: Path) -> str:
    """``personalization.json`` in the run's log folder, and the table as text (returned, for the log)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "personalization.json").write_text(json.dumps(results, indent=2) + "\n")
    named = [name for name in MODELS if name in results[0]]
    lines = [
        "client  held-out  " + "  ".join(f"{name + ' held-out/test':>24}" for name in named) + "  better on held-out"
    ]
    for row in results:
        cells = "  ".join(f"{row[name]['holdout_acc']:>11.3f} / {row[name]['test_acc']:.3f}      " for name in named)
        lines.append(f"{row['client']:>6}  {row['holdout_examples']:>8}  {cells}  {row['best_on_holdout']}")
    return "\n".join(lines)
