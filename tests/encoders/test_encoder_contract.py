"""Every registered encoder, built tiny from its recipe (tests/recipes/), honours the Encoder contract:
the network side (shapes, gradients, determinism, freezing, cache key) and the data side (read, check,
content hash, load, preprocess, placeholder, collate, length, fit)."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest
import torch

from mmfuse.encoders import ENCODERS, Encoder
from mmfuse.encoders.base import DataRoot, InputError
from recipes import load_recipes

RECIPES = load_recipes()


def test_every_encoder_has_a_recipe() -> None:
    assert set(ENCODERS.names()) <= set(RECIPES), "add tests/recipes/<encoder>.py for each new encoder"


@pytest.fixture(params=sorted(RECIPES))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def build(name: str, refs: list[Hashable] | None = None, **overrides: Any) -> Encoder:
    """The recipe's encoder; when `refs` are given, rebuilt with what `fit` learns from them (as the builder does)."""
    options = {**RECIPES[name].options, **overrides}
    encoder = ENCODERS.get(name)(**options)
    learned = encoder.fit(refs) if refs is not None else {}
    return ENCODERS.get(name)(**options, **learned) if learned else encoder


def rows(name: str, root: Path, n: int = 4) -> list[dict[str, Any]]:
    return [RECIPES[name].row(i, root, "x") for i in range(n)]


def references(name: str, root: Path, n: int = 4) -> tuple[Encoder, list[Hashable]]:
    probe = ENCODERS.get(name)(**RECIPES[name].options)
    refs = [probe.read(row, "x", DataRoot(root)) for row in rows(name, root, n)]
    return build(name, refs), refs


def batch(encoder: Encoder, refs: list[Hashable]) -> Any:
    return encoder.collate([encoder.preprocess(encoder.load(r)) for r in refs])


def test_shapes_and_output_dim(name: str, tmp_path: Path, seed: int) -> None:
    encoder, refs = references(name, tmp_path)
    out = encoder(batch(encoder, refs))
    assert out.pooled.shape == (4, encoder.output_dim)
    assert (out.tokens is not None) == encoder.has_tokens
    if out.tokens is not None:
        assert out.tokens.shape[0] == 4 and out.tokens.shape[-1] == encoder.output_dim
    if out.mask is not None:
        assert out.mask.dtype == torch.bool and out.mask.shape == out.tokens.shape[:2]


def test_gradient_reaches_every_used_parameter(name: str, tmp_path: Path, seed: int) -> None:
    encoder, refs = references(name, tmp_path)
    encoder(batch(encoder, refs)).pooled.sum().backward()
    # the BERT pooler only feeds pooling="pooler"
    missing = [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None and "pooler" not in n]
    assert not missing


def test_eval_is_deterministic(name: str, tmp_path: Path, seed: int) -> None:
    encoder, refs = references(name, tmp_path)
    encoder.eval()
    inputs = batch(encoder, refs)
    with torch.no_grad():
        torch.testing.assert_close(encoder(inputs).pooled, encoder(inputs).pooled, rtol=0, atol=0)


def test_freeze(name: str, seed: int) -> None:
    encoder = build(name, freeze=True)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not any(m.training for m in encoder.modules())
    assert build(name).training  # unfrozen encoders follow train()/eval() as usual


def test_cache_key_is_stable(name: str, seed: int) -> None:
    encoder = build(name)
    key = encoder.cache_key()
    assert isinstance(key, str) and key == encoder.cache_key()
    assert type(encoder).__name__ in key


# ---------------------------------------------------------------------- data side
def test_read_gives_hashable_references_and_none_for_a_missing_input(name: str, tmp_path: Path) -> None:
    encoder, refs = references(name, tmp_path)
    assert all(r is not None and isinstance(r, Hashable) for r in refs)
    hash(tuple(refs))
    for key in encoder.fields("x"):
        assert isinstance(key, str)
    empty_row = {k: None for k in encoder.fields("x")}
    assert encoder.read(empty_row, "x", DataRoot(tmp_path)) is None
    assert encoder.read({}, "x", DataRoot(tmp_path)) is None


def test_a_value_of_the_wrong_type_is_one_input_error(name: str, tmp_path: Path) -> None:
    encoder = build(name)
    row = {k: {"an": "object"} for k in encoder.fields("x")}
    with pytest.raises(InputError) as info:
        encoder.read(row, "x", DataRoot(tmp_path))
    assert "\n" not in str(info.value)


def test_check_accepts_good_references(name: str, tmp_path: Path) -> None:
    encoder, refs = references(name, tmp_path)
    assert [encoder.check(r) for r in refs] == [None] * len(refs)


def test_content_hash_follows_the_content(name: str, tmp_path: Path) -> None:
    encoder, refs = references(name, tmp_path, n=6)
    hashes = [encoder.content_hash(r) for r in refs]
    assert hashes == [encoder.content_hash(r) for r in refs]  # stable
    assert len(set(hashes)) == len(set(refs))  # the recipes' inputs all differ


def test_placeholder_collates_with_real_items(name: str, tmp_path: Path, seed: int) -> None:
    encoder, refs = references(name, tmp_path)
    items = [encoder.preprocess(encoder.load(refs[0])), encoder.placeholder()]
    out = encoder.eval()(encoder.collate(items))
    assert out.pooled.shape == (2, encoder.output_dim) and torch.isfinite(out.pooled).all()


def test_length_is_an_int_or_none(name: str, tmp_path: Path) -> None:
    encoder, refs = references(name, tmp_path)
    lengths = [encoder.length(r) for r in refs]
    assert all(n is None for n in lengths) or all(isinstance(n, int) and n >= 0 for n in lengths)


def test_fit_is_idempotent(name: str, tmp_path: Path) -> None:
    """A fitted encoder (its learned options set) learns nothing more: resumed and loaded runs keep their options."""
    encoder, refs = references(name, tmp_path)
    assert encoder.fit(refs) == {}
