"""How a fusion that reasons over a grid reads its question: the pooled vector, or a GRU over the question's tokens.

Shapes: B batch, L question tokens, D_q their feature size (= the pooled size), Q the read question's size.

Why a reader: the mean of a frozen sentence encoder's tokens keeps *which* words a question holds but hardly
their order. Measured on the relations set (`docs/relations.md`): the mean-pooled MiniLM vectors of "is the A left
of the B?" and "is the B left of the A?" have cosine 0.995 on average, and a linear probe recovers the second
object's colour from them on 68% of held-out questions (the first's on 97%). FiLM (Perez et al. 2018) reads its
question with a GRU and uses the last state; `gru` does that over the question modality's tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.encoders.base import EncoderOutput
from mmfuse.fusion.attention import real_tokens

READERS = ("pooled", "gru")


class QuestionReader(nn.Module):
    """`pooled`: the question modality's pooled vector as it is (Q = D_q). `gru`: a one-layer GRU of width Q over its
    tokens, read at the last real token (Q = `dim`).

    The GRU runs over the padded sequence and its output is taken at each sample's last real token (padding is at
    the end, as tokenizers pad), so padding never reaches the state read and nothing needs packing. A sample with
    no real token (absent question) reads as zeros.

    Args:
        reader: "pooled" or "gru".
        input_dim: D_q.
        dim: Q for "gru" (ignored by "pooled").
        fusion: the fusion's name, for messages.
    """

    def __init__(self, reader: str, input_dim: int, dim: int, fusion: str) -> None:
        super().__init__()
        if reader not in READERS:
            raise ValueError(f"{fusion} question must be one of {', '.join(READERS)}; got {reader!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{fusion} question_dim must be an integer >= 1; got {dim!r}")
        self.reader, self.fusion = reader, fusion
        self.gru = nn.GRU(input_dim, dim, batch_first=True) if reader == "gru" else None
        self.output_dim = dim if reader == "gru" else input_dim

    @property
    def needs_tokens(self) -> bool:
        return self.gru is not None

    def forward(self, side: EncoderOutput, modality: str) -> torch.Tensor:
        """The question modality's features -> (B, Q)."""
        if self.gru is None:
            return side.pooled
        if side.tokens is None:
            raise ValueError(
                f"{self.fusion} question: gru needs {modality} tokens, but the {modality} encoder gives none: "
                "use question: pooled, or an encoder with tokens (hf_text)"
            )
        tokens, mask = real_tokens(side, modality, self.fusion)  # (B, L, D_q), (B, L)
        states, _ = self.gru(tokens)  # (B, L, Q)
        last = (mask.sum(dim=1) - 1).clamp(min=0)  # (B,): the last real token (real tokens come first)
        read = states[torch.arange(states.shape[0], device=states.device), last]  # (B, Q)
        return read * mask.any(dim=1, keepdim=True).to(read.dtype)
