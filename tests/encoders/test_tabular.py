"""Tests for `mmfuse.encoders.tabular`: column tokens, standardisation, unknown and missing cells.

Shapes: B = 4 rows, N = 2 numeric columns (age, income), C = 2 categorical columns (city, plan), D = 8.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from mmfuse.encoders.tabular import MISSING, UNKNOWN, TabularEncoder, fit_table

D = 8
STATS = {"age": {"mean": 40.0, "std": 10.0}, "income": {"mean": 3.0, "std": 2.0}}
VOCAB = {"city": ["oslo", "paris", "rome"], "plan": ["free", "pro"]}
FITTED = {"numeric": list(STATS), "categorical": list(VOCAB), "stats": STATS, "categories": VOCAB}
ROWS = [
    {"age": 30, "income": "5.5", "city": "paris", "plan": "pro"},
    {"age": None, "income": 1, "city": "tokyo", "plan": ""},  # missing age, unseen city, missing plan
    {"age": "52", "income": float("nan"), "city": "oslo", "plan": "free"},  # NaN income is missing
    {"age": 41.5, "city": "rome"},  # income and plan absent from the row
]


def fixed(*shape: int, start: int = 0) -> torch.Tensor:
    """Deterministic values in [-0.3, 0.3] from arange (period 13, so no two small rows are equal)."""
    n = math.prod(shape)
    return ((torch.arange(n, dtype=torch.float32) + start) % 13 - 6).reshape(shape) * 0.05


def fixed_init_(module: nn.Module) -> dict[str, torch.Tensor]:
    values = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            values[name] = fixed(*p.shape, start=5 * i)
            p.copy_(values[name])
    return values


def build(**kwargs) -> TabularEncoder:
    return TabularEncoder(**{**FITTED, "dim": D, "heads": 2, **kwargs})


def batch(encoder: TabularEncoder, rows: list[dict] = ROWS) -> dict[str, torch.Tensor]:
    return encoder.collate([encoder.preprocess(r) for r in rows])


def tokenizer_reference(w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The column tokens of ROWS by hand: (B, 4, D), numeric (age, income) then categorical (city, plan)."""
    age = [30.0, None, 52.0, 41.5]
    income = [5.5, 1.0, None, None]
    city = ["paris", None, "oslo", "rome"]
    city = [2 + VOCAB["city"].index("paris"), UNKNOWN, 2 + 0, 2 + 2]  # tokyo was never seen: unknown
    plan = [2 + 1, MISSING, 2 + 0, MISSING]
    rows = []
    for b in range(4):
        toks = []
        for j, (col, x) in enumerate((("age", age[b]), ("income", income[b]))):
            if x is None:
                toks.append(w["num_missing"][j])
            else:
                z = (x - STATS[col]["mean"]) / STATS[col]["std"]
                toks.append(z * w["num_weight"][j] + w["num_bias"][j])
        table = w["cat_embedding.weight"]
        toks.append(table[city[b]])
        toks.append(table[2 + len(VOCAB["city"]) + plan[b]])  # plan's rows follow city's 2 + 3 rows
        rows.append(torch.stack(toks))
    return torch.stack(rows)


def test_shapes_and_output_dim(seed) -> None:
    encoder = build()
    out = encoder(batch(encoder))
    assert encoder.output_dim == D == encoder.num_weight.shape[-1]
    assert out.pooled.shape == (4, D) and out.tokens.shape == (4, 1 + 4, D) and out.mask is None
    flat = build(layers=0)(batch(encoder))
    assert flat.pooled.shape == (4, D) and flat.tokens.shape == (4, 4, D)


