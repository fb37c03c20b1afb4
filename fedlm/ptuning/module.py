"""The p-tuning LightningModule: a frozen causal LM, a trainable prompt encoder, and the task it is adapted to.

The forward passes live in ``fedlm.model.prompted.PromptedLM``, the task (records to tokens, loss, scores and
metrics) in ``fedlm.tasks``; this class wires them into Lightning's steps, the optimizer, DP-SGD and checkpoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from transformers import DynamicCache

from fedlm.accounting import epsilon_after
from fedlm.errors import ConfigError, FedlmError
from fedlm.model.backbone import DEFAULT_BACKBONE, Dtype, load_backbone
from fedlm.model.prefix_cache import PrefixCache
from fedlm.model.prompt_encoder import PromptEncoder, PromptEncoderConfig, initial_table
from fedlm.model.prompted import Batch, PromptedLM
from fedlm.model.slots import initial_slots, slot_shape
from fedlm.model.template import PromptTemplate
from fedlm.ptuning.config import CacheConfig, OptimizerConfig
from fedlm.ptuning.dp_sgd import DPSGDConfig, private_gradients
from fedlm.ptuning.schedule import lr_factor
from fedlm.tasks import Task, TaskConfig, build_task

# The frozen backbone is in eval mode on purpose; Lightning's warning about it would only alarm users.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class CheckpointMismatchError(FedlmError, ValueError):
    """A checkpoint made for another backbone or encoder shape."""


class OldCheckpointError(CheckpointMismatchError):
    """A fedlm checkpoint from before the ``model.task``/``model.cache``/``model.optimizer`` sections."""


# top-level hyperparameters of checkpoints from before the sections (now under model.task, .cache and .optimizer)
FLAT_HYPERPARAMETERS = (
    "template", "label_words", "loss", "max_length", "calibrate", "cache_prefix", "cache_dtype", "cache_dir",
    "cache_budget_mb", "lr", "weight_decay", "warmup_steps", "lr_schedule", "final_lr_fraction",
)  # fmt: skip


def check_sectioned(hparams: Any, source: str = "the checkpoint") -> None:
    """Refuse the flat hyperparameters of a checkpoint written before ``model.task``, ``model.cache`` and
    ``model.optimizer`` existed: read as this version's, their template, label words and cache settings would be
    silently replaced by the defaults."""
    if not isinstance(hparams, Mapping) or "task" in hparams:
        return
    flat = [name for name in FLAT_HYPERPARAMETERS if name in hparams]
    if flat:
        raise OldCheckpointError(
            f"{source} is a fedlm checkpoint from before the model.task, model.cache and model.optimizer sections "
            f"(its hyperparameters are flat: {', '.join(flat[:4])}, ...), which this version cannot load. Re-train "
            "it with this version, or export it with the older fedlm version (`fedlm export CHECKPOINT --out DIR`): "
            "this version's `fedlm predict DIR` reads that export folder."
        )


def typed(kind: type, value: Any) -> Any:
    """A config section as its dataclass, whether it came as one, as a dict (a checkpoint's) or not at all."""
    return kind(**value) if isinstance(value, dict) else value or kind()


def check_deep_template(template: PromptTemplate, configured: str, cache_prefix: bool) -> None:
    """Deep slots are one block, with text after them (where the answer is read), and either cached text or
    nothing but the tokenizer's special tokens before them."""
    blocks = [i for i, piece in enumerate(template.pieces) if isinstance(piece, int)]
    if len(blocks) != 1 or blocks[0] == len(template.pieces) - 1:
        raise ConfigError(
            f"model.encoder.deep=true puts the slots at the template's one virtual-token block, with text after it; "
            f"model.task.template={configured!r} has {len(blocks)} block(s)"
            + ("" if len(blocks) != 1 else " and nothing after it")
            + ". Use e.g. '{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}'."
        )
    if blocks[0] > 0 and not cache_prefix:
        raise ConfigError(
            f"model.task.template={configured!r} puts text before the deep slots: set model.cache.prefix=true (that "
            "text then runs once per record), or start the template with the slots (P-tuning v2)."
        )


class PTuningModule(L.LightningModule):
    """P-tuning of a frozen causal LM for a text-to-text task (classification by label words, or generation).

    Args:
        backbone: hub id, local model directory, ``.gguf`` file, or ``smollm2-135m-instruct`` (offline default).
        dtype: dtype of the frozen backbone; the encoder always trains in fp32.
        task: what the model is adapted to do (``TaskConfig``: template, label words or generated answers, metrics).
        encoder: the prompt encoder's shape (``PromptEncoderConfig``).
        cache: the prefix cache (``CacheConfig``).
        optimizer: AdamW and its lr schedule (``OptimizerConfig``).
        compile: ``torch.compile`` the frozen transformer body (dynamic shapes). The first steps pay for the
            compilation; later ones gain a little on CPU (``results/speed.md``).
        dp_sgd: sample-level differential privacy of training (``DPSGDConfig``; null: none). The epsilon each
            client has spent is logged as ``dp_sgd/epsilon`` (the largest over this process's clients).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        dtype: Dtype = "fp32",
        task: TaskConfig | None = None,
        encoder: PromptEncoderConfig | None = None,
        cache: CacheConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        compile: bool = False,
        dp_sgd: DPSGDConfig | None = None,
    ) -> None:
        super().__init__()
        task, encoder = typed(TaskConfig, task), typed(PromptEncoderConfig, encoder)
        cache, optimizer = typed(CacheConfig, cache), typed(OptimizerConfig, optimizer)
        dp_sgd = DPSGDConfig(**dp_sgd) if isinstance(dp_sgd, dict) else dp_sgd
        for section in (task, encoder, cache, optimizer, dp_sgd):
            if section is not None:
                section.validate()
        if task.loss != "answer_tokens" and dp_sgd is not None:
            raise ConfigError(
                "model.dp_sgd clips per-example answer-token losses; set model.task.loss: answer_tokens with it."
            )
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "dtype": dtype,
                "task": asdict(task),
                "encoder": asdict(encoder),
                "cache": asdict(cache),
                "optimizer": asdict(optimizer),
                "compile": compile,
                "dp_sgd": asdict(dp_sgd) if dp_sgd else None,
            }
        )
        self.optimizer_config, self.dp_sgd = optimizer, dp_sgd

        loaded = load_backbone(backbone, dtype)
        self.backbone, self.backbone_source, self.tokenizer = loaded.model, loaded.source, loaded.tokenizer
        if compile:
            self.backbone.base_model.compile(dynamic=True)
        self.task: Task = build_task(task, loaded.tokenizer, encoder.virtual_tokens)
        template = self.task.template
        if encoder.deep:
            check_deep_template(template, task.template, cache.prefix)
            if any(DynamicCache(config=self.backbone.config).is_sliding):
                raise ConfigError(
                    "model.encoder.deep=true gives every layer the slots as past key/values, but this backbone has "
                    "sliding-window layers, which would drop them once the text is longer than the window; use a "
                    "backbone with full attention, or model.encoder.deep=false."
                )
        if cache.prefix and isinstance(template.pieces[0], int):
            raise ConfigError(
                f"model.cache.prefix=true caches the text before the first virtual token, but model.task.template="
                f"{task.template!r} starts with a virtual token, so there is nothing to cache. Put text first, e.g. "
                "'{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}', or set model.cache.prefix=false."
            )
        # Deep slots that come first still follow the tokenizer's special prefix (e.g. BOS), whose key/values are
        # constants like any cached text's: caching them keeps one path for both placements.
        cached = cache.prefix or (encoder.deep and bool(template.prefix_ids))
        budget = None if cache.budget_mb is None else int(cache.budget_mb * 2**20)
        self.prefix_cache = (
            PrefixCache(self.backbone, cache.dtype, template.fixed_head(), cache.dir, budget) if cached else None
        )
        self.encoder = self._encoder(encoder, template)
        self.lm = PromptedLM(self.backbone, self.encoder, self.prefix_cache, self.slot_shape)

    def _encoder(self, config: PromptEncoderConfig, template: PromptTemplate) -> PromptEncoder:
        """The encoder, starting from its input table (random or a text's embeddings) or, deep, a text's key/values."""
        embeddings = self.backbone.get_input_embeddings().weight
        table = initial_table(config, embeddings, template.tokenize)
        self.slot_shape = slot_shape(self.backbone) if config.deep else None
        start = None
        if config.deep:
            start = initial_slots(self.backbone, template.tokenize(config.init_text), config.total_virtual_tokens)
            table, start = (start, None) if config.type == "embedding" else (table, start)
        return PromptEncoder(config, embeddings.shape[1], table, start)

    # -- the frozen backbone -------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> PTuningModule:
        super().train(mode)
        self.backbone.eval()  # dropout and similar stay off in the frozen LM
        return self

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "connect"):
            datamodule.connect(self.task, "independent" if self.dp_sgd is not None else "shuffle")

    # -- training ------------------------------------------------------------------------------------------

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if len(batch["label"]) == 0:
            # An idle step: this rank's clients are done for the round, but Lightning needs every rank to run the
            # same steps (it cannot skip one in distributed training). A loss tied to no parameter: no gradient,
            # so the optimizer leaves every parameter and its state alone.
            return torch.zeros((), device=self.device, requires_grad=True)
        loss = self.task.train_loss(self.lm, batch) if self.dp_sgd is None else self.dp_sgd_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def dp_sgd_loss(self, batch: Batch) -> torch.Tensor:
        """DP-SGD: the batch's mean per-example loss in value, with the noisy clipped mean gradient as its gradient
        (so that Lightning's optimizer step, FedProx and gradient clipping apply to the private gradient)."""
        table = self.encoder()
        size = len(batch["label"])
        copies = table.detach().unsqueeze(0).repeat(size, 1, 1).requires_grad_(True)
        losses = self.lm.example_losses(batch, copies)
        (table_grads,) = torch.autograd.grad(losses.sum(), copies)
        data = getattr(self._trainer, "datamodule", None)  # none outside a Trainer: the batch is the expected size
        ranks = getattr(data, "ranks_per_client", 1)
        # This rank's slice over its own expected size: FederatedLoop then averages over the client's ranks, which
        # makes the noisy clipped sum of the whole client batch over that batch's size (dividing by the whole batch
        # here as well would shrink the gradient by the rank count again, against FedProx's pull and clipping).
        expected = getattr(data, "batch_size", size)
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        grads = private_gradients(
            self.encoder, table, table_grads, self.dp_sgd, expected, 1 / ranks, (self.global_step, self.global_rank)
        )
        surrogate = sum((p * g).sum() for p, g in zip(params, grads))
        return losses.mean().detach() + surrogate - surrogate.detach()

    def dp_sgd_epsilon(self) -> float:
        """The largest epsilon any client of this process has spent: each accounts for its own examples and steps."""
        data, c = self.trainer.datamodule, self.dp_sgd
        batch = data.batch_size * data.ranks_per_client
        if data.blocks:  # federated: block.steps local steps per round on the client's own examples
            spent = [(block.steps * (self.current_epoch + 1), len(block.indices)) for block in data.blocks]
        else:
            spent = [(self.global_step, len(data.encoded("train")))]
        return max(epsilon_after(steps, c.noise_multiplier, batch, size, c.delta) for steps, size in spent)

    def on_train_epoch_end(self) -> None:
        self._log_cache_size()
        if self.dp_sgd is not None:
            self.log("dp_sgd/epsilon", self.dp_sgd_epsilon(), sync_dist=True, reduce_fx="max")

    def _log_cache_size(self) -> None:
        """This process's prefix cache (in a federated run: its own clients' and evaluation prefixes)."""
        if self.prefix_cache is not None:
            self.log("cache/bytes", float(self.prefix_cache.nbytes))
            self.log("cache/entries", float(len(self.prefix_cache)))

    # -- evaluation ----------------------------------------------------------------------------------------

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Batch, split: str) -> None:
        if len(batch["label"]) == 0:  # a rank past its share of the evaluation
            self.task.idle_eval_step(self.lm, split)
            return
        loss, logged = self.task.eval_step(self.lm, batch, split)
        size = len(batch["label"])
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        self.log_dict(logged, prog_bar=True, batch_size=size)

    def generates(self, split: str) -> bool:
        """Whether this evaluation decodes: generative tasks at test, and every ``generate_every`` rounds."""
        every = self.task.config.generate_every
        if split == "test":
            return True
        return bool(every) and not self.trainer.sanity_checking and (self.current_epoch + 1) % every == 0

    def on_validation_epoch_start(self) -> None:
        self.task.start_evaluation("val", self.generates("val"))

    def on_test_epoch_start(self) -> None:
        self.task.start_evaluation("test", self.generates("test"))

    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    def _end_evaluation(self, split: str) -> None:
        """The task's epoch metrics, the same on every rank (gathered, so logged without a further reduction)."""
        records = [example.fields for example in self.trainer.datamodule.examples(split)]
        fit = split == "val" and self.task.config.calibrate is not None and not self.trainer.sanity_checking
        for name, value in self.task.end_evaluation(split, records, fit).items():
            self.log(name, value, reduce_fx="sum" if "/confusion/" in name else "mean")
        self._log_cache_size()

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        return self.task.predict(self.lm, batch)

    # -- optimizer -----------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        c = self.optimizer_config
        optimizer = torch.optim.AdamW(self.encoder.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        total = self.schedule_horizon()
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, c.warmup_steps, total, c.lr_schedule, c.final_lr_fraction)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def schedule_horizon(self) -> int:
        """The optimizer steps the lr schedule spans: the fit's steps, or in a federated run one client's steps over all
        rounds (each client steps its own optimizer and scheduler)."""
        blocks = getattr(self.trainer.datamodule, "blocks", None)
        if not blocks:
            return int(self.trainer.estimated_stepping_batches)
        steps = {block.steps for block in blocks}
        if len(steps) > 1 and self.optimizer_config.lr_schedule != "constant":
            raise ConfigError(
                f"model.optimizer.lr_schedule={self.optimizer_config.lr_schedule!r} decays over a client's steps, but "
                f"the clients this process simulates take different numbers of local steps ({sorted(steps)}, from "
                "federation.local_epochs); set federation.local_steps, or run one process per client (torchrun), or "
                "model.optimizer.lr_schedule: constant."
            )
        return self.trainer.max_epochs * steps.pop()

    # -- checkpoints: encoder, inference table and hyperparameters; never the frozen LM ---------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("backbone.")}
        checkpoint["fedlm"] = {
            "backbone": self.backbone_source,
            "embed_dim": self.encoder.input_table.shape[1],
            "architecture": self.architecture(),
        }

    def architecture(self) -> dict[str, Any]:
        """What identifies the frozen LM a prompt was trained for, wherever its files are."""
        config = self.backbone.config
        return {
            "model_type": config.model_type,
            "layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size,
            "tokenizer_vocab": len(self.tokenizer),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("fedlm")
        if saved is None:
            raise CheckpointMismatchError("this checkpoint was not written by fedlm (no 'fedlm' entry).")
        check_sectioned(checkpoint.get("hyper_parameters"))
        if saved["embed_dim"] != self.encoder.input_table.shape[1]:
            raise CheckpointMismatchError(
                f"the checkpoint was trained on backbone {saved['backbone']!r} (embedding size {saved['embed_dim']}), "
                f"but model.backbone={self.backbone_source!r} has embedding size {self.encoder.input_table.shape[1]}; "
                "set model.backbone to the checkpoint's backbone."
            )
        if saved.get("architecture", self.architecture()) != self.architecture():
            raise CheckpointMismatchError(
                f"the checkpoint was trained on backbone {saved['backbone']!r} ({saved['architecture']}), but "
                f"model.backbone={self.backbone_source!r} is another model ({self.architecture()}): its prompt would "
                "mean nothing here. Set model.backbone to the checkpoint's backbone."
            )
        state = checkpoint["state_dict"]
        # checkpoints from before table averaging have no offset: it was zero
        state.setdefault("encoder.table_offset", torch.zeros_like(self.encoder.table_offset))
        own = self.encoder.state_dict()
        for key, value in state.items():
            name = key.removeprefix("encoder.")
            if key.startswith("encoder.") and (name not in own or own[name].shape != value.shape):
                raise CheckpointMismatchError(
                    f"checkpoint tensor {key} {tuple(value.shape)} does not fit this model's encoder "
                    f"({tuple(own[name].shape) if name in own else 'absent'}); set model.encoder to the values "
                    "the checkpoint was trained with (see its hyper_parameters)."
                )
        # The frozen LM is not stored; put the loaded one back so that strict loading still checks the rest.
        state.update({"backbone." + k: v for k, v in self.backbone.state_dict().items()})
