"""Fusion test fixtures: tiny features with unequal modality sizes and padded text tokens.

Shapes: B = 3, image 12-d with 4 spatial tokens (no padding), text 10-d with 5 tokens of which
[5, 3, 1] are real, fused size 8.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput

B = 3
DIMS = {"image": 12, "text": 10}
OUT = 8
NUM_TOKENS = {"image": 4, "text": 5, "audio": 2}
TEXT_LENGTHS = [5, 3, 1]


def fixed(*shape: int, start: int = 0) -> torch.Tensor:
    """Deterministic, arange-based values in [-0.3, 0.3]: `((arange(n) + start) % 13 - 6) * 0.05`.

    The period 13 shares no factor with the test sizes, so no two rows of a small matrix are equal.
    """
    n = 1
    for s in shape:
        n *= s
    return ((torch.arange(n, dtype=torch.float32) + start) % 13 - 6).reshape(shape) * 0.05


def fixed_init_(module: nn.Module) -> dict[str, torch.Tensor]:
    """Set every parameter of `module` to `fixed` values, each parameter with its own start (so two
    parameters of the same shape differ), and return them by name for a by-hand reference."""
    values = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            values[name] = fixed(*p.shape, start=5 * i)
            p.copy_(values[name])
    return values


def make_features(
    dims: dict[str, int] | None = None, text_lengths: list[int] | None = None
) -> dict[str, EncoderOutput]:
    """Random features for `dims`; text tokens are padded to `text_lengths`, padded positions hold random values too."""
    out = {}
    for m, d in (dims or DIMS).items():
        tokens = torch.randn(B, NUM_TOKENS[m], d)
        mask = None
        if m == "text":
            lengths = torch.tensor(text_lengths or TEXT_LENGTHS)
            mask = torch.arange(NUM_TOKENS[m]).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        out[m] = EncoderOutput(pooled=torch.randn(B, d), tokens=tokens, mask=mask)
    return out


def with_new_padding(features: dict[str, EncoderOutput]) -> dict[str, EncoderOutput]:
    """The same features with fresh random (large) values in every padded token position."""
    out = {}
    for m, f in features.items():
        tokens = f.tokens
        if tokens is not None and f.mask is not None:
            tokens = torch.where(f.mask.unsqueeze(-1), tokens, 100 * torch.randn_like(tokens))
        out[m] = EncoderOutput(f.pooled, tokens, f.mask, f.present)
    return out


def assert_every_gradient_and_determinism(fusion: nn.Module, features: dict[str, EncoderOutput]) -> None:
    """(B, out) output whose gradient reaches every parameter and every modality's tokens (their `requires_grad` set
    by the caller), and, in eval mode, twice the same output."""
    out = fusion(features)
    (out.fused * torch.randn_like(out.fused)).sum().backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    for m, f in features.items():
        assert f.tokens.grad.abs().sum() > 0, f"no gradient reaches {m}"
    fusion.eval()
    with torch.no_grad():
        assert torch.equal(fusion(features).fused, fusion(features).fused)


def fit_interaction(fusion: nn.Module, steps: int = 300, n: int = 1024) -> float:
    """Train `fusion` (output_dim 2, on pooled `DIMS` features) to tell whether `image[0] * text[0] > 0`, and
    return its accuracy on fresh samples. No weighted sum of the two modalities can do better than chance."""

    def sample(count: int) -> tuple[dict[str, EncoderOutput], torch.Tensor]:
        x = {m: torch.randn(count, d) for m, d in DIMS.items()}
        return {m: EncoderOutput(v) for m, v in x.items()}, (x["image"][:, 0] * x["text"][:, 0] > 0).long()

    opt = torch.optim.Adam(fusion.parameters(), lr=1e-2)
    train, labels = sample(n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ops are tiny: a second thread only waits, and stalls when the cores are busy
    try:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(fusion(train).fused, labels).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    test, labels = sample(n)
    with torch.no_grad():
        return (fusion.eval()(test).fused.argmax(dim=1) == labels).float().mean().item()


@pytest.fixture
def features(seed: int) -> dict[str, EncoderOutput]:
    return make_features()


@pytest.fixture
def dims() -> dict[str, int]:
    return dict(DIMS)


@pytest.fixture
def out_dim() -> int:
    return OUT


@pytest.fixture
def fixed_init() -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    return fixed_init_


@pytest.fixture
def new_padding() -> Callable[[dict[str, EncoderOutput]], dict[str, EncoderOutput]]:
    return with_new_padding


@pytest.fixture
def gradients_and_determinism() -> Callable[[nn.Module, dict[str, EncoderOutput]], None]:
    return assert_every_gradient_and_determinism


@pytest.fixture
def feature_factory(seed: int) -> Callable[..., dict[str, EncoderOutput]]:
    return make_features


@pytest.fixture
def interaction_accuracy(seed: int) -> Callable[..., float]:
    return fit_interaction