def test_golden_tokens_with_fixed_weights() -> None:
    encoder = build(layers=0)
    w = fixed_init_(encoder)
    expected = tokenizer_reference(w)
    out = encoder(batch(encoder))
    torch.testing.assert_close(out.tokens, expected)
    torch.testing.assert_close(out.pooled, expected.mean(1))


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def transformer_reference(w: dict[str, torch.Tensor], tokens: torch.Tensor, heads: int) -> torch.Tensor:
    """One pre-norm transformer layer (attention, GELU feed-forward) and the final LayerNorm, by hand."""
    p = {k.removeprefix("transformer.layers.0."): v.double() for k, v in w.items()}
    x = torch.cat([p["cls"].expand(tokens.shape[0], 1, -1), tokens.double()], dim=1)  # (B, T, D)
    h = _layer_norm(x, p["norm1.weight"], p["norm1.bias"])
    q, k, v = (h @ p["self_attn.in_proj_weight"].T + p["self_attn.in_proj_bias"]).chunk(3, dim=-1)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731  (B, H, T, D_h)
    q, k, v = split(q), split(k), split(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v  # (B, H, T, D_h)
    att = att.transpose(1, 2).reshape(x.shape)
    x = x + att @ p["self_attn.out_proj.weight"].T + p["self_attn.out_proj.bias"]
    h = _layer_norm(x, p["norm2.weight"], p["norm2.bias"])
    x = x + _gelu(h @ p["linear1.weight"].T + p["linear1.bias"]) @ p["linear2.weight"].T + p["linear2.bias"]
    return _layer_norm(x, p["norm.weight"], p["norm.bias"])


def test_golden_transformer_output_with_fixed_weights() -> None:
    encoder = build(layers=1, heads=2).eval()
    w = fixed_init_(encoder)
    expected = transformer_reference(w, tokenizer_reference(w), heads=2).float()
    out = encoder(batch(encoder))
    torch.testing.assert_close(out.tokens, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooled, expected[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"numeric": None, "stats": None}, {"categorical": None, "categories": None}],
    ids=["categorical-only", "numeric-only"],
)
def test_one_kind_of_column_only(seed, kwargs) -> None:
    encoder = build(**kwargs)
    out = encoder(batch(encoder))
    n = len(encoder.columns)
    assert n == 2 and encoder.output_dim == D and out.tokens.shape == (4, 1 + n, D)
    out.pooled.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_large_values_keep_their_precision() -> None:
    """Standardisation runs in float64: timestamps around 1.7e9 s, one second apart, stay one second apart."""
    encoder = TabularEncoder(numeric=["t"], stats={"t": {"mean": 1.7e9, "std": 1.0}}, dim=D, heads=2)
    z = [float(encoder.preprocess({"t": 1.7e9 + k})["numeric"][0]) for k in (0, 1, 2)]
    assert z == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("layers", [0, 2])
def test_gradient_reaches_every_parameter(seed, layers: int) -> None:
    encoder = build(layers=layers)
    encoder(batch(encoder)).pooled.pow(2).sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the learned "missing" token gets a gradient only where a cell was missing: age (row 1) and income (rows 2, 3)
    assert (encoder.num_missing.grad.abs().sum(-1) > 0).tolist() == [True, True]
    emb = encoder.cat_embedding.weight.grad.abs().sum(-1) > 0
    assert emb[UNKNOWN] and emb[2 + len(VOCAB["city"]) + MISSING]  # city's unknown row, plan's missing row


def test_eval_twice_is_identical(seed) -> None:
    encoder = build(layers=2, dropout=0.5).eval()
    inputs = batch(encoder)
    with torch.no_grad():
        torch.testing.assert_close(encoder(inputs).pooled, encoder(inputs).pooled, rtol=0, atol=0)


def test_fit_standardises_with_training_statistics() -> None:
    rng = np.random.default_rng(0)
    ages = rng.normal(40, 12, size=50)
    rows = [{"age": float(a) if i % 7 else None, "income": str(i % 3 + 0.25), "city": "x"} for i, a in enumerate(ages)]
    fitted = fit_table(rows, ["age", "income"], ["city"])
    kept = np.array([a for i, a in enumerate(ages) if i % 7])
    incomes = np.array([i % 3 + 0.25 for i in range(50)])
    assert fitted["stats"]["age"]["mean"] == pytest.approx(kept.mean(), rel=1e-12)
    assert fitted["stats"]["age"]["std"] == pytest.approx(kept.std(ddof=0), rel=1e-12)
    assert fitted["stats"]["income"]["mean"] == pytest.approx(incomes.mean(), rel=1e-12)
    assert fitted["stats"]["income"]["std"] == pytest.approx(incomes.std(ddof=0), rel=1e-12)
    # the standardised value a token is built from: (x - mean) / std with those statistics
    encoder = TabularEncoder(numeric=["age", "income"], stats=fitted["stats"], dim=D, heads=2, layers=0)
    with torch.no_grad():
        encoder.num_weight.fill_(1.0)
        encoder.num_bias.zero_()
    out = encoder(encoder.collate([encoder.preprocess({"age": 70.0, "income": 0.25})]))
    expected_age = (70.0 - kept.mean()) / kept.std()
    torch.testing.assert_close(out.tokens[0, 0], torch.full((D,), expected_age, dtype=torch.float32))


