"""The frozen-encoder feature cache: encode each distinct input once, never serve stale or corrupt features,
delete only what it wrote."""

import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmfuse.data.cache as cache_mod
from mmfuse.data.cache import CacheError, FeatureCache, cache_size, clear_cache, scan_cache
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
    assert n >= 3 and size > 0  # marker, index, shard (and the lock)
    assert clear_cache(tmp_path / "c") == size and cache_size(tmp_path / "c") == (0, 0)
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- clear deletes only what the cache wrote
def test_clear_refuses_a_folder_that_is_not_a_cache(tmp_path: Path) -> None:
    folder = tmp_path / "some" / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "sub" / "index.json").write_text("{}")  # a cache's file name, in a folder that is not an encoder key
    with pytest.raises(CacheError, match="not an mmfuse feature cache"):
        clear_cache(folder)
    with pytest.raises(CacheError, match="not an mmfuse feature cache"):
        cache_size(folder)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "sub" / "index.json").exists()


def test_clear_keeps_files_the_cache_did_not_write(tmp_path: Path, text_encoder) -> None:
    root = tmp_path / "c"
    cache = FeatureCache(text_encoder, "text", root)
    cache.build(["a", "b"])
    (root / "notes.txt").write_text("mine")
    (cache.dir / "my_shard_notes.txt").write_text("also mine")
    (root / "0123456789abcdef0123x").mkdir()  # not an encoder key: left alone
    foreign = ["notes.txt", f"{cache.dir.name}/my_shard_notes.txt", "0123456789abcdef0123x"]
    assert sorted(scan_cache(root).foreign) == sorted(foreign)
    clear_cache(root)
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left == sorted([*foreign, cache.dir.name])


def test_clear_never_follows_a_symbolic_link_out(tmp_path: Path, text_encoder) -> None:
    outside = tmp_path / "outside"
    FeatureCache(text_encoder, "text", outside).build(["a"])  # a real cache elsewhere, with cache-named files
    key = next(p for p in outside.iterdir() if p.is_dir())
    root = tmp_path / "c"
    cache = FeatureCache(text_encoder, "text", root, tokens=True)
    cache.build(["b"])
    (root / "fedcba9876543210fedc").symlink_to(key, target_is_directory=True)  # named like an encoder key
    (cache.dir / "shard_00007.safetensors").symlink_to(next(key.glob("shard_*")))
    before = sorted(p.name for p in key.iterdir())
    clear_cache(root)
    assert sorted(p.name for p in key.iterdir()) == before  # nothing outside was touched
    assert (root / "fedcba9876543210fedc").is_symlink() and (cache.dir / "shard_00007.safetensors").is_symlink()


