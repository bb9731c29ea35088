"""Recipe: a 2-layer, 32-d BERT with random weights and the packaged MiniLM tokenizer; the class is a word."""

from pathlib import Path
from typing import Any

from recipes import Recipe

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "vocab_size": 30522,
}
WORDS = ["apple", "river", "engine"]


def text_row(i: int, root: Path, modality: str) -> dict[str, Any]:
    return {modality: f"{WORDS[i % 3]} number {i}" + " again" * (i % 4)}


RECIPE = Recipe("hf_text", {"config": TINY_BERT, "max_length": 16}, text_row)