def test_fit_vocabulary_min_count_and_constant_column() -> None:
    rows = [{"c": c, "k": 5} for c in ["b", "a", "b", "c", None, "b", "a"]]
    fitted = fit_table(rows, ["k"], ["c"], min_count=2)
    assert fitted["categories"] == {"c": ["a", "b"]}  # "c" seen once: unknown bucket
    assert fitted["stats"]["k"] == {"mean": 5.0, "std": 1.0}  # constant column: std 1, no division by zero
    with pytest.raises(ValueError, match="column 'k': no numeric value"):
        fit_table([{"k": None}, {"k": ""}], ["k"], [])


def test_unknown_category_goes_to_the_unknown_bucket(seed) -> None:
    encoder = build(layers=0)
    a, b, seen = (
        encoder.preprocess({"age": 1, "income": 1, "city": c, "plan": "pro"}) for c in ("tokyo", "lima", "rome")
    )
    assert a["categorical"][0] == b["categorical"][0] == UNKNOWN and seen["categorical"][0] == 2 + 2
    out = encoder(encoder.collate([a, b, seen]))
    torch.testing.assert_close(out.tokens[0], out.tokens[1], rtol=0, atol=0)  # any unseen value: the same token
    assert not torch.equal(out.tokens[0, 2], out.tokens[2, 2])


def test_category_keys_agree_between_csv_and_json() -> None:
    encoder = TabularEncoder(categorical=["n"], categories={"n": ["3", "true"]}, dim=D, heads=2)
    codes = [int(encoder.preprocess({"n": v})["categorical"][0]) for v in ("3", 3, 3.0, " 3 ", True, "true")]
    assert codes == [2, 2, 2, 2, 3, 3]


@pytest.mark.parametrize("cell", [None, "", "  ", float("nan")])
def test_missing_numeric_cell_is_the_columns_missing_token(seed, cell) -> None:
    encoder = build(layers=0)
    item = encoder.preprocess({"age": cell, "income": 2, "city": "rome", "plan": None})
    assert item["numeric_present"].tolist() == [False, True] and item["categorical"][1] == MISSING
    assert torch.isfinite(item["numeric"]).all()
    out = encoder(encoder.collate([item]))
    torch.testing.assert_close(out.tokens[0, 0], encoder.num_missing[0].detach(), rtol=0, atol=0)
    assert torch.isfinite(out.pooled).all()


def test_all_cells_missing_gives_finite_output(seed) -> None:
    encoder = build()
    out = encoder(batch(encoder, [{}, {"age": None}]))
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.tokens).all()


@pytest.mark.parametrize(
    ("cell", "message"),
    [("abc", "column 'age': 'abc' is not a number"), ("inf", "not a finite number"), (True, "expected a number")],
)
def test_bad_numeric_cell_is_one_line(cell, message) -> None:
    with pytest.raises(ValueError, match=message):
        build().preprocess({"age": cell})


def test_rebuilt_from_the_stored_options_gives_the_same_output(seed, tmp_path) -> None:
    columns = {"numeric": ["age", "income"], "categorical": ["city", "plan"], "dim": D, "heads": 2}
    fitted = fit_table(ROWS, columns["numeric"], columns["categorical"])
    encoder = TabularEncoder(**columns, **fitted).eval()
    stored = yaml.safe_load(yaml.safe_dump({**columns, **encoder.options()}))  # as in a run's config.yaml
    assert stored["stats"] == fitted["stats"] and stored["categories"] == fitted["categories"]
    again = TabularEncoder(**stored).eval()
    again.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(batch(again)).pooled, encoder(batch(encoder)).pooled, rtol=0, atol=0)
    assert again.cache_key() == encoder.cache_key()


