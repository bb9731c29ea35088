"""Property-based fuzzing for issue 19: the size/range keys of a config, and `tabular` / `embedding` records
through a trained run's predictor. Each case either works or fails with one line; a value the oracle knows is
out of range is never accepted, and an accepted record never gets a NaN or infinite answer.

Run more cases by hand with MMFUSE_FUZZ_SCALE (a multiplier of every max_examples here and in
tests/test_fuzz_inputs.py), e.g. `MMFUSE_FUZZ_SCALE=20 pytest tests/test_fuzz_sizes_tables.py`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmfuse.builders import build_encoder, build_fusion, build_tasks
from mmfuse.cli import main
from mmfuse.config import ConfigError, apply_overrides, parse_config
from mmfuse.data import DataError
from test_trust_tabular_cli import table_config as trust_table_config
from test_trust_tabular_cli import write_table

SCALE = float(os.environ.get("MMFUSE_FUZZ_SCALE", "1"))
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INF = math.inf
BIG = 2**20  # the documented largest size (docs: config sizes); written here, not read from the code under test


def table_config(records: str = "records.jsonl") -> dict[str, Any]:
    """The tabular + embedding run of the trust tests, named `fuzz`, reading `records` (relative to its folder)."""
    cfg = trust_table_config(records)  # type: ignore[arg-type]
    cfg["name"] = "fuzz"
    return cfg


# ---------------------------------------------------------------------- the size / range keys of a config
# (path, low, high, integer, open bounds): the documented range of each key, written out independently.
RANGES: list[tuple[tuple[str, ...], float, float, bool, str]] = [
    (("seed",), 0, 2**32 - 1, True, ""),
    (("model", "encoders", "table", "dim"), 1, BIG, True, ""),
    (("model", "encoders", "table", "heads"), 1, BIG, True, ""),
    (("model", "encoders", "table", "layers"), 0, BIG, True, ""),
    (("model", "encoders", "table", "min_count"), 1, BIG, True, ""),
    (("model", "encoders", "table", "dropout"), 0, 1, False, "high"),
    (("model", "encoders", "table", "ffn_factor"), 0, INF, False, "low"),
    (("model", "encoders", "vec", "dim"), 1, BIG, True, ""),
    (("model", "encoders", "vec", "project"), 1, BIG, True, ""),
    (("model", "fusion", "output_dim"), 1, BIG, True, ""),
    (("model", "head", "dropout"), 0, 1, False, "high"),
    (("data", "batch_size"), 1, INF, True, ""),
    (("data", "eval_batch_size"), 1, INF, True, ""),
    (("data", "limit"), 1, INF, True, ""),
    (("data", "val_fraction"), 0, 1, False, "high"),
    (("data", "num_workers"), 0, INF, True, ""),
    (("train", "max_epochs"), 1, INF, True, ""),
    (("train", "lr"), 0, INF, False, "low"),
    (("train", "warmup_steps"), 0, INF, True, ""),
    (("train", "log_every_n_steps"), 1, INF, True, ""),
    (("train", "momentum"), 0, 1, False, "high"),
    (("train", "grad_clip"), 0, INF, False, ""),
    (("tasks", "spam", "weight"), 0, INF, False, ""),
]
EDGES = [0, -1, 1, 2, 3, 4, 8, BIG, BIG + 1, 2**32 - 1, 2**32, 10**30, -(10**30), 0.5, 1.0, -0.0, 1e-300, 1e300]


def out_of_range(value: Any, low: float, high: float, integer: bool, open_bound: str) -> bool:
    """What the oracle knows must be refused: a number outside the key's documented range, NaN or infinite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False  # types are pydantic's business; only numbers are judged here
    if isinstance(value, float) and not math.isfinite(value):
        return True
    if value < low or value > high:
        return True
    return (open_bound == "low" and value == low) or (open_bound == "high" and value == high)


size_value = st.one_of(
    st.sampled_from(EDGES),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([None, True, "3", "many", [], [1, 0], {}]),
)


