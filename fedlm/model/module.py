"""The p-tuning LightningModule: a frozen causal LM and a trainable prompt encoder."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
from transformers import DynamicCache

from fedlm.accounting import epsilon_after
from fedlm.errors import ConfigError, FedlmError
from fedlm.model.backbone import DEFAULT_BACKBONE, Dtype, load_backbone
from fedlm.model.calibration import OBJECTIVES, Objective, fit_label_biases, split_half
from fedlm.model.dp_sgd import DPSGDConfig, private_gradients
from fedlm.model.prefix_cache import PrefixCache, idle_forward, split_at_first_virtual
from fedlm.model.prompt_encoder import PromptEncoder, PromptEncoderConfig, initial_table
from fedlm.model.schedule import Schedule, lr_factor
from fedlm.model.slots import SlotPast, SlotShape, initial_slots, run_after_slots, slot_key_values, slot_shape
from fedlm.model.template import FPB_LABEL_WORDS, FPB_TEMPLATE, IGNORE_INDEX, PromptTemplate

Loss = Literal["answer_tokens", "label_words"]

# The frozen backbone is in eval mode on purpose; Lightning's warning about it would only alarm users.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class CheckpointMismatchError(FedlmError, ValueError):
    """A checkpoint made for another backbone or encoder shape."""


def without_last_column(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-token tensors of a right-padded batch minus their last column, which predicts nothing."""
    per_token = ("input_ids", "virtual_index", "attention_mask", "position_ids")
    return {name: batch[name][:, :-1] for name in per_token if name in batch}


def check_deep_template(template: PromptTemplate, configured: str, cache_prefix: bool) -> None:
    """Deep slots are one block, with text after them (where the label is read), and either cached text or
    nothing but the tokenizer's special tokens before them."""
    blocks = [i for i, piece in enumerate(template.pieces) if isinstance(piece, int)]
    if len(blocks) != 1 or blocks[0] == len(template.pieces) - 1:
        raise ConfigError(
            f"model.encoder.deep=true puts the slots at the template's one virtual-token block, with text after it; "
            f"model.template={configured!r} has {len(blocks)} block(s)"
            + ("" if len(blocks) != 1 else " and nothing after it")
            + ". Use e.g. '{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}'."
        )
    if blocks[0] > 0 and not cache_prefix:
        raise ConfigError(
            f"model.template={configured!r} puts text before the deep slots: set model.cache_prefix=true (that text "
            "then runs once per sentence), or start the template with the slots (P-tuning v2)."
        )


