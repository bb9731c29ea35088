"""Property-based fuzzing of every input layer (issue 10): mutated records and configs either work or fail
with one documented line, and nothing is ever read from outside the allowed folders.

The bulk (well over 1,000 mutated records and 1,000 mutated configs per run) goes through the in-process
layers: records reading + schema, up-front validation, dataset loading + collation; config parsing and the
cheap builders. A handful of full `mmfuse train`/`predict` runs on tiny data confirm the CLI contract (exit 0,
or exit 2 with a single `mmfuse <cmd>: error: ...` line). Reproduce a failure with the printed seed
(`pytest tests/test_fuzz_inputs.py --hypothesis-seed=N`); run more cases with MMFUSE_FUZZ_SCALE (a multiplier).
The size/range keys and tabular/embedding records through a trained run: tests/test_fuzz_sizes_tables.py.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmfuse.builders import build_fusion, build_tasks, build_weighting
from mmfuse.cli import main
from mmfuse.config import ConfigError, apply_overrides, load_config, parse_config
from mmfuse.data import DataError, MultiModalDataset, Schema, read_records, validate_records
from mmfuse.encoders.embedding import EmbeddingEncoder
from mmfuse.encoders.hf_text import HFTextEncoder
from mmfuse.encoders.tabular import TabularEncoder
from mmfuse.encoders.torchvision_image import TorchvisionImageEncoder
from mmfuse.tasks import build_task
from tiny import run_config, write_dataset

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MIN_EXAMPLES = 1000
SCALE = max(1.0, float(os.environ.get("MMFUSE_FUZZ_SCALE", "1")))  # more cases by hand: MMFUSE_FUZZ_SCALE=20


# ---------------------------------------------------------------------- a data folder, and files outside it
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`root`: the data folder (good/truncated images, a folder, .npy files); `outside`: a sibling folder with a
    valid image and .npy, so an escape that confinement missed would succeed (and be seen) rather than fail."""
    base = tmp_path_factory.mktemp("fuzz")
    root, outside = base / "data", base / "outside"
    for folder in (root / "images", root / "vectors", outside):
        folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (10, 12), (40 * i, 90, 200)).save(root / "images" / f"{i}.png")
        np.save(root / "vectors" / f"{i}.npy", np.arange(3, dtype=np.float32) + i)
    noise = root / "images" / "truncated.png"
    Image.effect_noise((64, 64), 60).convert("RGB").save(noise)
    noise.write_bytes(noise.read_bytes()[:400])
    (root / "images" / "folder.png").mkdir()
    (root / "images" / "not_an_image.png").write_text("hello")
    np.save(root / "vectors" / "wrong_dim.npy", np.zeros(5, dtype=np.float32))
    np.save(root / "vectors" / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    Image.new("RGB", (10, 12), (1, 2, 3)).save(outside / "secret.png")
    np.save(outside / "secret.npy", np.ones(3, dtype=np.float32))
    (outside / "secret.txt").write_text("outside")
    return {"root": root, "outside": outside}


@pytest.fixture(scope="module")
def encoders() -> dict[str, Any]:
    return {
        "image": TorchvisionImageEncoder("resnet18", image_size=8),
        "text": HFTextEncoder(config=TINY_BERT, max_length=16),
        "vec": EmbeddingEncoder(dim=3),
        "table": TabularEncoder(numeric=["age"], categorical=["city"]),
    }


def tasks() -> dict[str, Any]:
    return {
        "label": build_task("label", "multiclass", classes=["cat", "dog", "fox"]),
        "flag": build_task("flag", "binary"),
        "tags": build_task("tags", "multilabel", classes=["a", "b", "c"]),
        "score": build_task("score", "regression"),
    }


@contextlib.contextmanager
def recorded_opens() -> Iterator[list[str]]:
    """Every path opened through `open`/`io.open`/`os.open` (PIL, numpy, pathlib all go through them)."""
    opened: list[str] = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def note(file: Any) -> None:
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.abspath(os.fsdecode(file)))

    def wrap_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        note(file)
        return real_open(file, *args, **kwargs)

    def wrap_os_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        note(path)
        return real_os_open(path, *args, **kwargs)

    builtins.open, io.open, os.open = wrap_open, wrap_open, wrap_os_open
    try:
        yield opened
    finally:
        builtins.open, io.open, os.open = real_open, real_io_open, real_os_open


