"""The corruption functions on their own: identity at severity 0, the amount each severity asks for, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmfuse.workbench.corrupt import (
    BLUR_MAX_FRACTION,
    CORRUPTIONS,
    OCCLUDER_GREY,
    absent_mask,
    gaussian_blur,
    gaussian_noise,
    kinds_for,
    occlude,
    rng_for,
    shuffle_words,
    word_dropout,
)

TEXT = "the quick brown fox jumps over the lazy dog again"  # 10 words, "the" twice


def grey(w: int = 64, h: int = 64) -> Image.Image:
    return Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8))


def rng(seed: int = 0, kind: str = "x", content: str = "c") -> np.random.Generator:
    return rng_for(seed, kind, content)


@pytest.mark.parametrize("fn", [gaussian_noise, gaussian_blur, occlude])
def test_image_kinds_are_the_identity_at_severity_0(fn) -> None:
    img = grey()
    assert fn(img, 0.0, rng()) is img


@pytest.mark.parametrize("fn", [word_dropout, shuffle_words])
def test_text_kinds_are_the_identity_at_severity_0(fn) -> None:
    assert fn(TEXT, 0.0, rng()) == TEXT
    assert fn("  spaced   text ", 0.0, rng()) == "  spaced   text "  # not even re-joined


@pytest.mark.parametrize("severity", [0.05, 0.1])
def test_noise_has_the_standard_deviation_of_its_severity_in_unit_pixels(severity: float) -> None:
    out = np.asarray(gaussian_noise(grey(128, 128), severity, rng()), dtype=np.float64) / 255.0
    diff = out - 128 / 255.0  # no clipping this close to mid-grey
    assert diff.std() == pytest.approx(severity, rel=0.05)
    assert abs(diff.mean()) < 0.01


def test_noise_is_deterministic_by_seed_and_scales_one_draw() -> None:
    a = np.asarray(gaussian_noise(grey(), 0.05, rng(1)), dtype=np.float64)
    b = np.asarray(gaussian_noise(grey(), 0.05, rng(1)), dtype=np.float64)
    c = np.asarray(gaussian_noise(grey(), 0.05, rng(2)), dtype=np.float64)
    d = np.asarray(gaussian_noise(grey(), 0.10, rng(1)), dtype=np.float64)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # the same draw, twice the scale: the deviations are (up to rounding to 8 bits) doubled
    assert np.corrcoef((a - 128).ravel(), (d - 128).ravel())[0, 1] > 0.99


def test_blur_spreads_an_impulse_by_its_severity() -> None:
    size, severity = 101, 0.5
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[50, 50] = 255
    out = np.asarray(gaussian_blur(Image.fromarray(arr), severity, rng()), dtype=np.float64)[..., 0]
    ys, xs = np.mgrid[:size, :size]
    w = out / out.sum()
    sigma = np.sqrt((w * (xs - 50) ** 2).sum())  # the blurred impulse's standard deviation along x
    assert sigma == pytest.approx(severity * BLUR_MAX_FRACTION * size, rel=0.15)
    img = Image.fromarray(arr)
    assert np.array_equal(
        np.asarray(gaussian_blur(img, severity, rng(7))), np.asarray(gaussian_blur(img, severity, rng(0)))
    )
    wider = np.asarray(gaussian_blur(img, 1.0, rng()), dtype=np.float64)[..., 0]
    assert wider.max() < out.max()  # a higher severity spreads the impulse further


@pytest.mark.parametrize("severity", [0.25, 0.5, 1.0])
def test_occlusion_covers_the_severity_fraction_of_the_area(severity: float) -> None:
    red = Image.fromarray(np.full((40, 40, 3), (200, 10, 10), dtype=np.uint8))
    out = np.asarray(occlude(red, severity, rng()))
    covered = (out == OCCLUDER_GREY).all(-1)
    side = round(np.sqrt(severity) * 40)
    assert covered.sum() == side * side
    rows, cols = np.nonzero(covered)
    assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side  # one square


def test_occlusion_place_depends_on_the_seed_only() -> None:
    red = Image.fromarray(np.full((40, 40, 3), (200, 10, 10), dtype=np.uint8))
    masks = [(np.asarray(occlude(red, 0.1, rng(s))) == OCCLUDER_GREY).all(-1) for s in (0, 0, 1)]
    assert np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[0], masks[2])


@pytest.mark.parametrize("severity, removed", [(0.1, 1), (0.25, 3), (0.5, 5), (1.0, 10)])  # round(s * 10), half up
def test_word_dropout_removes_the_severity_fraction_of_the_words(severity: float, removed: int) -> None:
    out = word_dropout(TEXT, severity, rng()).split()
    assert len(out) == 10 - removed
    it = iter(TEXT.split())
    assert all(w in it for w in out)  # what is left is a subsequence, in order


def test_word_dropout_removes_more_of_the_same_words_as_severity_grows() -> None:
    kept = [set(enumerate_kept(TEXT, word_dropout(TEXT, s, rng(3)))) for s in (0.2, 0.5, 0.8)]
    assert kept[0] >= kept[1] >= kept[2]


def enumerate_kept(text: str, out: str) -> list[int]:
    """Positions of `text`'s words that survive in `out` (a subsequence: match greedily)."""
    words, pos, kept = text.split(), 0, []
    for w in out.split():
        while words[pos] != w:
            pos += 1
        kept.append(pos)
        pos += 1
    return kept


@pytest.mark.parametrize("severity, moved", [(0.2, 2), (0.5, 5), (1.0, 10)])
def test_shuffle_moves_exactly_the_severity_fraction_of_the_words(severity: float, moved: int) -> None:
    text = "a b c d e f g h i j"  # distinct words: a moved word is visible
    out = shuffle_words(text, severity, rng()).split()
    assert sorted(out) == sorted(text.split())
    assert sum(o != w for o, w in zip(out, text.split())) == moved


def test_shuffle_of_one_chosen_word_leaves_the_text() -> None:
    assert shuffle_words("a b c d", 0.25, rng()) == "a b c d"  # round(0.25 * 4) = 1 word cannot move alone


def test_absent_mask_draws_the_severity_fraction_nested_and_seeded() -> None:
    masks = {s: absent_mask(20_000, s, 5) for s in (0.0, 0.3, 0.6, 1.0)}
    assert not masks[0.0].any() and masks[1.0].all()
    assert masks[0.3].float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert bool((masks[0.3] <= masks[0.6]).all())  # nested: a record absent at 0.3 is absent at 0.6
    assert torch.equal(absent_mask(100, 0.5, 5), absent_mask(100, 0.5, 5))
    assert not torch.equal(absent_mask(100, 0.5, 5), absent_mask(100, 0.5, 6))


def test_kinds_apply_by_input_kind() -> None:
    assert kinds_for("image") == ["noise", "blur", "occlude", "absent"]
    assert kinds_for("text") == ["word_dropout", "shuffle", "absent"]
    assert kinds_for("tabular") == ["absent"]
    assert set(CORRUPTIONS) == {"noise", "blur", "occlude", "word_dropout", "shuffle", "absent"}
