"""`mmfuse predict` in a fresh process imports only what the run needs (checked in subprocesses; times are in
benchmarks/bench_coldstart.py): never Lightning or torchmetrics, only the run's own encoder and fusion modules
(so no timm for a run without a timm encoder, and no image encoder module for a text-only run), with the same
predictions as in-process. Registries import a component's module when its name is first asked for; `names()`
imports them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmfuse.cli import main
from mmfuse.names import table
from tiny import TINY_BERT, run_config, write_dataset

SRC = str(Path(__file__).resolve().parents[1] / "src")
TRAINING_ONLY = ["lightning", "pytorch_lightning", "torchmetrics"]

# Runs mmfuse.cli.main(argv) in a fresh interpreter; prints its exit code, stdout and the modules imported by then.
PROBE = """
import contextlib, io, json, sys
from mmfuse.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(json.loads(sys.argv[1]))
print(json.dumps({"rc": rc, "out": out.getvalue(), "modules": sorted(sys.modules)}))
"""


def _python(code: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _train(tmp: Path, encoders: dict) -> Path:
    cfg = run_config(write_dataset(tmp / "data", n=24), max_epochs=1, cache_dir=str(tmp / "cache"))
    cfg["model"]["encoders"] = encoders
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp / "cfg.yaml"), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def image_text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision resnet18 + a tiny BERT, concat fusion, the four task kinds."""
    return _train(
        tmp_path_factory.mktemp("coldstart"),
        {
            "image": {"name": "torchvision", "model": "resnet18", "image_size": 32, "freeze": True},
            "text": {"name": "hf_text", "config": TINY_BERT, "max_length": 16, "freeze": True},
        },
    )


@pytest.mark.parametrize("how", ["shorthands", "fields"])
def test_predict_imports_neither_lightning_nor_torchmetrics_nor_unused_components(
    image_text_run: Path, how: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_text_run.parent / "data"
    given = ["--image", "images/0.png", "--text", "a square"]
    if how == "fields":
        given = ["--field", "image=images/0.png", "--field", "text=a square"]
    argv = ["predict", str(image_text_run), *given]
    got = _python(PROBE, json.dumps(argv), cwd=data)
    modules = set(got["modules"])
    assert got["rc"] == 0
    assert [m for m in TRAINING_ONLY if m in modules] == []
    assert {"torch", "transformers", "mmfuse.encoders.torchvision_image", "mmfuse.fusion.concat"} <= modules
    unused = ["timm", "mmfuse.encoders.timm_image", "mmfuse.encoders.tabular", "mmfuse.fusion.relation"]
    unused += ["scipy.signal", "matplotlib"]  # (torchmetrics imported both)
    assert [m for m in unused if m in modules] == []

    monkeypatch.chdir(data)  # the same command in this process (everything imported here) prints the same predictions
    assert main(argv) == 0
    assert got["out"] == capsys.readouterr().out and "color: " in got["out"]


def test_a_text_only_run_predicts_without_any_image_encoder_module(tmp_path: Path) -> None:
    run = _train(tmp_path, {"text": {"name": "hf_text", "config": TINY_BERT, "max_length": 16, "freeze": True}})
    got = _python(PROBE, json.dumps(["predict", str(run), "--text", "is this a square?"]), cwd=tmp_path)
    assert got["rc"] == 0 and "is_question: " in got["out"]
    unused = ["timm", "mmfuse.encoders.image_common", "mmfuse.encoders.torchvision_image", *TRAINING_ONLY]
    assert [m for m in unused if m in got["modules"]] == []  # (torchvision comes with transformers' image utilities)


LAZY = """
import json, sys
from mmfuse.fusion import FUSIONS
steps = {"imported": "mmfuse.fusion.gated" in sys.modules}
steps["get"] = FUSIONS.get("gated").__name__
steps["after get"] = [m for m in ("mmfuse.fusion.gated", "mmfuse.fusion.relation") if m in sys.modules]
steps["in"] = ["sum" in FUSIONS, "mmfuse.fusion.relation" in sys.modules]
steps["names"] = FUSIONS.names()
steps["relation"] = "mmfuse.fusion.relation" in sys.modules
try:
    FUSIONS.get("nope")
except KeyError as err:
    steps["unknown"] = str(err)
print(json.dumps(steps))
"""


def test_a_registry_imports_a_components_module_on_first_use_and_all_of_them_for_names(tmp_path: Path) -> None:
    got = _python(LAZY, cwd=tmp_path)
    fusions = sorted(table()["fusion"])
    assert got["imported"] is False and got["get"] == "GatedFusion"
    assert got["after get"] == ["mmfuse.fusion.gated"]
    assert got["in"] == [True, False]
    assert got["names"] == fusions and got["relation"] is True
    assert got["unknown"] == repr(f"unknown fusion 'nope'; registered: {', '.join(fusions)}")


DOUBLED = '''
from mmfuse.fusion import FUSIONS
from mmfuse.fusion.sum import SumFusion


@FUSIONS.register("doubled_sum")
class DoubledSum(SumFusion):
    """Twice the sum fusion."""
'''

BROKEN = '''
from mmfuse.fusion import FUSIONS
from mmfuse.fusion.sum import SumFusion


@FUSIONS.register("boom")
class Boom(SumFusion):
    """Never registered: the module fails below."""


raise RuntimeError("no luck")
'''

PLUGIN_PROBE = """
import json, sys
from mmfuse.fusion import FUSIONS
out = {"doubled": FUSIONS.get("doubled_sum").__module__, "relation": "mmfuse.fusion.relation" in sys.modules}
try:
    FUSIONS.get("boom")
except Exception as err:
    out["boom"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
"""


def test_a_plugin_component_is_imported_when_asked_for_and_its_failure_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "fusion").mkdir()
    (tmp_path / "fusion" / "doubled.py").write_text(DOUBLED)
    (tmp_path / "fusion" / "broken.py").write_text(BROKEN)
    got = _python(PLUGIN_PROBE, cwd=tmp_path, env={"MMFUSE_PLUGINS": str(tmp_path)})
    assert got["doubled"] == "mmfuse.fusion.doubled" and got["relation"] is False
    assert got["boom"] == (
        f"ConfigError: MMFUSE_PLUGINS: {tmp_path / 'fusion' / 'broken.py'}: cannot import it: RuntimeError: no luck"
    )
