"""A trained prompt without its encoder: read from a checkpoint or an export folder, written as an export folder.

Prediction needs only the encoder's output (the virtual-token table) and how to use it, so an export folder holds:

- ``prompt.safetensors``: one float32 tensor ``virtual_tokens`` (virtual tokens, hidden), the checkpoint's
  inference table, placed into the template's virtual-token slots;
- ``prompt.json``: the task (``model.task``: template, label words or generation settings), the virtual-token blocks,
  the backbone's dtype, and the backbone the prompt was trained on (what the user named, and its architecture, to
  refuse another model), and the label calibration's per-class biases if the run calibrated
  (``model.task.calibrate``; prediction adds them to the scores);
- ``peft/``: the same table as a PEFT adapter (prompt tuning for virtual tokens, prefix tuning for deep slots),
  written only when the template is PEFT's layout (all virtual tokens before the input, and no special tokens that
  the tokenizer puts first), so that ``PeftModel.from_pretrained`` predicts what fedlm predicts: the label words'
  scores (without calibration's biases, which PEFT has no place for), or, for a generative task, the same tokens from
  greedy ``generate`` as fedlm's decoding (both layouts, tested with transformers 5.25 and PEFT 0.22).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from fedlm.checkpointing import atomic_write, load_checkpoint, partial_name
from fedlm.errors import FedlmError
from fedlm.model.prompt_encoder import PromptEncoderConfig
from fedlm.model.template import VIRTUAL_MARKER, PromptTemplate
from fedlm.ptuning.config import CacheConfig
from fedlm.ptuning.module import CheckpointMismatchError, PTuningModule, check_sectioned
from fedlm.tasks import TaskConfig

# 2: deep prompts ("deep": true, the table holds key/value slots); 3: the task section replaces template, label words
# and max_length
FORMAT, FORMAT_VERSION = "fedlm-prompt", 3
TABLE_FILE, SETTINGS_FILE, PEFT_FOLDER = "prompt.safetensors", "prompt.json", "peft"
TABLE_KEY = "virtual_tokens"


class PromptFormatError(FedlmError, ValueError):
    """A checkpoint or folder that holds no fedlm prompt; the message says what is missing and what to pass."""


class PeftLayoutError(FedlmError, ValueError):
    """A PEFT adapter was required, but PEFT's prompt tuning cannot reproduce this template."""


