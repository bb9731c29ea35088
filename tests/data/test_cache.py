"""The frozen-encoder feature cache: encode each distinct input once, never serve stale features."""

from pathlib import Path

import pytest
import torch
from PIL import Image

import mmfuse.data.cache as cache_mod
from mmfuse.data.cache import FeatureCache, cache_size, clear_cache
from mmfuse.encoders.hf_text import HFTextEncoder
from mmfuse.encoders.torchvision_image import TorchvisionImageEncoder

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


class Counting:
    """Wraps an encoder's forward to count how many inputs it encodes."""

    def __init__(self, encoder):
        self.n = 0
        forward = encoder.forward

        def counted(inputs):
            out = forward(inputs)
            self.n += out.pooled.shape[0]
            return out

        encoder.forward = counted


@pytest.fixture
def text_encoder() -> HFTextEncoder:
    torch.manual_seed(0)
    return HFTextEncoder(config=TINY_BERT, freeze=True)


def test_identical_texts_are_encoded_once_and_reused_across_runs(tmp_path: Path, text_encoder) -> None:
    counter = Counting(text_encoder)
    texts = ["what color is it?", "is there a circle?"] * 50 + ["a third question"]
    table, rows = FeatureCache(text_encoder, "text", tmp_path, tokens=True).build(texts)
    assert counter.n == 3 and len(table) == 3 and rows.shape == (101,)
    assert torch.equal(rows[:4], torch.tensor([0, 1, 0, 1]))
    # a later run (new cache object, same directory): nothing is encoded again
    table2, rows2 = FeatureCache(text_encoder, "text", tmp_path, tokens=True).build(texts)
    assert counter.n == 3 and torch.equal(rows, rows2)
    assert torch.equal(table.gather(rows).pooled, table2.gather(rows2).pooled)


def test_cached_features_equal_the_live_encoder(tmp_path: Path, text_encoder) -> None:
    texts = ["short", "a much longer question about the shape in the image", "medium length text"]
    table, rows = FeatureCache(text_encoder, "text", tmp_path, tokens=True).build(texts)
    cached = table.gather(rows)
    with torch.no_grad():
        live = text_encoder(text_encoder.collate(texts))
    assert torch.allclose(cached.pooled, live.pooled, atol=1e-6)
    assert torch.equal(cached.mask, live.mask)  # padded to the longest in the batch, as live
    assert torch.allclose(cached.tokens[cached.mask], live.tokens[live.mask], atol=1e-6)
    assert torch.equal(cached.tokens[~cached.mask], torch.zeros_like(cached.tokens[~cached.mask]))


def test_gather_across_shards_matches_one_shard(tmp_path: Path, text_encoder, monkeypatch) -> None:
    texts = [f"question number {i} " + "x " * (i % 5) for i in range(11)]
    one, rows = FeatureCache(text_encoder, "text", tmp_path / "a", tokens=True).build(texts)
    monkeypatch.setattr(cache_mod, "SHARD_ITEMS", 3)
    many, rows_many = FeatureCache(text_encoder, "text", tmp_path / "b", tokens=True).build(texts)
    assert len(list((tmp_path / "b").rglob("shard_*.safetensors"))) == 4
    pick = torch.tensor([10, 0, 4, 7, 4])
    a, b = one.gather(rows[pick]), many.gather(rows_many[pick])
    assert torch.allclose(a.pooled, b.pooled) and torch.equal(a.mask, b.mask) and torch.allclose(a.tokens, b.tokens)


def image(path: Path, color: tuple[int, int, int]) -> str:
    Image.new("RGB", (16, 16), color).save(path)
    return str(path)


def test_images_are_keyed_by_content_not_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = TorchvisionImageEncoder("resnet18", image_size=32, freeze=True)
    counter = Counting(enc)
    a = image(tmp_path / "a.png", (255, 0, 0))
    b = image(tmp_path / "b.png", (255, 0, 0))  # same bytes, other path
    c = image(tmp_path / "c.png", (0, 0, 255))
    table, rows = FeatureCache(enc, "image", tmp_path / "cache").build([a, b, c, a])
    assert counter.n == 2 and len(table) == 2 and rows.tolist() == [0, 0, 1, 0]
    before = table.gather(rows[:1]).pooled
    image(tmp_path / "a.png", (0, 255, 0))  # the file changes: never served stale
    table2, rows2 = FeatureCache(enc, "image", tmp_path / "cache").build([a])
    assert counter.n == 3 and not torch.allclose(table2.gather(rows2).pooled, before)


def test_a_changed_transform_or_weights_gets_another_cache(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc32 = TorchvisionImageEncoder("resnet18", image_size=32, freeze=True)
    torch.manual_seed(0)
    enc48 = TorchvisionImageEncoder("resnet18", image_size=48, freeze=True)
    torch.manual_seed(1)
    other = TorchvisionImageEncoder("resnet18", image_size=32, freeze=True)
    dirs = {FeatureCache(e, "image", tmp_path).dir for e in (enc32, enc48, other)}
    assert len(dirs) == 3
    assert FeatureCache(enc32, "image", tmp_path, tokens=True).dir not in dirs


def test_size_and_clear(tmp_path: Path, text_encoder) -> None:
    FeatureCache(text_encoder, "text", tmp_path / "c").build(["a", "b"])
    n, size = cache_size(tmp_path / "c")
    assert n >= 2 and size > 0
    assert clear_cache(tmp_path / "c") == size and cache_size(tmp_path / "c") == (0, 0)
