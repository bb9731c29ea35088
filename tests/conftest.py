"""Shared fixtures: a seed, an isolated feature cache, offline Hugging Face."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory):
    """Module-scoped fixtures (a trained run) are set up before `_isolated_cache`: never the user's cache either."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MMFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("session-feature-cache")))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own feature cache directory, never the user's."""
    monkeypatch.setenv("MMFUSE_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))


@pytest.fixture
def seed() -> int:
    torch.manual_seed(0)
    return 0