@st.composite
def sized_config(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """A config with 1-3 size/range keys set, and whether one of them is certainly out of range."""
    cfg, chosen = table_config(), {}
    for _ in range(draw(st.integers(1, 3))):
        rule = draw(st.sampled_from(RANGES))
        chosen[rule[0]] = (draw(size_value), rule)  # a key drawn twice keeps its last value
    for path, (value, _rule) in chosen.items():
        node = cfg
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    bad = any(out_of_range(value, *rule[1:]) for value, rule in chosen.values())
    if draw(st.integers(0, 9)) == 0:
        dims = draw(st.lists(st.sampled_from([0, -2, 1, 16, BIG + 1]), max_size=3))
        cfg["model"].setdefault("head", {})["hidden_dims"] = dims
        bad |= any(not 1 <= d <= BIG for d in dims)
    if draw(st.integers(0, 19)) == 0:
        cfg["tasks"], bad = {}, True
    return cfg, bad


def _small(cfg: Any) -> bool:
    """Small enough to build in milliseconds (a transformer of width 2**20 would allocate terabytes)."""
    table = cfg.model.encoders["table"].options  # as written (a YAML "3" is validated as 3)
    sizes = [table.get("dim", 32), cfg.model.fusion.options["output_dim"], *cfg.model.head.hidden_dims]
    sizes += [float(table.get("layers", 1)) * 128, float(table.get("ffn_factor", 2.0)) * 64]  # "1e-300" * 64: text
    return max(float(v) for v in sizes) <= 512


def test_size_and_range_keys_are_checked_in_one_line() -> None:
    stats = {"examples": 0, "accepted": 0, "refused": 0, "built": 0}

    @settings(FUZZ, max_examples=int(500 * SCALE))
    @given(sized_config(), st.booleans())
    def check(case: tuple[dict[str, Any], bool], as_set: bool) -> None:
        data, bad = case
        stats["examples"] += 1
        try:
            if as_set:  # the same values as --set overrides
                sets = [f"{k}={json.dumps(v)}" for k, v in _leaves(data, table_config())]
                cfg = parse_config(apply_overrides(table_config(), sets))
            else:
                cfg = parse_config(data)
            if _small(cfg):
                encoders = {m: build_encoder(m, e) for m, e in cfg.model.encoders.items()}
                build_fusion(cfg.model.fusion, {m: e.output_dim for m, e in encoders.items()})
                build_tasks(cfg.tasks, {"kind": ["a", "b"]})
                stats["built"] += 1
        except ConfigError as err:
            assert "\n" not in str(err) and str(err).strip(), repr(str(err)[:300])
            stats["refused"] += 1
            return
        assert not bad, f"accepted an out-of-range value: {data}"
        stats["accepted"] += 1

    check()
    print(f"size fuzz: {stats}")
    assert stats["accepted"] > 20 and stats["refused"] > 100 and stats["built"] > 10, stats


def _leaves(data: Any, like: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) where `data` differs from `like` (a whole value where the shapes differ)."""
    if isinstance(data, dict) and isinstance(like, dict) and data:
        out = []
        for key, value in data.items():
            out += _leaves(value, like.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if data == like and type(data) is type(like) else [(prefix, data)]


# ---------------------------------------------------------------------- tabular and embedding records, predicted
@pytest.fixture(scope="module")
def table_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-table")
    records = write_table(root)  # the trust tests' 32 rows
    (root / "cfg.yaml").write_text(yaml.safe_dump(table_config(str(records))))
    assert main(["train", str(root / "cfg.yaml"), "--out", str(root / "run")]) == 0
    return root / "run"


FAR = [1e30, -1e30, 3e38, -3e38, 1e5, 1e4, 3e3, 1e200, 10**40, 1e-300, 0.0, 4.0, math.nan, math.inf, -math.inf]
TEXTS = ["1e30", "-1e30", "nan", "inf", "3", " 4.5 ", "", "abc", "1e39", "0x10"]
cell = st.one_of(
    st.sampled_from(FAR + TEXTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**50), 10**50),
    st.none(),
    st.booleans(),
    st.sampled_from([[1], {"a": 1}, "wood", "steel", "plastic", 7]),
)
vector = st.one_of(
    st.lists(st.sampled_from(FAR) | st.floats(allow_nan=True, allow_infinity=True), min_size=3, max_size=3),
    st.lists(st.floats(-10, 10), min_size=0, max_size=5),
    st.sampled_from([None, "", "vec.npy", "[1,2,3]", {"a": 1}, [[1, 2, 3]], [1, "2", 3], [True, 0, 1]]),
)


@st.composite
def table_record(draw: st.DrawFn) -> dict[str, Any]:
    rec: dict[str, Any] = {"weight_kg": 3.0, "material": "wood", "vec": [0.1, 0.2, 0.3]}
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["weight", "material", "vec", "delete", "nest", "extra"]))
        if action == "weight":
            rec["weight_kg"] = draw(cell)
        elif action == "material":
            rec["material"] = draw(cell)
        elif action == "vec":
            rec["vec"] = draw(vector)
        elif action == "delete" and rec:
            del rec[draw(st.sampled_from(sorted(rec)))]
        elif action == "nest":  # the table as one object under its field
            rec["table"] = {k: rec.pop(k) for k in ("weight_kg", "material") if k in rec}
        elif action == "extra":
            rec[draw(st.sampled_from(["id", "note", "spam"]))] = draw(cell)
    return rec


def certainly_refused(rec: dict[str, Any], mean: float, std: float) -> bool:
    """A finite weight more than 1000 training standard deviations away, or a vector value beyond float32."""
    table = rec.get("table") if isinstance(rec.get("table"), dict) else rec
    weight = table.get("weight_kg")
    if isinstance(weight, float | int) and not isinstance(weight, bool) and math.isfinite(weight):
        if abs(weight) <= 3.4e38 and abs((weight - mean) / std) > 1000:
            return True
    vec = rec.get("vec")
    numbers = isinstance(vec, list) and all(isinstance(v, float | int) and not isinstance(v, bool) for v in vec)
    return numbers and len(vec) == 3 and any(not math.isfinite(v) or abs(v) > 3.5e38 for v in vec)


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def test_tabular_and_embedding_records_are_answered_finitely_or_refused(table_run: Path, tmp_path: Path) -> None:
    from mmfuse.predict import Predictor

    predictor = Predictor(table_run, "cpu")
    stat = predictor.model.encoders["table"].stats["weight_kg"]
    stats = {"examples": 0, "records": 0, "answered": 0, "refused": 0, "batch_refused": 0}

    @settings(FUZZ, max_examples=int(250 * SCALE))
    @given(st.lists(table_record(), min_size=1, max_size=4))
    def check(records: list[dict[str, Any]]) -> None:
        stats["examples"] += 1
        stats["records"] += len(records)
        path = tmp_path / "in.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        errors: list[tuple[str, str]] = []
        try:
            read = predictor.records_from_file(path, errors=errors)
            good, bad = predictor.check(read, skip_bad=True)
            results = predictor.predict(good, batch_size=3)
        except DataError as err:
            assert "\n" not in str(err) and str(err).strip(), repr(str(err)[:300])
            stats["batch_refused"] += 1
            return
        for reason in [r for _, r in errors + bad]:
            assert "\n" not in reason and reason.strip(), reason
        answered = {r.source for r in good}
        for number, rec in enumerate(records, start=1):
            if certainly_refused(rec, stat["mean"], stat["std"]):
                assert f"{path}:{number}" not in answered, f"answered a record far out of range: {rec}"
        for result in results:
            assert _finite(result), f"a non-finite answer: {result}"
            assert result["spam"]["label"] in ("no", "yes"), result
        stats["answered"] += len(results)
        stats["refused"] += len(errors) + len(bad)

    check()
    print(f"table fuzz: {stats}")
    assert stats["answered"] > 20 and stats["refused"] > 20, stats
