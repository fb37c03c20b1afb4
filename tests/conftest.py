"""Shared fixtures: tiny random causal LMs saved as real model directories, and synthetic data.

Nothing here downloads: the tokenizer is a byte-level BPE trained on the synthetic corpus in a few ms.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never wait on the network

import random
from pathlib import Path

import pytest
import torch
from helpers import REPO
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REAL_FPB = REPO.parent / "shared" / "data" / "FinancialPhraseBank-v1.0"

WORDS = {
    "positive": ["profit rose", "sales grew strongly", "earnings beat forecasts", "revenue increased"],
    "negative": ["loss widened", "sales fell sharply", "earnings missed forecasts", "revenue decreased"],
    "neutral": ["the company held its meeting", "the board met in Helsinki", "shares were listed", "the office moved"],
}
FILLER = ["in the quarter", "this year", "according to the report", "in Finland", "for the period"]


def synthetic_sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ["positive", "negative", "neutral"][i % 3]
        rows.append((f"{rng.choice(WORDS[label])} {rng.choice(FILLER)} .", label))
    return rows


def train_tokenizer() -> PreTrainedTokenizerFast:
    corpus = [s for s, _ in synthetic_sentences(300)] + [" negative", " neutral", " positive", " sentiment:"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def build_tiny(arch: str, directory: Path, width: int = 32) -> Path:
    tokenizer = train_tokenizer()
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}")))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny("gpt2", tmp_path_factory.mktemp("tiny-gpt2")))


def write_synthetic_fpb(parent: Path) -> Path:
    """A Financial PhraseBank-shaped folder (latin-1, ``sentence@label``) with synthetic sentences, in ``parent``."""
    folder = parent / "FinancialPhraseBank-v1.0"
    folder.mkdir()
    lines = [f"{s}@{label}" for s, label in synthetic_sentences(120)]
    (folder / "Sentences_AllAgree.txt").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder


@pytest.fixture()
def synthetic_fpb(tmp_path: Path) -> Path:
    return write_synthetic_fpb(tmp_path)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep GGUF conversions out of the user's cache unless a test chooses otherwise."""
    monkeypatch.setenv("FEDLM_CACHE", str(tmp_path_factory.getbasetemp() / "fedlm-cache"))