def allowed_dirs(root: Path) -> list[str]:
    """The data folder, the package and the interpreter (venv and its standard library), the feature cache."""
    import mmfuse

    dirs = [root, Path(mmfuse.__file__).parent, sys.prefix, sys.base_prefix, os.environ["MMFUSE_CACHE_DIR"]]
    return [os.path.abspath(d) for d in dirs]


def assert_inside(opened: list[str], allowed: list[str]) -> None:
    for path in opened:
        assert any(os.path.commonpath([d, path]) == d for d in allowed), f"opened {path} outside {allowed}"


def assert_one_line(err: BaseException, prefix: str) -> None:
    text = str(err)
    assert "\n" not in text and "\r" not in text, repr(text[:300])
    assert text.startswith(prefix), (prefix, text[:300])


# ---------------------------------------------------------------------- record mutations
BASE = {
    "image": "images/0.png",
    "text": "a red square",
    "vec": [0.1, 0.2, 0.3],
    "age": 31,
    "city": "paris",
    "label": "cat",
    "flag": 1,
    "tags": "a|b",
    "score": 0.5,
}
PATH_FIELDS = ("image", "vec")
ESCAPES = [
    "../outside/secret.png",
    "../../outside/secret.png",
    "images/../../outside/secret.png",
    "~/x.png",
    "~",
    "/etc/hostname",
    "OUTSIDE/secret.png",  # replaced by the absolute path of the outside folder
    "OUTSIDE/secret.npy",
    "../outside/secret.npy",
    "vectors/../../outside/secret.npy",
]
GOOD_FILES = ["images/1.png", "images/2.png", "./images/0.png", "images//1.png", "vectors/1.npy", "vectors/2.npy"]
BAD_FILES = [
    "images/nope.png",
    "images/truncated.png",
    "images/folder.png",
    "images/not_an_image.png",
    "vectors/wrong_dim.npy",
    "vectors/objects.npy",
    "vectors/0.txt",
    "x" * 300 + ".png",
    "images/" + "y" * 256,
    "a/" * 3000 + "b.png",
    "images/\x00.png",
    "images/\ud800.png",
    ".",
    "images",
]
LABEL_VALUES = ["cat", "dog", "wolf", "", "  ", "CAT", "a|b", "a|z", "a||b", "true", "maybe", "yes", 0, 1, 2, -1]
NUMBERS = [0.5, -3, 1e308, -1e39, 3.5e38, 10**400, -(10**30), 1e-320, math.nan, math.inf, -math.inf]

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(LABEL_VALUES + NUMBERS + ESCAPES + GOOD_FILES + BAD_FILES),
)
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
)
text_value = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\ud800 lone", "ok \udfff", "\ufeffbom text", "\x00nul", "a" * 5000, " \t\n ", "\u202e rtl"]),
)


def certainly_bad(rec: dict[str, Any]) -> bool:
    """What the oracle knows must be refused: a required field absent, a path escape, a non-finite score."""
    if any(key not in rec for key in ("image", "text", "vec")):
        return True
    if any(isinstance(rec[key], str) and rec[key] in ESCAPES for key in PATH_FIELDS):
        return True
    score = rec.get("score")
    return isinstance(score, bool) or (isinstance(score, float) and not abs(score) <= 3.4e38)


