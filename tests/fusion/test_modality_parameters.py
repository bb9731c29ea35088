"""`Fusion.modality_parameters`: every registered fusion names, for each modality, parameters that only it owns.

They are what a modality balancer acts on when the encoders are frozen (cached features).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from mmfuse.fusion import FUSIONS

NAMES = FUSIONS.names()


def build(name: str, dims: dict[str, int], out_dim: int):
    cls = FUSIONS.get(name)
    opts = {"adapters": True} if "adapters" in inspect.signature(cls).parameters else {}
    return cls(dims, out_dim, **opts)


@pytest.mark.parametrize("name", NAMES)
def test_each_modality_owns_disjoint_parameters_that_read_its_input(name, dims, out_dim) -> None:
    fusion = build(name, dims, out_dim)
    all_ids = {id(p) for p in fusion.parameters()}
    owned = {m: fusion.modality_parameters(m) for m in fusion.modalities}
    seen: set[int] = set()
    for m, params in owned.items():
        ids = {id(p) for p in params}
        assert params, f"{name}: modality {m!r} owns no parameters"
        assert ids <= all_ids, f"{name}: {m!r} names parameters outside the fusion"
        assert not ids & seen, f"{name}: a parameter is claimed by two modalities"
        seen |= ids
        # The sizes differ per modality (12 vs 10): the modality's input layer is among its parameters.
        assert any(p.dim() >= 1 and dims[m] in p.shape for p in params), f"{name}: {m!r} has no layer reading D_m"
    assert seen <= all_ids


def test_unknown_modality_is_an_error(dims, out_dim) -> None:
    with pytest.raises(KeyError, match="audio"):
        build("sum", dims, out_dim).modality_parameters("audio")


@pytest.mark.parametrize("name", ["concat", "film"])
def test_adapters_start_as_the_identity(name, dims, out_dim, features) -> None:
    torch.manual_seed(0)
    plain = FUSIONS.get(name)({"image": 12, "text": 12}, 12)
    torch.manual_seed(0)
    adapted = FUSIONS.get(name)({"image": 12, "text": 12}, 12, adapters=True)
    adapted.load_state_dict(plain.state_dict(), strict=False)
    feats = {m: type(f)(pooled=torch.randn(3, 12)) for m, f in features.items()}
    torch.testing.assert_close(adapted(feats).fused, plain(feats).fused)
    # Without adapters the (target) image side owns nothing: that is what the option is for.
    assert plain.modality_parameters("image") == [] and adapted.modality_parameters("image")