@dataclass
class TrainedPrompt:
    table: torch.Tensor  # (virtual tokens, hidden), float32
    task: dict[str, Any]  # TaskConfig's fields
    virtual_tokens: int | list[int]  # as configured: one block, or one count per marker
    dtype: str  # the frozen backbone's, as trained
    backbone: str  # what model.backbone named
    architecture: dict[str, Any] | None  # PTuningModule.architecture(); None in checkpoints older than it
    label_bias: list[float] | None = None  # calibration's per-class biases, in label_words order; None: uncalibrated
    deep: bool = False  # the table's rows are per-layer key/value slots (fedlm.model.slots), not embeddings
    init_text: str | None = None  # deep: the text the slots started from (the encoder config needs it)

    @classmethod
    def load(cls, source: str | Path) -> TrainedPrompt:
        """From a ``.ckpt`` file written by ``fedlm fit``, or a folder written by ``fedlm export``."""
        return cls.from_folder(source) if Path(source).is_dir() else cls.from_checkpoint(source)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> TrainedPrompt:
        checkpoint = load_checkpoint(path)  # weights_only: a tampered file is refused, never run
        saved = checkpoint.get("fedlm")
        table = checkpoint.get("state_dict", {}).get("encoder.inference_table")
        hparams = checkpoint.get("hyper_parameters")
        bias = checkpoint.get("state_dict", {}).get("task.label_bias")
        check_sectioned(hparams, str(path))
        if saved is None or table is None or hparams is None or "task" not in hparams:
            raise PromptFormatError(
                f"{path} is not a fedlm checkpoint of this version (it lacks the 'fedlm' entry, the encoder's "
                "inference table or the hyperparameters' task section); pass a .ckpt written by this version's "
                "`fedlm fit`."
            )
        return cls(
            table=table.float(),
            task=dict(hparams["task"]),
            virtual_tokens=hparams["encoder"]["virtual_tokens"],
            dtype=hparams["dtype"],
            backbone=saved["backbone"],
            architecture=saved.get("architecture"),
            label_bias=bias.tolist() if bias is not None and bool(bias.any()) else None,
            deep=hparams["encoder"].get("deep", False),
            init_text=hparams["encoder"]["init_text"] if hparams["encoder"].get("deep") else None,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> TrainedPrompt:
        folder = Path(folder)
        for name in (SETTINGS_FILE, TABLE_FILE):
            if not (folder / name).is_file():
                raise PromptFormatError(
                    f"{folder} is not a fedlm export folder: it has no {name}. Write one with "
                    f"`fedlm export CHECKPOINT --out {folder}`."
                )
        try:
            settings = json.loads((folder / SETTINGS_FILE).read_text())
        except json.JSONDecodeError as err:
            raise PromptFormatError(
                f"{folder / SETTINGS_FILE} is not valid JSON ({err}); re-export the checkpoint."
            ) from None
        if (
            not isinstance(settings, dict)
            or settings.get("format") != FORMAT
            or settings.get("version", 0) > FORMAT_VERSION
        ):
            raise PromptFormatError(
                f"{folder / SETTINGS_FILE} is not a {FORMAT} file of version {FORMAT_VERSION} or older; re-export "
                "the checkpoint with this version's `fedlm export`."
            )
        if settings.get("version", 0) < 3 and "task" not in settings:  # before the task section: its fields on top
            old = {name: settings.pop(name) for name in ("template", "label_words", "max_length") if name in settings}
            if old:
                settings["task"] = old
        names = [field.name for field in fields(cls) if field.name != "table"]
        optional = ("label_bias", "deep", "init_text")  # older exports lack them
        missing = [name for name in names if name not in settings and name not in optional]
        task = settings.get("task")
        if isinstance(task, dict):  # what the defaults must not stand in for: the task the prompt was trained on
            needed = ["template"] + (["label_words"] if task.get("kind", "classification") == "classification" else [])
            missing += [f"task.{name}" for name in needed if name not in task]
        if missing:
            raise PromptFormatError(
                f"{folder / SETTINGS_FILE} lacks {missing}; re-export the checkpoint with `fedlm export`."
            )
        tensors = load_file(folder / TABLE_FILE)
        if TABLE_KEY not in tensors:
            raise PromptFormatError(f"{folder / TABLE_FILE} has no tensor {TABLE_KEY!r}; re-export the checkpoint.")
        return cls(table=tensors[TABLE_KEY], **{name: settings[name] for name in names if name in settings})

    def save(self, folder: Path) -> None:
        """``prompt.safetensors`` and ``prompt.json`` in ``folder``, each written atomically."""
        settings = {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}
        del settings["table"]
        table = safetensors_bytes({TABLE_KEY: self.table.float().contiguous()})
        atomic_write(folder / TABLE_FILE, lambda file: file.write(table))
        atomic_write(folder / SETTINGS_FILE, lambda file: file.write((json.dumps(settings, indent=2) + "\n").encode()))

    def module(self, backbone: str | None = None, dtype: str | None = None) -> PTuningModule:
        """A PTuningModule in eval mode that predicts with this table alone.

        An embedding encoder's output is its input table (plus a zero offset), so it carries the table and the
        module's own scoring does the rest. ``backbone`` overrides where the frozen LM is (files move), ``dtype``
        the frozen LM's dtype as trained. Deep slots after text keep that text cached, as they were trained (the
        module refuses them otherwise).
        """
        module = PTuningModule(
            backbone=backbone or self.backbone,
            dtype=dtype or self.dtype,
            task=TaskConfig(**self.task),
            encoder=PromptEncoderConfig(
                type="embedding", virtual_tokens=self.virtual_tokens, deep=self.deep, init_text=self.init_text
            ),
            cache=CacheConfig(prefix=self.deep and VIRTUAL_MARKER.match(self.task["template"]) is None),
        )
        expected = (self.architecture or module.architecture(), tuple(self.table.shape))
        found = (module.architecture(), tuple(module.encoder.input_table.shape))
        if found != expected:
            raise CheckpointMismatchError(
                f"the prompt was trained on backbone {self.backbone!r} ({expected[0]}, table {expected[1]}), but "
                f"{module.backbone_source!r} is another model ({found[0]}, table {found[1]}): its prompt would mean "
                "nothing there. Pass --backbone with the location of the prompt's backbone."
            )
        with torch.no_grad():
            module.encoder.input_table.copy_(self.table)
            if self.label_bias is not None:
                module.task.label_bias.copy_(torch.tensor(self.label_bias, dtype=torch.float64))
        module.eval()
        module.encoder.refresh_table()  # now, outside the inference mode that prediction runs in
        return module


def peft_mismatch(template: PromptTemplate) -> str | None:
    """Why PEFT's prompt tuning, which puts every virtual token before the whole input, would score ``template``
    differently from fedlm, and what to do instead; None when it scores it the same."""
    if template.prefix_ids:
        return (
            f"the tokenizer starts every input with special tokens {template.prefix_ids}, which fedlm puts before "
            "the virtual tokens and PEFT after them, whatever the template; use the folder with fedlm predict"
        )
    blocks = sum(isinstance(piece, int) for piece in template.pieces)
    if blocks > 1 or not isinstance(template.pieces[0], int):
        return (
            "the template does not start with its only block of virtual tokens, where PEFT puts them. To get a PEFT "
            "adapter, train with the prefix layout: --model.task.template '<|VIRTUAL_PROMPT_0|> {sentence} "
            "sentiment:{label}' --model.cache.prefix false"
        )
    return None


def save_peft_adapter(module: PTuningModule, folder: Path, deep: bool) -> None:
    """``module``'s virtual tokens as a PEFT prompt-tuning adapter, or its deep slots as a PEFT prefix-tuning one
    (PEFT's rows are laid out as fedlm's: layers, keys then values, heads, head dim), saved by PEFT itself into
    ``folder`` (replaced).

    PEFT writes a folder of files, so it writes a staging folder beside ``folder`` that is then renamed into place.
    """
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model  # only export needs PEFT

    table = module.encoder().detach()
    if deep:
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=len(table))
    else:
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=len(table), token_dim=table.shape[1])
    adapter = get_peft_model(module.backbone, config)
    with torch.no_grad():
        adapter.prompt_encoder["default"].embedding.weight.copy_(table)
    staging = partial_name(folder)
    staging.mkdir()
    try:
        adapter.save_pretrained(staging)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_export(
    prompt: TrainedPrompt, folder: Path, backbone: str | None = None, require_peft: bool = False
) -> str | None:
    """The export folder of ``prompt``; returns why no PEFT adapter was written (None when it was).

    The backbone is loaded to check that it is the prompt's and to decide on PEFT (its tokenizer's special tokens).
    """
    module = prompt.module(backbone)
    mismatch = peft_mismatch(module.task.template)
    if mismatch is not None and require_peft:
        raise PeftLayoutError(f"--peft require: no PEFT adapter can reproduce {prompt.task['template']!r}: {mismatch}.")
    folder.mkdir(parents=True, exist_ok=True)
    prompt.save(folder)
    if mismatch is None:
        save_peft_adapter(module, folder / PEFT_FOLDER, prompt.deep)
    else:
        shutil.rmtree(folder / PEFT_FOLDER, ignore_errors=True)  # an earlier export's adapter would not match
    return mismatch