def test_a_cache_from_before_the_marker_is_recognised(tmp_path: Path, text_encoder) -> None:
    cache = FeatureCache(text_encoder, "text", tmp_path / "c")
    cache.build(["a"])
    (tmp_path / "c" / ".mmfuse-cache").unlink()  # older mmfuse wrote no marker: encoder-key folders with an index
    assert cache_size(tmp_path / "c")[0] >= 2
    clear_cache(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_file_as_cache_root_is_one_error(tmp_path: Path, text_encoder) -> None:
    (tmp_path / "c").write_text("not a folder")
    with pytest.raises(CacheError, match="not a directory"):
        FeatureCache(text_encoder, "text", tmp_path / "c").build(["a"])
    with pytest.raises(CacheError, match="not a directory"):
        clear_cache(tmp_path / "c")
    assert (tmp_path / "c").read_text() == "not a folder"


# ---------------------------------------------------------------- shards are verified
TEXTS = [f"question {i} " + "word " * (i % 4) for i in range(7)]


def features(tmp_path: Path, encoder, name: str) -> torch.Tensor:
    table, rows = FeatureCache(encoder, "text", tmp_path / name, tokens=True).build(TEXTS)
    out = table.gather(rows)
    return torch.cat([out.pooled, out.tokens.flatten(1)], 1)


def a_new_process() -> None:
    """Shards are hashed once per process: forget which ones this process verified, as a new run would."""
    cache_mod._VERIFIED.clear()


def damage_and_rebuild(tmp_path: Path, encoder, damage, caplog) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Clean features, then damage the one shard and build again: (clean, rebuilt, inputs encoded again)."""
    clean = features(tmp_path, encoder, "c")
    shard = next((tmp_path / "c").rglob("shard_00000.safetensors"))
    damage(shard)
    a_new_process()
    counter = Counting(encoder)
    with caplog.at_level(logging.WARNING, logger="mmfuse"):
        rebuilt = features(tmp_path, encoder, "c")
    return clean, rebuilt, counter.n


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 200, len(data) - 100):  # in the tensor data, not the header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_shard_with_flipped_bytes_is_encoded_again(tmp_path: Path, text_encoder, caplog) -> None:
    clean, rebuilt, n = damage_and_rebuild(tmp_path, text_encoder, flip_bytes, caplog)
    assert n == len(TEXTS)  # every input of the damaged shard, encoded again
    assert torch.equal(rebuilt, clean) and torch.isfinite(rebuilt).all()
    assert "corrupt" in caplog.text and "encoding its 7 inputs again" in caplog.text
    a_new_process()
    assert torch.equal(features(tmp_path, text_encoder, "c"), clean)  # and the repaired cache is served


def test_a_truncated_or_missing_shard_is_encoded_again(tmp_path: Path, text_encoder, caplog) -> None:
    def truncate(path: Path) -> None:
        os.truncate(path, path.stat().st_size // 2)

    clean, rebuilt, n = damage_and_rebuild(tmp_path, text_encoder, truncate, caplog)
    assert n == len(TEXTS) and torch.equal(rebuilt, clean)
    clean, rebuilt, n = damage_and_rebuild(tmp_path / "x", text_encoder, Path.unlink, caplog)
    assert n == len(TEXTS) and torch.equal(rebuilt, clean) and "missing" in caplog.text


def test_only_the_damaged_shard_is_encoded_again(tmp_path: Path, text_encoder, monkeypatch) -> None:
    monkeypatch.setattr(cache_mod, "SHARD_ITEMS", 3)  # 7 inputs: shards of 3, 3, 1
    clean = features(tmp_path, text_encoder, "c")
    flip_bytes(next((tmp_path / "c").rglob("shard_00001.safetensors")))
    a_new_process()
    counter = Counting(text_encoder)
    assert torch.equal(features(tmp_path, text_encoder, "c"), clean) and counter.n == 3


@pytest.mark.parametrize(
    "index",
    [
        "{not json",
        json.dumps({"0123": [0, 0]}),  # the format before checksums
        "[" * 100_000 + "]" * 100_000,
        None,  # rows pointing to a shard the index does not describe
        "\udcff\xff",
    ],
)
def test_an_unusable_index_is_rebuilt(tmp_path: Path, text_encoder, caplog, index: str | None) -> None:
    clean = features(tmp_path, text_encoder, "c")
    path = next((tmp_path / "c").rglob("index.json"))
    if index is None:
        data = json.loads(path.read_text())
        data["rows"][next(iter(data["rows"]))] = [5, 0]
        index = json.dumps(data)
    path.write_bytes(index.encode("utf-8", "surrogateescape"))
    counter = Counting(text_encoder)
    with caplog.at_level(logging.WARNING, logger="mmfuse"):
        assert torch.equal(features(tmp_path, text_encoder, "c"), clean)
    assert counter.n == len(TEXTS) and caplog.text.count("index.json is unusable") == 1
    counter.n = 0
    assert torch.equal(features(tmp_path, text_encoder, "c"), clean) and counter.n == 0  # the new index holds


def test_concurrent_writers_encode_each_input_once(tmp_path: Path, text_encoder) -> None:
    counter = Counting(text_encoder)
    results: list[torch.Tensor] = []

    def build() -> None:
        table, rows = FeatureCache(text_encoder, "text", tmp_path / "c").build(TEXTS)
        results.append(table.gather(rows).pooled)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and counter.n == len(TEXTS)  # the lock made the others wait, then read
    assert all(torch.equal(r, results[0]) for r in results)


def test_swapped_index_rows_are_detected_and_encoded_again(tmp_path: Path, text_encoder, caplog) -> None:
    """index.json is valid JSON after two rows are swapped: the shard's own list of its row keys catches it."""
    clean = features(tmp_path, text_encoder, "c")
    path = next((tmp_path / "c").rglob("index.json"))
    data = json.loads(path.read_text())
    first, second = list(data["rows"])[:2]
    data["rows"][first], data["rows"][second] = data["rows"][second], data["rows"][first]
    path.write_text(json.dumps(data))
    counter = Counting(text_encoder)
    with caplog.at_level(logging.WARNING, logger="mmfuse"):
        assert torch.equal(features(tmp_path, text_encoder, "c"), clean)  # not the swapped features
    assert counter.n == len(TEXTS)
    assert "its rows in index.json were edited); encoding its 7 inputs again" in caplog.text
    counter.n = 0
    a_new_process()
    assert torch.equal(features(tmp_path, text_encoder, "c"), clean) and counter.n == 0  # the repaired index holds


def test_a_shard_without_row_keys_is_encoded_again(tmp_path: Path, text_encoder, caplog) -> None:
    """A shard whose header lists no row keys (written by an older mmfuse) cannot vouch for the index's rows."""
    from safetensors.torch import load_file, save_file

    clean = features(tmp_path, text_encoder, "c")
    shard = next((tmp_path / "c").rglob("shard_00000.safetensors"))
    save_file(load_file(str(shard)), str(shard))  # same tensors, no metadata
    path = next((tmp_path / "c").rglob("index.json"))
    data = json.loads(path.read_text())
    data["shards"]["0"].update(sha256=cache_mod._shard_digests(shard)[0], bytes=shard.stat().st_size)
    path.write_text(json.dumps(data))
    a_new_process()
    counter = Counting(text_encoder)
    with caplog.at_level(logging.WARNING, logger="mmfuse"):
        assert torch.equal(features(tmp_path, text_encoder, "c"), clean)
    assert counter.n == len(TEXTS) and "were edited" in caplog.text


def test_clear_deletes_what_an_interrupted_write_left(tmp_path: Path, text_encoder, monkeypatch) -> None:
    """A write killed before its rename leaves `mmfuse.io.atomic_path`'s temporary file: the cache's own, cleared."""
    root = tmp_path / "c"
    cache = FeatureCache(text_encoder, "text", root)
    cache.build(["a"])

    def killed(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # what a signal between the write and the rename would leave

    real_unlink = Path.unlink
    monkeypatch.setattr(os, "replace", killed)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)  # the clean-up never ran either
    with pytest.raises(KeyboardInterrupt):
        cache.build(["b"])
    monkeypatch.setattr(Path, "unlink", real_unlink)
    monkeypatch.undo()
    left = sorted(p.name for p in cache.dir.iterdir() if p.name.endswith(".tmp"))
    assert left and all(p.startswith(".shard_00001.safetensors.") for p in left)
    assert scan_cache(root).foreign == []
    clear_cache(root)
    assert not root.exists()
