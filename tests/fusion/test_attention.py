"""`mmfuse.fusion.attention` shared pieces: `auto_spatial` and `TokenPositions` (the fusion tests cover the rest)."""

from __future__ import annotations

import pytest
import torch

from mmfuse.fusion.attention import TokenPositions, auto_spatial
from mmfuse.fusion.positional import sincos_1d, sincos_2d


def test_auto_spatial_is_the_image_modality_when_built_directly() -> None:
    assert auto_spatial("auto", ["image", "text"]) == "image"
    assert auto_spatial("auto", ["photo", "text"]) is None
    assert auto_spatial("photo", ["photo", "text"]) == "photo" and auto_spatial(None, ["image"]) is None


def test_token_positions_are_2d_on_the_grid_1d_elsewhere_and_zero_when_off() -> None:
    positions = TokenPositions("f", "output_dim", 8, True, "image", (2, 3), ["image", "text"])
    image, text = torch.zeros(1, 6, 5), torch.zeros(1, 4, 7)
    assert torch.equal(positions("image", image), sincos_2d(2, 3, 8))
    assert torch.equal(positions("text", text), sincos_1d(torch.arange(4.0), 8))
    assert TokenPositions("f", "output_dim", 8, False, "image", None, ["image", "text"])("image", image) == 0.0


def test_token_positions_check_their_options_when_made() -> None:
    with pytest.raises(ValueError, match=r"f positions need hidden_dim \(6\) divisible by 4"):
        TokenPositions("f", "hidden_dim", 6, True, "image", None, ["image", "text"])
    with pytest.raises(ValueError, match="f spatial='photo' is not one of"):
        TokenPositions("f", "hidden_dim", 8, True, "photo", None, ["image", "text"])