def test_unfitted_encoder_refuses_to_run() -> None:
    encoder = TabularEncoder(numeric=["age"], categorical=["city"], dim=D, heads=2)
    assert not encoder.fitted
    with pytest.raises(RuntimeError, match="not fitted"):
        encoder(batch(encoder, [{"age": 1, "city": "x"}]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"numeric": None, "categorical": None, "stats": None, "categories": None}, "at least one column"),
        ({"categorical": ["age", "city", "plan"]}, r"column\(s\) \['age'\] are both numeric and categorical"),
        ({"dim": 6, "heads": 4}, "not divisible"),
        (
            {"stats": {**STATS, "age": {"mean": 1.0, "std": 0.0}}},
            r"stats.age: needs a finite mean and a finite std > 0",
        ),
        ({"stats": {**STATS, "age": {"std": 1.0}}}, r"stats.age: needs a finite mean"),
        ({"stats": {"age": STATS["age"]}}, r"stats has no entry for column\(s\) \['income'\]"),
        ({"categories": {**VOCAB, "town": ["x"]}}, r"categories names column\(s\) \['town'\] not in `categorical`"),
    ],
)
def test_bad_options_raise(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        build(**kwargs)


# ---------------------------------------------------------------------- data side
def test_read_takes_flat_csv_cells_or_a_nested_object(tmp_path) -> None:
    from mmfuse.encoders.base import DataRoot

    encoder, root = build(), DataRoot(tmp_path)
    assert encoder.modality == "tabular" and encoder.has_tokens
    assert encoder.fields("table") == ["table", "age", "income", "city", "plan"]
    csv_row = {"age": "30", "income": "5.5", "city": " paris ", "plan": "", "other": "x"}
    json_row = {"table": {"age": 30, "income": 5.5, "city": "paris", "plan": None}}
    ref = encoder.read(csv_row, "table", root)
    assert ref == (30.0, 5.5, "paris", None) == encoder.read(json_row, "table", root)
    assert encoder.content_hash(ref) == encoder.content_hash(encoder.read(json_row, "table", root))
    assert encoder.read({"age": "", "other": 1}, "table", root) is None  # every cell missing: a missing input
    item = encoder.preprocess(encoder.load(ref))
    direct = encoder.preprocess(csv_row)
    assert all(torch.equal(item[k], direct[k]) for k in item)


def test_read_refuses_a_bad_cell_with_one_line(tmp_path) -> None:
    from mmfuse.encoders.base import DataRoot, InputError

    with pytest.raises(InputError, match=r"^column 'income': 'lots' is not a number$"):
        build().read({"age": 3, "income": "lots"}, "table", DataRoot(tmp_path))


def test_a_nested_object_without_any_column_is_refused(tmp_path) -> None:
    from mmfuse.encoders.base import DataRoot, InputError

    with pytest.raises(InputError, match=r"^field 'table' holds an object without any of the columns age, income"):
        build().read({"table": {"agee": 3}}, "table", DataRoot(tmp_path))
    assert build().read({"table": {}}, "table", DataRoot(tmp_path)) is None  # an empty object: a missing input


def test_fit_on_references_then_rebuild_from_the_options(tmp_path) -> None:
    from mmfuse.encoders.base import DataRoot

    root = DataRoot(tmp_path)
    columns = {"numeric": ["age", "income"], "categorical": ["city", "plan"], "dim": D, "heads": 2}
    unfitted = TabularEncoder(**columns)
    refs = [r for r in (unfitted.read(row, "table", root) for row in ROWS) if r is not None]
    options = unfitted.fit(refs)
    ages, incomes = np.array([30.0, 52.0, 41.5]), np.array([5.5, 1.0])
    assert options["stats"]["age"] == {"mean": pytest.approx(ages.mean()), "std": pytest.approx(ages.std())}
    assert options["stats"]["income"] == {"mean": pytest.approx(incomes.mean()), "std": pytest.approx(incomes.std())}
    assert options["categories"] == {"city": ["oslo", "paris", "rome", "tokyo"], "plan": ["free", "pro"]}
    fitted = TabularEncoder(**columns, **options)  # the builder adds the learned options to the config's
    assert fitted.fitted and fitted.fit(refs) == {}  # a loaded run is not fitted again
    partly = TabularEncoder(numeric=list(STATS), stats=STATS, categorical=["city"], dim=D, heads=2)
    partly_refs = [partly.read(row, "table", root) for row in ROWS]
    assert partly.fit(partly_refs) == {"categories": {"city": ["oslo", "paris", "rome", "tokyo"]}}  # stats kept
    items = [fitted.preprocess(fitted.load(r)) for r in refs] + [fitted.placeholder()]
    out = fitted(fitted.collate(items))
    assert out.pooled.shape == (len(refs) + 1, D) and torch.isfinite(out.pooled).all()
    assert fitted.placeholder()["numeric_present"].tolist() == [False, False]


def test_cross_attention_attends_over_the_columns(seed) -> None:
    from mmfuse.encoders.base import EncoderOutput
    from mmfuse.fusion.cross_attention import CrossAttentionFusion

    encoder = build()
    table = encoder(batch(encoder))
    query = EncoderOutput(pooled=torch.randn(4, 6), tokens=torch.randn(4, 1, 6))
    fusion = CrossAttentionFusion({"q": 6, "table": D}, 10, direction="q_to_table", num_heads=2, return_weights=True)
    out = fusion({"q": query, "table": table})
    weights = out.extras["attention"]  # (B, H, Q, T): one weight per [CLS] + column token
    assert out.fused.shape == (4, 10) and weights.shape == (4, 2, 1, 1 + 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 2, 1))
