"""Modality dropout: hide whole modalities of random training samples, so the model cannot lean on one.

Each modality m of each sample is dropped with probability p_m, independently; a sample that would
lose every modality it has keeps one of them, chosen uniformly at random. That re-keeping lowers the
realised rate slightly: with M modalities all at rate p it is p - p^M / M (0.18 for p = 0.2, M = 2).
The model turns a dropped modality into exact zeros (`EncoderOutput.without`).

Shapes: B batch, M modalities.
"""

from __future__ import annotations

import torch

from mmfuse.balance.base import BALANCERS, Balancer, Tensors


@BALANCERS.register("modality_dropout")
class ModalityDropout(Balancer):
    """Drop each modality of each training sample with probability `p`; never drop all of a sample's modalities.

    Args:
        modalities: the model's modality names.
        p: the drop probability, one for all modalities or {modality: p} (modalities left out: 0).
        seed: seeds the sampling (None: torch's global RNG).

    Logs `drop/<modality>`: the fraction of samples whose modality the last `absent` call dropped.
    """

    drops_modalities = True

    def __init__(self, modalities: list[str], p: float | dict[str, float] = 0.2, seed: int | None = None) -> None:
        super().__init__(modalities)
        rates = dict(p) if isinstance(p, dict) else {m: float(p) for m in self.modalities}
        unknown = sorted(set(rates) - set(self.modalities))
        if unknown:
            raise ValueError(f"modality_dropout: unknown modality(ies) {unknown} in p; modalities: {self.modalities}")
        bad = {m: r for m, r in rates.items() if not 0.0 <= r <= 1.0}
        if bad:
            raise ValueError(f"modality_dropout: p must be in [0, 1], got {bad}")
        self.rates = [float(rates.get(m, 0.0)) for m in self.modalities]
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def absent(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        training: bool = True,
        missing: Tensors | None = None,
    ) -> dict[str, torch.Tensor] | None:
        if not training or not any(self.rates):
            return None
        b, m = batch_size, len(self.modalities)
        available = torch.ones(b, m, dtype=torch.bool)
        if missing is not None:
            for i, name in enumerate(self.modalities):
                if name in missing:
                    available[:, i] = ~missing[name].detach().bool().cpu()
        drop = (torch.rand(b, m, generator=self.generator) < torch.tensor(self.rates)) & available  # (B, M)
        lost = available.any(1) & ~(available & ~drop).any(1)  # (B,) every available modality dropped
        if bool(lost.any()):
            pick = torch.rand(b, m, generator=self.generator).masked_fill(~available, -1.0).argmax(1)  # (B,)
            rows = lost.nonzero().squeeze(1)
            drop[rows, pick[rows]] = False
        self.absent_logs = {f"drop/{name}": float(drop[:, i].float().mean()) for i, name in enumerate(self.modalities)}
        return {name: drop[:, i].to(device) for i, name in enumerate(self.modalities)}
