"""A tiny offline LayerSkip checkpoint (random weights, word-level tokenizer) and prompt files for measurement tests."""

import json
from pathlib import Path

from conftest import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB_WORDS = [f"w{i}" for i in range(120)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `<unk>`, `<eos>`, w0..w119 (122 ids, inside the tiny vocab of 128)."""
    vocab = {"<unk>": 0, "<eos>": 1, **{word: i + 2 for i, word in enumerate(VOCAB_WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def save_tiny_checkpoint(directory: Path, seed: int = 0, **config_overrides) -> Path:
    """A random 6-layer LayerSkip model and its tokenizer, saved like a converted checkpoint."""
    tiny_model(seed, **config_overrides).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def prompt_words(index: int, length: int = 7) -> str:
    return " ".join(VOCAB_WORDS[(index * 13 + 7 * k) % len(VOCAB_WORDS)] for k in range(length))


def write_prompts(path: Path, count: int = 3) -> Path:
    """JSON-lines prompts with `question`, `answer` and `name` fields."""
    with open(path, "w") as file:
        for i in range(count):
            record = {"name": f"p{i}", "question": prompt_words(i), "answer": prompt_words(i + 5, 6)}
            file.write(json.dumps(record) + "\n")
    return path


def write_texts(path: Path, count: int = 4) -> Path:
    """JSON-lines texts (`text` field) of 20 to 35 words each."""
    with open(path, "w") as file:
        for i in range(count):
            file.write(json.dumps({"text": prompt_words(i, 20 + 5 * i)}) + "\n")
    return path
