"""Shared fixtures: tiny random-weight models built from a config, a tokenizer trained on the spot,
and a synthetic text folder laid out like WikiText-2. Nothing here touches a hub or the network."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

WORDS = (
    "the of and to in a is was for on as with by he at from his an were are which this be or "
    "has had first one their its new after who they two her she been other when there all during "
    "into school time may years more most only over city some world would where later up such used "
    "many can state about national out known university united then made"
).split()


def synthetic_text(seed: int, n_lines: int = 400) -> str:
    """Lines of random words with a skewed distribution, so a model can learn something."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(WORDS))]
    lines = []
    for _ in range(n_lines):
        length = rng.randint(8, 30)
        lines.append(" ".join(rng.choices(WORDS, weights, k=length)) + " .")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a validation split (calibration) and a test split (evaluation)."""
    folder = tmp_path_factory.mktemp("wikitext-like")
    (folder / "wiki.valid.tokens").write_text(synthetic_text(1))
    (folder / "wiki.test.raw").write_text(synthetic_text(2))
    return folder


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    raw.train_from_iterator([synthetic_text(0)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def tiny_opt_config(vocab_size: int) -> OPTConfig:
    return OPTConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def save_tiny_model(config, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    return save_tiny_model(
        tiny_llama_config(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny-llama")
    )


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    return save_tiny_model(
        tiny_opt_config(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("tiny-opt")
    )


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own calibration cache, so cache hits are never accidental."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(cache))
    return cache
