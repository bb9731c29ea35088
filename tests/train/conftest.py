"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmfuse.cli import main
from tiny import run_config, write_dataset


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-epoch run in <root>/run, its data in <root>/data and its config in <root>/cfg.yaml (one per
    test module; a module may define its own `finished`)."""
    root = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))
        records = write_dataset(root / "data", n=24)
        (root / "cfg.yaml").write_text(yaml.safe_dump(run_config(records, max_epochs=2)))
        assert main(["train", str(root / "cfg.yaml"), "--out", str(root / "run")]) == 0
    return root / "run"
