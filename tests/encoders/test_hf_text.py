"""HFTextEncoder: tiny BERT from a config (shapes, pooling, padding), offline errors, the packaged MiniLM."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mmfuse.encoders import ENCODERS
from mmfuse.encoders.hf_text import HFTextEncoder


def test_registered() -> None:
    assert ENCODERS.get("hf_text") is HFTextEncoder


def test_tiny_bert_shapes(tiny_bert: dict[str, Any], sentences: list[str], seed: int) -> None:
    encoder = HFTextEncoder(config=tiny_bert)
    assert encoder.output_dim == 32
    batch = encoder.collate([encoder.preprocess(s) for s in sentences])
    lengths = [len(encoder.tokenizer(s)["input_ids"]) for s in sentences]
    assert batch["input_ids"].shape == (2, max(lengths))  # padded to the longest, not to max_length
    assert batch["attention_mask"].sum(1).tolist() == lengths
    out = encoder.eval()(batch)
    assert out.pooled.shape == (2, 32)
    assert out.tokens is not None and out.tokens.shape == (2, max(lengths), 32)
    assert out.mask is not None and out.mask.dtype == torch.bool
    assert torch.equal(out.mask, batch["attention_mask"].bool())


def test_padding_is_dynamic_and_truncated(tiny_bert: dict[str, Any]) -> None:
    encoder = HFTextEncoder(config=tiny_bert, max_length=8)
    assert encoder.collate(["a", "b c"])["input_ids"].shape == (2, 4)  # [CLS] b c [SEP]
    assert encoder.collate(["a " * 50])["input_ids"].shape == (1, 8)


def test_mean_pooling_ignores_padding(tiny_bert: dict[str, Any], sentences: list[str], seed: int) -> None:
    encoder = HFTextEncoder(config=tiny_bert, pooling="mean").eval()
    batch = encoder.collate(sentences)
    pooled = encoder(batch).pooled
    pad = ~batch["attention_mask"].bool()
    assert pad.any()
    changed = dict(batch, input_ids=batch["input_ids"].masked_fill(pad, 1037))  # new ids under the padding
    torch.testing.assert_close(encoder(changed).pooled, pooled)
    longer = {k: F.pad(v, (0, 5)) for k, v in batch.items()}  # five more padding positions
    torch.testing.assert_close(encoder(longer).pooled, pooled)
    # a text pooled alone equals the same text pooled in a padded batch
    torch.testing.assert_close(encoder(encoder.collate(sentences[:1])).pooled, pooled[:1])


def test_cls_and_pooler_pooling(tiny_bert: dict[str, Any], sentences: list[str], seed: int) -> None:
    batch_cls = HFTextEncoder(config=tiny_bert, pooling="cls").eval()
    out = batch_cls(batch_cls.collate(sentences))
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])
    pooler = HFTextEncoder(config=tiny_bert, pooling="pooler").eval()
    batch = pooler.collate(sentences)
    out = pooler(batch)
    expected = pooler.model(**batch).pooler_output
    torch.testing.assert_close(out.pooled, expected)


def test_pooler_needs_a_pooler() -> None:
    distilbert = {
        "model_type": "distilbert",
        "dim": 32,
        "n_layers": 1,
        "n_heads": 2,
        "hidden_dim": 37,
        "vocab_size": 30522,
    }
    with pytest.raises(ValueError, match="no pooler_output"):
        HFTextEncoder(config=distilbert, pooling="pooler")
    encoder = HFTextEncoder(config=distilbert, pooling="mean")  # DistilBERT takes no token_type_ids
    assert encoder.eval()(encoder.collate(["a b", "c"])).pooled.shape == (2, 32)


def test_bad_arguments(tiny_bert: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown pooling"):
        HFTextEncoder(config=tiny_bert, pooling="max")
    with pytest.raises(ValueError, match="vocab_size"):
        HFTextEncoder(config=dict(tiny_bert, vocab_size=100))
    with pytest.raises(ValueError, match="model_type"):
        HFTextEncoder(config={"hidden_size": 32})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        HFTextEncoder(config=dict(tiny_bert, max_position_embeddings=64), max_length=128)


def test_hub_names_are_refused_clearly() -> None:
    with pytest.raises(FileNotFoundError, match=r"Hugging Face Hub are impossible here.*model: /path/to"):
        HFTextEncoder("bert-base-uncased")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        HFTextEncoder(config={"model_type": "bert"}, tokenizer="org/some-tokenizer")


def test_preprocess(tiny_bert: dict[str, Any]) -> None:
    encoder = HFTextEncoder(config=tiny_bert)
    assert encoder.preprocess("  What colour?\n") == "What colour?"
    with pytest.raises(TypeError):
        encoder.preprocess(None)


def test_cache_key(tiny_bert: dict[str, Any], seed: int) -> None:
    encoder = HFTextEncoder(config=tiny_bert)
    key = encoder.cache_key()
    assert key == encoder.cache_key()
    torch.manual_seed(1)
    others = [
        HFTextEncoder(config=tiny_bert),  # other random weights
        HFTextEncoder(config=tiny_bert, pooling="cls"),
        HFTextEncoder(config=tiny_bert, max_length=64),
    ]
    assert len({key, *(e.cache_key() for e in others)}) == 4


@pytest.mark.slow
def test_packaged_minilm() -> None:
    encoder = HFTextEncoder("minilm", freeze=True)
    assert encoder.output_dim == 384
    texts = [
        "A man is playing a guitar.",
        "Someone is strumming an acoustic guitar.",
        "The stock market fell sharply this morning.",
    ]
    with torch.no_grad():
        out = encoder(encoder.collate([encoder.preprocess(t) for t in texts]))
    assert out.pooled.shape == (3, 384) and out.tokens is not None and out.tokens.shape[-1] == 384
    emb = F.normalize(out.pooled, dim=-1)
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar > unrelated + 0.3, (similar, unrelated)
    assert "sha256:" in encoder.cache_key() and "model=minilm" in encoder.cache_key()