@st.composite
def mutated_record(draw: st.DrawFn) -> tuple[str, bool]:
    """One line of a JSONL file, and whether the record is certainly bad (must be refused)."""
    rec: dict[str, Any] = dict(BASE)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(list(BASE)))
        action = draw(st.sampled_from(["delete", "misspell", "value", "escape", "file", "text", "number", "label"]))
        if key not in rec and action not in ("value",):
            continue
        if action == "delete":
            del rec[key]
        elif action == "misspell":
            rec[key[::-1] if len(key) > 3 else key + "x"] = rec.pop(key)
        elif action == "value":
            rec[key] = draw(json_value)
        elif action == "escape":
            field = draw(st.sampled_from(PATH_FIELDS))
            rec[field] = draw(st.sampled_from(ESCAPES))
        elif action == "file":
            rec[draw(st.sampled_from(PATH_FIELDS))] = draw(st.sampled_from(GOOD_FILES + BAD_FILES))
        elif action == "text":
            rec["text"] = draw(text_value)
        elif action == "number":
            field = draw(st.sampled_from(["score", "age", "flag"]))
            rec[field] = draw(st.sampled_from(NUMBERS) | json_leaf)
        elif action == "label":
            rec[draw(st.sampled_from(["label", "flag", "tags"]))] = draw(st.sampled_from(LABEL_VALUES) | json_value)
    must_fail = certainly_bad(rec)
    line = json.dumps(rec)
    shape = draw(st.sampled_from(["plain"] * 12 + ["bom", "deep", "array", "garbage", "cut", "huge_int", "blank"]))
    if shape == "bom":
        line = "\ufeff" + line
    elif shape == "deep":
        depth = draw(st.sampled_from([50, 1000, 100_000]))
        line = line[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
    elif shape == "array":
        line, must_fail = "[" + line + "]", True
    elif shape == "garbage":
        line, must_fail = line[: len(line) // 2] + "}{", True
    elif shape == "cut":
        line, must_fail = line[:-1], True
    elif shape == "huge_int":
        line = line[:-1] + ', "big": ' + "9" * 5000 + "}"
        must_fail = True  # more digits than Python parses: a bad-JSON line
    elif shape == "blank":
        line, must_fail = "   ", False
    return line, must_fail and shape != "blank"


def write_lines(root: Path, lines: list[str], bom: bool, counter: list[int]) -> Path:
    counter[0] += 1
    path = root / f"fuzz_{counter[0]}.jsonl"
    text = ("\ufeff" if bom else "") + "\n".join(lines) + "\n"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return path


def test_mutated_records_are_loaded_or_refused_in_one_line(folders: dict[str, Path], encoders: dict) -> None:
    root, outside = folders["root"], folders["outside"]
    schema = Schema(encoders, labels={n: n for n in tasks()})
    the_tasks = tasks()
    allowed = allowed_dirs(root)
    stats = {"examples": 0, "records": 0, "accepted": 0, "refused": 0}
    files = [0]

    @settings(FUZZ, max_examples=int(300 * SCALE))
    @given(st.lists(mutated_record(), min_size=4, max_size=6), st.booleans(), st.booleans())
    def check(rows: list[tuple[str, bool]], bom: bool, skip: bool) -> None:
        stats["examples"] += 1
        stats["records"] += len(rows)
        lines = [line.replace("OUTSIDE", str(outside)) for line, _ in rows]
        path = write_lines(root, lines, bom, files)
        errors: list[tuple[str, str]] | None = [] if skip else None
        refused: DataError | None = None
        try:
            with recorded_opens() as opened:
                try:
                    records = read_records(path, schema, errors=errors)
                    good, bad = validate_records(records, the_tasks, encoders, skip_bad=skip)
                    dataset = MultiModalDataset(good, the_tasks, encoders)
                    items = [dataset[i] for i in range(len(dataset))]
                    for modality, encoder in encoders.items():
                        present = [it["inputs"][modality] for it in items if it["inputs"][modality] is not None]
                        if present:
                            encoder.collate(present)
                except DataError as err:
                    refused = err
            assert_inside(opened, allowed)
        finally:
            path.unlink()
        if refused is not None:
            assert_one_line(refused, str(path))
            row_error = re.match(rf"{re.escape(str(path))}:\d+: ", str(refused))
            assert not (skip and row_error), f"--skip-bad raised a row error: {refused}"
            stats["refused"] += 1
            return
        # accepted: the certainly-bad rows were refused (or listed as skipped), never loaded
        sources = {r.source for r in good}
        for number, (_, must_fail) in enumerate(rows, start=1):
            if must_fail:
                assert f"{path}:{number}" not in sources, f"row {number} should have been refused: {lines[number - 1]}"
        if skip:
            listed = len(errors or []) + len(bad)
            assert listed + len(good) == sum(1 for line in lines if line.strip()), "a row neither loaded nor listed"
        stats["accepted"] += 1

    check()
    print(f"records fuzz: {stats}")
    assert stats["records"] >= MIN_EXAMPLES, stats
    assert stats["accepted"] > 20 and stats["refused"] > 20, stats  # both outcomes are exercised


@pytest.mark.parametrize(
    ("cell", "message"),
    [(10**400, "integer of 1329 bits is too large"), (1e300, "not a finite number"), ("1e39", "not a finite number")],
)
def test_a_numeric_cell_beyond_float32_is_one_line(cell: Any, message: str) -> None:
    """Regression (found by the fuzzer): a 400-digit integer in a tabular cell was an OverflowError traceback."""
    from mmfuse.encoders.base import DataRoot, InputError

    encoder = TabularEncoder(numeric=["age"], categorical=["city"])
    with pytest.raises(InputError, match=message):
        encoder.read({"age": cell, "city": "x"}, "table", DataRoot(Path(".")))


# ---------------------------------------------------------------------- config mutations
def base_config() -> dict[str, Any]:
    cfg = run_config(Path("records.jsonl"))
    cfg["train"]["weighting"] = {"name": "equal"}
    return cfg


SECTION_PATHS = [
    (),
    ("model",),
    ("model", "fusion"),
    ("model", "encoders", "image"),
    ("model", "encoders", "text"),
    ("model", "head"),
    ("tasks",),
    ("tasks", "color"),
    ("tasks", "size"),
    ("data",),
    ("train",),
    ("train", "weighting"),
]
NAMES = ["type", "train", "to", "half", "float", "cuda", "training", "", "a.b", "ok_name", "ünï", " ", "-rf", "x" * 300]
CONFIG_VALUES = [
    None,
    True,
    0,
    -1,
    10**30,
    1.5,
    math.nan,
    "many",
    "",
    [],
    {},
    [1, 2],
    {"a": 1},
    "resnet9000",
    "attention",
    "ranking",
    "!!python/object/apply:os.system",
    "../x",
    "/abs",
    "bf15-mixed",
    "tpu",
]
COMPONENT_OPTIONS = ["gate", "image_size", "sed", "model", "output_dim", "freeze", "hidden_dims", "name", "field"]


def _node(cfg: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = cfg
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


@st.composite
def mutated_config(draw: st.DrawFn) -> dict[str, Any]:
    cfg = base_config()
    for _ in range(draw(st.integers(1, 3))):
        node = _node(cfg, draw(st.sampled_from(SECTION_PATHS)))
        if node is None:
            continue
        action = draw(st.sampled_from(["unknown", "value", "delete", "rename", "option", "name", "misspell"]))
        keys = list(node)
        if action == "unknown":
            node[draw(st.text(min_size=1, max_size=12))] = draw(json_value)
        elif action == "value" and keys:
            node[draw(st.sampled_from(keys))] = draw(st.sampled_from(CONFIG_VALUES) | json_value)
        elif action == "delete" and keys:
            del node[draw(st.sampled_from(keys))]
        elif action == "misspell" and keys:
            key = draw(st.sampled_from(keys))
            node[key[:-1] + "x"] = node.pop(key)
        elif action == "option":
            node[draw(st.sampled_from(COMPONENT_OPTIONS))] = draw(st.sampled_from(CONFIG_VALUES) | json_leaf)
        elif action == "name":
            where = draw(st.sampled_from(["tasks", "encoders", "run"]))
            name = draw(st.sampled_from(NAMES) | st.text(max_size=8))
            if where == "tasks" and isinstance(cfg.get("tasks"), dict):
                cfg["tasks"][name] = cfg["tasks"].pop("color", {"kind": "multiclass"})
            elif where == "encoders" and isinstance(cfg.get("model"), dict):
                encoders = cfg["model"].get("encoders")
                if isinstance(encoders, dict) and "text" in encoders:
                    encoders[name] = encoders.pop("text")
            else:
                cfg["name"] = name
    return cfg


def _build_cheap(cfg: Any) -> None:
    """The builders that need no network weights: tasks (with classes), fusion, weighting."""
    classes = {n: ["a", "b"] for n, t in cfg.tasks.items() if t.kind in ("multiclass", "multilabel")}
    built = build_tasks(cfg.tasks, classes)
    sizes = [v for v in cfg.model.fusion.options.values() if isinstance(v, int) and not isinstance(v, bool)]
    if all(v <= 2**16 or v >= 2**40 for v in sizes):  # (sizes in between allocate gigabytes, slowly)
        build_fusion(cfg.model.fusion, {m: 8 for m in cfg.model.encoders})
    build_weighting(cfg.train.weighting, built)


def test_mutated_configs_are_accepted_or_refused_in_one_line(tmp_path: Path) -> None:
    stats = {"examples": 0, "accepted": 0, "refused": 0}
    allowed = allowed_dirs(tmp_path)

    @settings(FUZZ, max_examples=int(MIN_EXAMPLES * SCALE))
    @given(mutated_config(), st.sampled_from(["dict", "yaml", "set"]))
    def check(data: dict[str, Any], route: str) -> None:
        stats["examples"] += 1
        try:
            with recorded_opens() as opened:
                if route == "dict":
                    cfg = parse_config(data)
                elif route == "yaml":
                    path = tmp_path / "cfg.yaml"
                    path.write_text(yaml.safe_dump(data, allow_unicode=True))
                    cfg = load_config(path)
                else:  # the same mutations as --set overrides on the base config
                    sets = [f"{k}={json.dumps(v)}" for k, v in _flatten(data)]
                    cfg = parse_config(apply_overrides(base_config(), sets))
                _build_cheap(cfg)
            assert_inside(opened, allowed)
        except ConfigError as err:
            assert "\n" not in str(err) and str(err).strip(), repr(str(err)[:300])
            stats["refused"] += 1
            return
        stats["accepted"] += 1

    check()
    print(f"config fuzz: {stats}")
    assert stats["examples"] >= MIN_EXAMPLES, stats
    assert stats["accepted"] > 20 and stats["refused"] > 200, stats


def _flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if (
        isinstance(data, dict)
        and data
        and all(isinstance(k, str) and k and "." not in k and "=" not in k for k in data)
    ):
        for key, value in data.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else key)
    elif prefix:
        yield prefix, data


def test_config_faults_found_by_the_fuzzer_are_one_line() -> None:
    """Regressions: a `name` key in a task was a TypeError; a key with a newline broke the one line; a fusion
    size torch cannot allocate was a TypeError."""
    cfg = base_config()
    cfg["tasks"]["color"]["name"] = True
    with pytest.raises(ConfigError, match=r"^tasks.color.name: unknown key"):
        parse_config(cfg)
    for where in ((), ("model", "fusion")):  # a key with a newline: shown as its repr, still one line
        cfg = base_config()
        _node(cfg, where)["bad\nkey"] = 1
        with pytest.raises(ConfigError, match=r"bad\\nkey'?: unknown") as info:
            parse_config(cfg)
        assert "\n" not in str(info.value)
    cfg = base_config()
    cfg["model"]["fusion"]["output_dim"] = 10**30  # now refused by the schema's range, before any builder
    with pytest.raises(ConfigError, match=r"^model.fusion.output_dim: must be an integer from 1 to "):
        parse_config(cfg)
    cfg["model"]["fusion"] = {"name": "bilinear", "output_dim": 2**20, "hidden_dim": 2**20, "factor": 2**20}
    with pytest.raises(ConfigError, match=r"^model.fusion: "):  # in range, but more than torch can allocate
        build_fusion(parse_config(cfg).model.fusion, {"image": 8, "text": 8})


def test_a_name_field_clash_found_by_the_fuzzer_is_one_line() -> None:
    """Regression: names that clash with nn.Module attributes are refused as config errors, not tracebacks."""
    cfg = base_config()
    cfg["tasks"]["training"] = cfg["tasks"].pop("color")
    with pytest.raises(ConfigError, match="tasks.training: task name 'training' cannot name a module"):
        parse_config(cfg)


# ---------------------------------------------------------------------- the CLI, end to end
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("fuzz-cli"), n=24)


def _cli(argv: list[str], capsys: pytest.CaptureFixture, command: str) -> int:
    capsys.readouterr()
    with recorded_opens() as opened:
        code = main(argv)
    captured = capsys.readouterr()
    assert code in (0, 2), (code, captured.err[-2000:])
    if code == 2:
        err = captured.err.strip()
        assert "\n" not in err and err.startswith(f"mmfuse {command}: error: "), err
        assert "Traceback" not in captured.err
    opened_outside = [p for p in opened if "outside" in Path(p).parts and "secret" in Path(p).name]
    assert not opened_outside, f"read files outside the data folder: {opened_outside}"
    return code


@pytest.mark.slow
def test_train_and_predict_on_mutated_records_exit_0_or_one_line(
    tiny_data: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    """A few full CLI runs: mutated records in the training file and in predict's --input."""
    lines = tiny_data.read_text().splitlines()
    outcomes: list[int] = []
    runs: list[Path] = []

    @settings(max_examples=3, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, len(lines) - 1), mutated_record()), min_size=1, max_size=3))
    def train_once(changes: list[tuple[int, tuple[str, bool]]]) -> None:
        work = tmp_path_factory.mktemp("cli")
        shutil.copytree(tiny_data.parent / "images", work / "data" / "images")
        (work / "outside").mkdir()
        Image.new("RGB", (8, 8)).save(work / "outside" / "secret.png")
        rows = list(lines)
        for index, (line, _) in changes:  # the tiny set's fields: image, text and its four tasks
            rec = json.loads(lines[index])
            mutated = line.replace("OUTSIDE", str(work / "outside"))
            try:
                value = json.loads(mutated)
                rec.update({k: v for k, v in value.items() if k in ("image", "text", "size", "color")})
                rows[index] = json.dumps(rec)
            except (ValueError, AttributeError, RecursionError):
                rows[index] = mutated
        records = work / "data" / "records.jsonl"
        records.write_bytes(("\n".join(rows) + "\n").encode("utf-8", "surrogatepass"))
        cfg = run_config(records, max_epochs=1, cache_dir=str(work / "cache"))
        (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        code = _cli(["train", str(work / "cfg.yaml"), "--out", str(work / "run"), "--skip-bad"], capsys, "train")
        outcomes.append(code)
        if code == 0:
            runs.append(work / "run")

    train_once()
    print(f"CLI train exit codes: {outcomes}")
    assert outcomes, "no CLI run happened"
    if not runs:  # every fuzzed file was refused: train once on the clean data to test predict
        cfg = run_config(tiny_data, max_epochs=1)
        path = tmp_path_factory.mktemp("clean") / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert _cli(["train", str(path), "--out", str(path.parent / "run")], capsys, "train") == 0
        runs.append(path.parent / "run")
    run = runs[0]
    inputs = tmp_path_factory.mktemp("predict")
    shutil.copytree(tiny_data.parent / "images", inputs / "images")

    @settings(max_examples=4, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(mutated_record(), min_size=1, max_size=4))
    def predict_once(rows: list[tuple[str, bool]]) -> None:
        path = inputs / "in.jsonl"
        path.write_bytes(("\n".join(line for line, _ in rows) + "\n").encode("utf-8", "surrogatepass"))
        _cli(["predict", str(run), "--input", str(path), "--output", str(inputs / "out.jsonl")], capsys, "predict")

    predict_once()
