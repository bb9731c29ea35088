"""A table row as tokens, one per column, in the spirit of FT-Transformer (Gorishniy et al., NeurIPS 2021).

Shapes: B batch, N numeric columns, C categorical columns, D token size.

Numeric column j: standardised with the training split's mean and std (in `preprocess`, in float64),
then `z_j * W_j + b_j` (a per-column linear tokenizer); a missing cell is the column's learned
"missing" token instead, so no NaN ever reaches the network. A fitted encoder refuses (in `read`) a cell more
than `Z_MAX` standard deviations from the training mean, and `preprocess` clamps `z` to +-`Z_MAX`, so a value far
outside the training range (`weight_kg=1e30`) can never overflow the network into NaN predictions.
Categorical column j: its own embedding table over index 0 = missing, 1 = unknown (a value not
seen in training), 2.. = the training vocabulary. A [CLS] token is prepended and `layers`
pre-norm transformer layers mix the columns; the [CLS] output is the pooled vector. With
`layers: 0` the tokens are the columns' own tokens and the pooled vector is their mean.

The statistics and vocabularies are options of the encoder (`stats: {col: {mean, std}}`,
`categories: {col: [values]}`): `fit` learns them from the training split and the builder writes them
into the run's resolved config, so the config alone rebuilds exactly this encoder. The cell rules (`parse_number`,
`category_key`, `Z_MAX`, the indices `MISSING`, `UNKNOWN`, `FIRST`) are in `mmfuse.raw_inputs`, shared with the ONNX
engine.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmfuse.encoders.base import ENCODERS, Encoder, EncoderOutput
from mmfuse.raw_inputs import FIRST, Cells, DataRoot, category_key, parse_number, read_cells, table_codes, vocab_lookup

# Also named here (export/describe.py and tests import them from this module): the categorical indices and the bound.
from mmfuse.raw_inputs import MISSING as MISSING
from mmfuse.raw_inputs import UNKNOWN as UNKNOWN
from mmfuse.raw_inputs import Z_MAX as Z_MAX


def fit_table(
    rows: Iterable[Mapping[str, Any]], numeric: Iterable[str], categorical: Iterable[str], min_count: int = 1
) -> dict[str, Any]:
    """Training rows -> `{"stats": {col: {"mean", "std"}}, "categories": {col: [values]}}`.

    The std is the population std (ddof=0); a constant column gets std 1. Categories seen fewer than
    `min_count` times stay out of the vocabulary (they map to the unknown bucket); the vocabulary is sorted.

    Raises:
        ValueError: a numeric column without any value, or a cell that is not a valid number.
    """
    numeric, categorical = list(numeric), list(categorical)
    sums = {c: [0, 0.0, 0.0] for c in numeric}  # count, sum, sum of squares (of values shifted by the first one)
    shift: dict[str, float] = {}
    counts: dict[str, Counter[str]] = {c: Counter() for c in categorical}
    for row in rows:
        for c in numeric:
            x = parse_number(row.get(c), c)
            if x is not None:
                s = sums[c]
                d = x - shift.setdefault(c, x)
                s[0], s[1], s[2] = s[0] + 1, s[1] + d, s[2] + d * d
        for c in categorical:
            key = category_key(row.get(c), c)
            if key is not None:
                counts[c][key] += 1
    stats = {}
    for c, (n, s1, s2) in sums.items():
        if n == 0:
            raise ValueError(f"column {c!r}: no numeric value in the training split, so it cannot be standardised")
        var = max(s2 / n - (s1 / n) ** 2, 0.0)
        std = math.sqrt(var)
        stats[c] = {"mean": shift[c] + s1 / n, "std": std if std > 0 else 1.0}
    vocab = {c: sorted(k for k, n in counts[c].items() if n >= min_count) for c in categorical}
    return {"stats": stats, "categories": vocab}


@ENCODERS.register("tabular")
class TabularEncoder(Encoder):
    """A table row: one token per numeric or categorical column plus a pooled [CLS] vector (FT-Transformer).

    Args:
        numeric: numeric column names.
        categorical: categorical column names.
        stats: `{column: {mean, std}}` for every numeric column; learned from the training split by `fit`.
        categories: `{column: [values]}` for every categorical column; learned from the training split by `fit`.
        dim: token size D (the encoder's output_dim).
        layers: transformer layers over [CLS] + column tokens; 0 keeps the tokenizer only (pooled = mean).
        heads: attention heads per layer (must divide `dim`).
        ffn_factor: feed-forward width as a multiple of `dim`.
        dropout: dropout inside the transformer layers.
        min_count: when fitting, categories seen fewer times in training go to the unknown bucket.
        freeze: no gradients and always eval mode.
    """

    modality = "tabular"

    def __init__(
        self,
        numeric: list[str] | None = None,
        categorical: list[str] | None = None,
        stats: dict[str, dict[str, float]] | None = None,
        categories: dict[str, list[str]] | None = None,
        dim: int = 32,
        layers: int = 1,
        heads: int = 4,
        ffn_factor: float = 2.0,
        dropout: float = 0.0,
        min_count: int = 1,
        freeze: bool = False,
    ) -> None:
        super().__init__(freeze)
        self.numeric_columns = list(numeric or [])
        self.categorical_columns = list(categorical or [])
        if not self.numeric_columns and not self.categorical_columns:
            raise ValueError("tabular needs at least one column in `numeric` or `categorical`")
        both = sorted(set(self.numeric_columns) & set(self.categorical_columns))
        if both:
            raise ValueError(f"tabular: column(s) {both} are both numeric and categorical")
        if dim % heads:
            raise ValueError(f"tabular dim {dim} is not divisible by heads {heads}")
        self.min_count, self.layers_n = min_count, layers
        self.stats = _for_columns(stats, self.numeric_columns, "stats", "numeric")
        self.vocab = _for_columns(categories, self.categorical_columns, "categories", "categorical")
        self._lookup_memo: dict[str, dict[str, int]] | None = None
        self._build_tokenizer(dim)
        self.cls = nn.Parameter(torch.randn(dim) * 0.02) if layers else None
        layer = nn.TransformerEncoderLayer(
            dim, heads, int(dim * ffn_factor), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers else None
        self.norm = nn.LayerNorm(dim) if layers else None
        self.output_dim = int((self.num_weight if self.numeric_columns else self.cat_embedding.weight).shape[-1])
        self.finish_init()

    @property
    def fitted(self) -> bool:
        """True when every numeric column has statistics and every categorical column a vocabulary."""
        return (self.stats is not None or not self.numeric_columns) and (
            self.vocab is not None or not self.categorical_columns
        )

    def _build_tokenizer(self, dim: int) -> None:
        n, c = len(self.numeric_columns), len(self.categorical_columns)
        if n:
            self.num_weight = nn.Parameter(torch.randn(n, dim) / math.sqrt(dim))  # (N, D)
            self.num_bias = nn.Parameter(torch.randn(n, dim) / math.sqrt(dim))  # (N, D)
            self.num_missing = nn.Parameter(torch.randn(n, dim) / math.sqrt(dim))  # (N, D)
        sizes = [FIRST + len((self.vocab or {}).get(col, [])) for col in self.categorical_columns]
        self.register_buffer("cat_offsets", torch.tensor([sum(sizes[:j]) for j in range(c)], dtype=torch.long))
        if c:
            self.cat_embedding = nn.Embedding(sum(sizes), dim)  # (sum of the columns' sizes, D)
            nn.init.normal_(self.cat_embedding.weight, std=1 / math.sqrt(dim))
        self._check_stats()

    def _check_stats(self) -> None:
        for col, stat in (self.stats or {}).items():
            mean, std = float(stat.get("mean", math.nan)), float(stat.get("std", math.nan))
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ValueError(f"tabular stats.{col}: needs a finite mean and a finite std > 0, got {stat}")

    def options(self) -> dict[str, Any]:
        """The learned `stats` and `categories` options, as written into a run's config."""
        return {"stats": self.stats, "categories": self.vocab}

    # ------------------------------------------------------------------ data side
    @property
    def columns(self) -> list[str]:
        """Numeric then categorical columns: the order of the cells in a reference and of the tokens."""
        return self.numeric_columns + self.categorical_columns

    @property
    def has_tokens(self) -> bool:
        return True

    def fields(self, field: str) -> list[str]:
        """The columns, or `field` when it holds them as one JSON object (`{"table": {"age": 31, ...}}`)."""
        return [field, *self.columns]

    def read(self, row: Mapping[str, Any], field: str, root: DataRoot) -> Cells | None:
        """The row's cells in `columns` order (numbers parsed, categories as keys, None where missing), or None
        when every cell is missing. The cells come from `row[field]` when that is an object, else from the row.
        A fitted encoder refuses a numeric cell more than `Z_MAX` training standard deviations from the mean."""
        return read_cells(row, field, self.numeric_columns, self.categorical_columns, self.stats or {})

    def load(self, ref: Hashable) -> dict[str, Any]:
        """Cells -> `{column: cell}`, what `preprocess` takes."""
        return dict(zip(self.columns, ref, strict=True))  # type: ignore[arg-type]

    def placeholder(self) -> dict[str, torch.Tensor]:
        """A row with every cell missing."""
        return self.preprocess({})

    def fit(self, refs: Sequence[Hashable]) -> dict[str, Any]:
        """`stats` and `categories` from the training split's references, for what the config leaves out ({} when
        both are set: a loaded or resumed run keeps its options).

        Raises:
            ValueError: a column (numeric or categorical) without any value in the training split: a misspelt
                or absent column name.
        """
        refs = [r for r in refs if r is not None]
        self._check_columns_hold_values(refs)
        todo_numeric = self.numeric_columns if self.stats is None else []
        todo_categorical = self.categorical_columns if self.vocab is None else []
        if not todo_numeric and not todo_categorical:
            return {}
        fitted = fit_table((self.load(r) for r in refs), todo_numeric, todo_categorical, self.min_count)
        return {k: v for k, v in fitted.items() if v}

    def _check_columns_hold_values(self, refs: Sequence[Hashable]) -> None:
        """Every configured column holds a value in at least one training reference (else it is misspelt)."""
        empty = [c for j, c in enumerate(self.columns) if all(ref[j] is None for ref in refs)]  # type: ignore[index]
        if empty:
            kind = "numeric" if empty[0] in self.numeric_columns else "categorical"
            raise ValueError(
                f"{kind} column {empty[0]!r} has no value in any of the {len(refs)} training records: "
                "check its name against the records' fields"
            )

    def preprocess(self, raw: Mapping[str, Any], train: bool = False) -> dict[str, torch.Tensor]:
        """One row `{column: cell}` -> numeric (N,) standardised values (0 where missing), numeric_present (N,)
        bool, categorical (C,) indices (0 missing, 1 unknown, 2.. vocabulary). `train` changes nothing.

        Standardisation happens here, in float64, so large values (timestamps, prices) keep their precision; `z` is
        clamped to +-`Z_MAX`.
        """
        z, present, codes = table_codes(
            raw, self.numeric_columns, self.categorical_columns, self.stats or {}, self._lookup()
        )
        return {
            "numeric": torch.tensor(z, dtype=torch.float32),
            "numeric_present": torch.tensor(present, dtype=torch.bool),
            "categorical": torch.tensor(codes, dtype=torch.long),
        }

    def _lookup(self) -> dict[str, dict[str, int]]:
        if self._lookup_memo is None:
            self._lookup_memo = vocab_lookup(self.vocab or {})
        return self._lookup_memo

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Rows -> numeric (B, N), numeric_present (B, N), categorical (B, C)."""
        return {k: torch.stack([item[k] for item in items]) for k in ("numeric", "numeric_present", "categorical")}

    # ------------------------------------------------------------------ model side
    def tokenize(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Collated rows -> column tokens (B, N + C, D): numeric first, then categorical, in config order."""
        if not self.fitted:
            raise RuntimeError("tabular encoder is not fitted: give the column statistics or fit it on training rows")
        parts = []
        if self.numeric_columns:
            tok = inputs["numeric"].unsqueeze(-1) * self.num_weight + self.num_bias  # (B, N, D)
            present = inputs["numeric_present"].unsqueeze(-1)  # (B, N, 1)
            parts.append(torch.where(present, tok, self.num_missing.expand_as(tok)))
        if self.categorical_columns:
            parts.append(self.cat_embedding(inputs["categorical"] + self.cat_offsets))  # (B, C, D)
        return torch.cat(parts, dim=1)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> EncoderOutput:
        """Collated rows -> pooled (B, D), tokens (B, 1 + N + C, D) ([CLS] first) or (B, N + C, D) with no layers."""
        tokens = self.tokenize(inputs)
        if self.transformer is None:
            return EncoderOutput(pooled=tokens.mean(dim=1), tokens=tokens)
        cls = self.cls.expand(tokens.shape[0], 1, -1)  # (B, 1, D)
        out = self.norm(self.transformer(torch.cat([cls, tokens], dim=1)))  # (B, 1 + N + C, D)
        return EncoderOutput(pooled=out[:, 0], tokens=out)

    def cache_key(self) -> str:
        """Class, columns with their statistics and vocabularies, architecture and the weights' hash."""
        return (
            f"{type(self).__name__}:options={self.options()}:columns={self.numeric_columns}+{self.categorical_columns}"
            f":dim={self.output_dim}:layers={self.layers_n}:weights={self.weights_identity()}"
        )


def _for_columns(values: Mapping[str, Any] | None, columns: list[str], key: str, kind: str) -> dict[str, Any] | None:
    """`values` checked to name exactly `columns` (or None: not learned yet)."""
    if values is None:
        return None
    missing, extra = [c for c in columns if c not in values], [c for c in values if c not in columns]
    if missing or extra:
        what = f"has no entry for column(s) {missing}" if missing else f"names column(s) {extra} not in `{kind}`"
        raise ValueError(f"tabular {key} {what}")
    return {c: (dict(values[c]) if isinstance(values[c], Mapping) else list(values[c])) for c in columns}
