"""Shared fixtures: a tiny causal LM and a small byte-level BPE tokenizer.

Nothing is downloaded: the tokenizer is trained here on a small corpus and the
model is built from a config, then both are saved and loaded back through
``from_pretrained`` so the real loading path is exercised.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["localcluster.pytest_plugin"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] != 'user' %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a good bad great awful happy sad yes no please thanks hello world model answer question "
    "short long reply tell me about cats dogs weather today tomorrow is was very quite nice terrible "
    "love hate kind rude help sure okay maybe never always this that what why how when where who"
).split()


def _corpus() -> list[str]:
    lines = []
    for i, w in enumerate(_WORDS):
        for j in range(6):
            other = _WORDS[(i * 7 + j * 3) % len(_WORDS)]
            lines.append(f"{w} {other}. Tell me about {w}? {other.capitalize()} is {w}!")
    return lines


def build_tokenizer(directory: Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_tiny_model(directory: Path, *, vocab_size: int, seed: int = 0, layers: int = 2,
                     hidden: int = 64, heads: int = 4, intermediate: int = 128) -> None:
    """A Llama-style causal LM small enough for CPU steps in milliseconds."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Directory with a tiny Llama model and its tokenizer, loadable with from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer(directory)
    build_tiny_model(directory, vocab_size=len(tokenizer))
    # Prove the saved files load through the public API before any test relies on them.
    AutoTokenizer.from_pretrained(directory)
    AutoModelForCausalLM.from_pretrained(directory)
    return directory
