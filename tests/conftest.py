import os

# Set before transformers / huggingface_hub are imported anywhere in the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from tests.tiny import tiny_pair


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every default-tier test gets its own empty ExpertSteer cache."""
    monkeypatch.setenv("EXPERTSTEER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Local model directories: an expert (qwen2, 64-d) and a target (llama, 48-d)."""
    return tiny_pair(tmp_path_factory.mktemp("models"))