class PTuningModule(L.LightningModule):
    """P-tuning of a frozen causal LM for text classification by scoring label words.

    Args:
        backbone: hub id, local model directory, ``.gguf`` file, or ``smollm2-135m-instruct`` (offline default).
        dtype: dtype of the frozen backbone; the encoder always trains in fp32.
        template: where virtual tokens, ``{sentence}`` and ``{label}`` go.
        label_words: class name -> the text the model should produce after the prompt.
        encoder: the prompt encoder's shape.
        lr, weight_decay: AdamW on the encoder.
        warmup_steps, lr_schedule, final_lr_fraction: the lr warms up linearly over ``warmup_steps``, then stays
            (``constant``) or decays (``cosine``, ``linear``) to ``final_lr_fraction * lr`` at the last step. The
            horizon is the optimizer's steps in the run: in a federated run, a client's own steps over all rounds
            (``rounds x local steps``), so in round r (from 0) its local step j is step ``r * local_steps + j``.
        loss: what training minimizes: ``answer_tokens``, the cross-entropy of the gold answer's tokens over the
            whole vocabulary, or ``label_words``, the cross-entropy over the classes' scores (a softmax over the label
            words only; needs one-token label words).
        max_length: longest sequence in tokens; longer sentences are truncated.
        cache_prefix: compute the frozen LM's key/values of the text before the first virtual token once per
            distinct prefix and run forward/backward over the rest only (exact; needs a template that starts with
            text, e.g. ``"{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}"``).
        cache_dtype: storage dtype of the cached key/values; bf16 halves the memory at a small loss of precision.
        cache_dir: also keep the cached key/values in this folder (null: in memory only), so that later runs on the
            same backbone read them instead of running the LM over their sentences again (about 1.4 MiB a sentence for
            SmolLM2 in fp32). Entries are keyed by the backbone's weights, dtype and the torch build and thread count,
            so a run gives the same bits with or without them. They are derived from the data: keep them private.
        cache_budget_mb: how much memory the prefix cache may hold (null: no limit). Past it the least recently used
            entries are dropped, and read back from ``cache_dir`` or computed again when a sentence comes back: the
            same bits, so only the time changes.
        compile: ``torch.compile`` the frozen transformer body (dynamic shapes). The first steps pay for the
            compilation; later ones gain a little on CPU (``results/speed.md``).
        calibrate: label calibration (``accuracy`` or ``macro_f1``; null: none). After every validation one additive
            bias per class is fitted to the validation scores, maximizing that objective, and kept in the checkpoint
            (``label_bias``): test, predict and export then report both the raw and the calibrated predictions. Each
            validation also logs what the biases are worth on sentences they were not fitted on (split halves).
        dp_sgd: sample-level differential privacy of training (``DPSGDConfig``; null: none). The epsilon each
            client has spent is logged as ``dp_sgd/epsilon`` (the largest over this process's clients).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        dtype: Dtype = "fp32",
        template: str = FPB_TEMPLATE,
        label_words: dict[str, str] | None = None,
        encoder: PromptEncoderConfig | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Schedule = "constant",
        final_lr_fraction: float = 0.0,
        loss: Loss = "answer_tokens",
        max_length: int = 512,
        cache_prefix: bool = False,
        cache_dtype: Dtype = "fp32",
        cache_dir: str | None = None,
        cache_budget_mb: float | None = None,
        compile: bool = False,
        calibrate: Objective | None = None,
        dp_sgd: DPSGDConfig | None = None,
    ) -> None:
        super().__init__()
        encoder = PromptEncoderConfig(**encoder) if isinstance(encoder, dict) else encoder or PromptEncoderConfig()
        encoder.validate()
        label_words = dict(label_words or FPB_LABEL_WORDS)
        dp_sgd = DPSGDConfig(**dp_sgd) if isinstance(dp_sgd, dict) else dp_sgd
        if dp_sgd is not None:
            dp_sgd.validate()
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "dtype": dtype,
                "template": template,
                "label_words": label_words,
                "encoder": asdict(encoder),
                "lr": lr,
                "weight_decay": weight_decay,
                "warmup_steps": warmup_steps,
                "lr_schedule": lr_schedule,
                "final_lr_fraction": final_lr_fraction,
                "loss": loss,
                "max_length": max_length,
                "cache_prefix": cache_prefix,
                "cache_dtype": cache_dtype,
                "cache_dir": cache_dir,
                "cache_budget_mb": cache_budget_mb,
                "compile": compile,
                "calibrate": calibrate,
                "dp_sgd": asdict(dp_sgd) if dp_sgd else None,
            }
        )
        self.dp_sgd = dp_sgd
        if lr_schedule not in ("constant", "cosine", "linear"):
            raise ConfigError(f"model.lr_schedule={lr_schedule!r} is unknown; use 'constant', 'cosine' or 'linear'.")
        if not 0.0 <= final_lr_fraction <= 1.0:
            raise ConfigError(
                f"model.final_lr_fraction={final_lr_fraction} must be in [0, 1] (a fraction of model.lr)."
            )
        if warmup_steps < 0:
            raise ConfigError(f"model.warmup_steps={warmup_steps} must be >= 0.")
        if loss not in ("answer_tokens", "label_words"):
            raise ConfigError(f"model.loss={loss!r} is unknown; use 'answer_tokens' or 'label_words'.")
        if loss != "answer_tokens" and dp_sgd is not None:
            raise ConfigError(
                "model.dp_sgd clips per-example answer-token losses; set model.loss: answer_tokens with it."
            )
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.lr_schedule, self.final_lr_fraction, self.loss = lr_schedule, final_lr_fraction, loss
        if calibrate is not None and calibrate not in OBJECTIVES:
            raise ConfigError(f"model.calibrate={calibrate!r} is unknown; use one of {OBJECTIVES} or null.")
        self.calibrate = calibrate

        loaded = load_backbone(backbone, dtype)
        self.backbone = loaded.model
        self.backbone_source = loaded.source
        self.tokenizer = loaded.tokenizer
        if compile:
            self.backbone.base_model.compile(dynamic=True)
        self.template = PromptTemplate(template, loaded.tokenizer, encoder.virtual_tokens, label_words, max_length)
        if loss == "label_words" and not self.template.single_token_answers:
            raise ConfigError(
                "model.loss=label_words scores each class by its label word's one token, but some of model.label_words "
                f"{label_words} take several tokens with this tokenizer; pick one-token words or "
                "model.loss=answer_tokens."
            )
        if encoder.deep:
            check_deep_template(self.template, template, cache_prefix)
            if any(DynamicCache(config=self.backbone.config).is_sliding):
                raise ConfigError(
                    "model.encoder.deep=true gives every layer the slots as past key/values, but this backbone has "
                    "sliding-window layers, which would drop them once the text is longer than the window; use a "
                    "backbone with full attention, or model.encoder.deep=false."
                )
        if cache_prefix and isinstance(self.template.pieces[0], int):
            raise ConfigError(
                f"model.cache_prefix=true caches the text before the first virtual token, but model.template="
                f"{template!r} starts with a virtual token, so there is nothing to cache. Put text first, e.g. "
                "'{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}', or set model.cache_prefix=false."
            )
        if cache_dir is not None and not cache_prefix:
            raise ConfigError(
                f"model.cache_dir={cache_dir!r} stores the prefix cache, which is off; set model.cache_prefix=true."
            )
        if cache_budget_mb is not None and (not cache_prefix or cache_budget_mb < 0):
            raise ConfigError(
                f"model.cache_budget_mb={cache_budget_mb} bounds the prefix cache: it must be >= 0, with "
                "model.cache_prefix=true."
            )
        # Deep slots that come first still follow the tokenizer's special prefix (e.g. BOS), whose key/values are
        # constants like any cached text's: caching them keeps one path for both placements.
        cached = cache_prefix or (encoder.deep and bool(self.template.prefix_ids))
        budget = None if cache_budget_mb is None else int(cache_budget_mb * 2**20)
        self.prefix_cache = (
            PrefixCache(self.backbone, cache_dtype, self.template.fixed_head(), cache_dir, budget) if cached else None
        )
        embeddings = self.backbone.get_input_embeddings().weight
        tokenize = lambda text: loaded.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        table = initial_table(encoder, embeddings, tokenize)
        self.slot_shape: SlotShape | None = None
        start = None
        if encoder.deep:
            self.slot_shape = slot_shape(self.backbone)
            start = initial_slots(self.backbone, tokenize(encoder.init_text), encoder.total_virtual_tokens)
            table, start = (start, None) if encoder.type == "embedding" else (table, start)
        self.encoder = PromptEncoder(encoder, embeddings.shape[1], table, start)

        num_classes = len(label_words)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.val_metrics, self.test_metrics = metrics.clone(prefix="val/"), metrics.clone(prefix="test/")
        self.test_calibrated_metrics = metrics.clone(prefix="test/calibrated/")
        # Zero until a validation fits it; float64 so that a fitted midpoint between two scores stays between them.
        self.register_buffer("label_bias", torch.zeros(num_classes, dtype=torch.float64))
        self.eval_outputs: list[torch.Tensor] = []  # (examples, 1 + classes): label, then the class scores
        self.val_class_f1, self.test_class_f1 = (MulticlassF1Score(num_classes, average=None) for _ in range(2))
        self.val_confusion, self.test_confusion = (MulticlassConfusionMatrix(num_classes) for _ in range(2))

    # -- the frozen backbone -------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> PTuningModule:
        super().train(mode)
        self.backbone.eval()  # dropout and similar stay off in the frozen LM
        return self

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "connect"):
            datamodule.connect(self.template, "independent" if self.dp_sgd is not None else "shuffle")

    # -- forward -------------------------------------------------------------------------------------------

    def input_embeddings(self, batch: dict[str, torch.Tensor], tables: torch.Tensor | None = None) -> torch.Tensor:
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

    def hidden_states(
        self, batch: dict[str, torch.Tensor], tables: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Last hidden states and the batch they align with: the batch itself, or its suffixes if the prefix is cached.

        The base model without the LM head: logits are needed only at a few positions. The last column is not fed:
        position t predicts token t + 1, so nothing reads the hidden state of the final one (in the cached layout,
        whose suffixes all have one length, that is each row's last answer token: one position in 13 saved).
        """
        if self.slot_shape is not None:
            return self.deep_hidden_states(batch, tables)
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
            past_key_values=past,
            use_cache=True,
        )
        return out.last_hidden_state, suffix

    def deep_hidden_states(
        self, batch: dict[str, torch.Tensor], tables: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Deep prompts: every layer attends to the prefix (cached text, or only the tokenizer's special tokens) and
        the slots (``fedlm.model.slots``), and only what follows the slots runs through the frozen LM."""
        prefixes, suffix = split_at_first_virtual(batch)
        slots = self.encoder.config.total_virtual_tokens
        rest = {name: tensor[:, slots:] for name, tensor in suffix.items() if tensor.dim() == 2}
        rest.update(label=suffix["label"], prompt_length=suffix["prompt_length"] - slots)
        table = self.encoder() if tables is None else tables
        prefix, prefix_mask = self.prefix_cache.stacked(prefixes) if self.prefix_cache is not None else (None, None)
        inputs = without_last_column(rest)
        past = SlotPast(
            prefix=prefix,
            prefix_mask=None if prefix_mask is None else prefix_mask.bool(),
            slots=slot_key_values(table.to(self.backbone.dtype), self.slot_shape),
            running_mask=inputs["attention_mask"].bool(),
        )
        embeds = self.backbone.get_input_embeddings()(inputs["input_ids"])
        return run_after_slots(self.backbone, embeds, inputs["position_ids"], past), rest

    def answer_log_probs(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the answer tokens (flattened) and the batch row each belongs to.

        ``hidden`` holds every column of ``targets`` but the last (see ``hidden_states``).
        """
        targets = targets[:, 1:]
        predicts_answer = targets != IGNORE_INDEX  # position t predicts token t+1
        logits = self.backbone.get_output_embeddings()(hidden[predicts_answer]).float()
        token_log_probs = -F.cross_entropy(logits, targets[predicts_answer], reduction="none")
        return token_log_probs, predicts_answer.nonzero()[:, 0]

    def loss_and_scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss training minimizes (``model.loss``), and the (batch, classes) log-probability of each label word.

        Classification is constrained scoring: the label word with the highest log-probability wins.
        """
        hidden, aligned = self.hidden_states(batch)
        loss = None if self.loss == "label_words" else -self.answer_log_probs(hidden, aligned["targets"])[0].mean()
        if self.template.single_token_answers:
            # Every label word is one token: the gold pass already holds all of their scores.
            log_probs = F.log_softmax(self.last_prompt_logits(hidden, aligned), dim=-1)
            scores = log_probs[:, [answer[0] for answer in self.template.answers]]
            if loss is None:  # the softmax over the scores is the one over the label words' logits: train_loss's
                loss = F.cross_entropy(scores, aligned["label"])
            return loss, scores
        candidates = {k: v.to(self.device) for k, v in self.template.candidates(batch).items()}
        hidden, aligned = self.hidden_states(candidates)
        token_log_probs, rows = self.answer_log_probs(hidden, aligned["targets"])
        totals = torch.zeros(len(candidates["label"]), device=self.device).index_add_(0, rows, token_log_probs)
        return loss, totals.view(-1, len(self.template.answers))

    # -- Lightning steps -----------------------------------------------------------------------------------

    def train_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What training minimizes: the mean answer-token loss of the gold labels, or the cross-entropy over the
        label words' scores (``model.loss``)."""
        hidden, aligned = self.hidden_states(batch)
        if self.loss == "answer_tokens":
            return -self.answer_log_probs(hidden, aligned["targets"])[0].mean()
        # The classes' logits, as scoring reads them: the softmax over them is the one over their log-probabilities.
        logits = self.last_prompt_logits(hidden, aligned)[:, [answer[0] for answer in self.template.answers]]
        return F.cross_entropy(logits, aligned["label"])

    def last_prompt_logits(self, hidden: torch.Tensor, aligned: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's full-vocabulary logits after its prompt: where a one-token label word is read."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.backbone.get_output_embeddings()(hidden[rows, aligned["prompt_length"] - 1]).float()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if len(batch["label"]) == 0:
            # An idle step: this rank's clients are done for the round, but Lightning needs every rank to run the
            # same steps (it cannot skip one in distributed training). A loss tied to no parameter: no gradient,
            # so the optimizer leaves every parameter and its state alone.
            return torch.zeros((), device=self.device, requires_grad=True)
        loss = self.train_loss(batch) if self.dp_sgd is None else self.dp_sgd_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def dp_sgd_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """DP-SGD: the batch's mean per-example loss in value, with the noisy clipped mean gradient as its gradient
        (so that Lightning's optimizer step, FedProx and gradient clipping apply to the private gradient)."""
        table = self.encoder()
        size = len(batch["label"])
        copies = table.detach().unsqueeze(0).repeat(size, 1, 1).requires_grad_(True)
        hidden, aligned = self.hidden_states(batch, copies)
        token_log_probs, rows = self.answer_log_probs(hidden, aligned["targets"])
        sums = torch.zeros(size, device=self.device).index_add_(0, rows, -token_log_probs)
        counts = torch.zeros(size, device=self.device).index_add_(0, rows, torch.ones_like(token_log_probs))
        losses = sums / counts
        (table_grads,) = torch.autograd.grad(losses.sum(), copies)
        data = getattr(self._trainer, "datamodule", None)  # none outside a Trainer: the batch is the expected size
        ranks = getattr(data, "ranks_per_client", 1)
        expected = getattr(data, "batch_size", size) * ranks
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

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, torch.Tensor], split: str) -> None:
        if len(batch["label"]) == 0:  # a rank past its share of the evaluation
            self.idle_evaluation()
            return
        loss, scores = self.loss_and_scores(batch)
        preds, labels = scores.argmax(-1), batch["label"]
        metrics = getattr(self, f"{split}_metrics")
        metrics.update(preds, labels)
        getattr(self, f"{split}_class_f1").update(preds, labels)
        getattr(self, f"{split}_confusion").update(preds, labels)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=len(labels), sync_dist=True)
        self.log_dict(metrics, prog_bar=True, batch_size=len(labels))
        if split == "test" and self.calibrate is not None:
            self.test_calibrated_metrics.update(self.calibrated_scores(scores).argmax(-1), labels)
            self.log_dict(self.test_calibrated_metrics, batch_size=len(labels))
        self.eval_outputs.append(torch.cat([labels[:, None].double(), scores.double()], dim=1).cpu())

    @torch.no_grad()
    def idle_evaluation(self) -> None:
        """What an evaluation batch runs through the frozen LM (a prefix fill and a forward per pass), on one token.

        A rank whose share of the evaluation ended runs these while the others score their last batch: with the LM
        sharded (``federation.shard_backbone``), every forward is a collective of the client's ranks.
        """
        for _ in range(1 if self.template.single_token_answers else 2):  # multi-token answers: gold, then candidates
            if self.prefix_cache is not None:
                self.prefix_cache.join_fill()
            idle_forward(self.backbone)

    def calibrated_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The label scores plus the fitted per-class biases (unchanged while there are none)."""
        return scores.double() + self.label_bias if bool(self.label_bias.any()) else scores

    def on_validation_epoch_start(self) -> None:
        self._reset_per_class("val")
        self.eval_outputs = []

    def on_test_epoch_start(self) -> None:
        self._reset_per_class("test")
        self.eval_outputs = []

    def evaluated(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gold class and label scores of each of the ``size`` examples of the last validation or test, in dataset
        order.

        A collective under torch.distributed: rank ``r`` evaluated examples ``r, r + W, ...`` (padding, if a
        sampler added any, comes last and is cut off), so the ranks' rows interleave back into dataset order.
        """
        width = 1 + len(self.template.answers)
        local = torch.cat(self.eval_outputs) if self.eval_outputs else torch.zeros(0, width, dtype=torch.float64)
        shards = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shards = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shards, local)
        longest = max(len(shard) for shard in shards)
        ordered = [shard[j] for j in range(longest) for shard in shards if j < len(shard)][:size]
        rows = torch.stack(ordered) if ordered else torch.zeros(0, width, dtype=torch.float64)
        return rows[:, 0].long(), rows[:, 1:]

    def test_predictions(self, size: int) -> dict[str, list[int]]:
        """Gold, predicted and (with calibration) calibrated class of each test example of the last test.
        A collective."""
        labels, scores = self.evaluated(size)
        predictions = {"label": labels.tolist(), "predicted": scores.argmax(-1).tolist()}
        if self.calibrate is not None:
            predictions["predicted_calibrated"] = self.calibrated_scores(scores).argmax(-1).tolist()
        return predictions

    def fit_calibration(self) -> None:
        """Fit the label biases to the last validation's scores (every rank alike), and log what they are worth on the
        half of the validation set they were not fitted on."""
        labels, scores = self.evaluated(len(self.trainer.datamodule.encoded("val")))  # a collective
        self.label_bias.copy_(fit_label_biases(scores, labels, self.calibrate))
        raw, calibrated = split_half(scores, labels, self.calibrate)
        self.log(f"val/calibration/halves_raw_{self.calibrate}", raw)
        self.log(f"val/calibration/halves_calibrated_{self.calibrate}", calibrated)
        for name, bias in zip(self.template.label_names, self.label_bias.tolist()):
            self.log(f"val/calibration/bias_{name}", bias)

    def _reset_per_class(self, split: str) -> None:
        # Reset here, not after logging: state made under `validate`'s inference mode could not be updated by
        # fit's validation (no-grad mode) later.
        getattr(self, f"{split}_class_f1").reset()
        getattr(self, f"{split}_confusion").reset()

    def on_validation_epoch_end(self) -> None:
        self._log_per_class("val")
        self._log_cache_size()
        if self.calibrate is not None and not self.trainer.sanity_checking:
            self.fit_calibration()

    def on_test_epoch_end(self) -> None:
        self._log_per_class("test")
        self._log_cache_size()

    def _log_per_class(self, split: str) -> None:
        """Per-class F1 and the confusion matrix, as scalars so that every logger can keep them."""
        names = self.template.label_names
        class_f1, confusion = getattr(self, f"{split}_class_f1"), getattr(self, f"{split}_confusion")
        for name, f1 in zip(names, class_f1.compute()):
            self.log(f"{split}/f1_{name}", f1)
        matrix = confusion.compute()
        for i, true in enumerate(names):
            for j, pred in enumerate(names):
                self.log(f"{split}/confusion/{true}_as_{pred}", matrix[i, j].float(), reduce_fx="sum")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        _, scores = self.loss_and_scores(batch)
        probs = self.calibrated_scores(scores).softmax(-1).float()  # renormalized over the label words
        return {
            "label": [self.template.label_names[i] for i in probs.argmax(-1).tolist()],
            "probs": probs.cpu(),
        }

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.encoder.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total, warmup, kind, floor = (
            self.schedule_horizon(),
            self.warmup_steps,
            self.lr_schedule,
            self.final_lr_fraction,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup, total, kind, floor)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def schedule_horizon(self) -> int:
        """The optimizer steps the lr schedule spans: the fit's steps, or in a federated run one client's steps over all
        rounds (each client steps its own optimizer and scheduler)."""
        blocks = getattr(self.trainer.datamodule, "blocks", None)
        if not blocks:
            return int(self.trainer.estimated_stepping_batches)
        steps = {block.steps for block in blocks}
        if len(steps) > 1 and self.lr_schedule != "constant":
            raise ConfigError(
                f"model.lr_schedule={self.lr_schedule!r} decays over a client's steps, but the clients this process "
                f"simulates take different numbers of local steps ({sorted(steps)}, from federation.local_epochs); set "
                "federation.local_steps, or run one process per client (torchrun), or model.lr_schedule: constant."
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
        # checkpoints from before table averaging have no offset: it was zero
        checkpoint["state_dict"].setdefault("encoder.table_offset", torch.zeros_like(self.encoder.table_offset))
        checkpoint["state_dict"].setdefault("label_bias", torch.zeros_like(self.label_bias))  # before calibration
        own = self.encoder.state_dict()
        for key, value in checkpoint["state_dict"].items():
            name = key.removeprefix("encoder.")
            if key.startswith("encoder.") and (name not in own or own[name].shape != value.shape):
                raise CheckpointMismatchError(
                    f"checkpoint tensor {key} {tuple(value.shape)} does not fit this model's encoder "
                    f"({tuple(own[name].shape) if name in own else 'absent'}); set model.encoder to the values "
                    "the checkpoint was trained with (see its hyper_parameters)."
                )
        # The frozen LM is not stored; put the loaded one back so that strict loading still checks the rest.
        checkpoint["state_dict"].update({"backbone." + k: v for k, v in self.backbone.state_dict().items()})
