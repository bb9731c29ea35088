"""docs/notebook.md's example runs as written: its python block (on MMFUSE_EXAMPLE_ROWS=60 rows of each easy-VQA
split, in a fresh folder) fits, evaluates, predicts, embeds, saves, loads and exports; then its `mmfuse evaluate`
command reads the folder the example wrote."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from mmfuse.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "notebook.md"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def test_the_notebook_example_runs_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    (code,) = _blocks("python")
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {
        **os.environ,
        "MMFUSE_EXAMPLE_ROWS": "60",
        "MMFUSE_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    for task in ("answer", "question_type", "shape", "color"):
        assert f"'{task}': {{'accuracy': " in printed  # evaluate's dict
    assert "(3, 256)" in printed and "trained on 54 rows, tuned on 6" in printed  # embedding; the loaded copy
    assert (tmp_path / "runs" / "notebook_copy" / "model.safetensors").is_file()
    info = json.loads((tmp_path / "exported" / "notebook" / "export.json").read_text())
    assert info["check"]["passed"] and (tmp_path / "exported" / "notebook" / "model.pt").is_file()

    (shell,) = _blocks("bash")
    evaluate = [shlex.split(line.split("#")[0]) for line in shell.splitlines() if line.startswith("mmfuse evaluate")]
    assert evaluate, "the doc shows `mmfuse evaluate` on the folder"
    monkeypatch.chdir(tmp_path)
    for argv in evaluate:
        capsys.readouterr()
        assert main([*argv[1:], "--json"]) == 0
        assert set(json.loads(capsys.readouterr().out)) == {"answer", "question_type", "shape", "color"}
