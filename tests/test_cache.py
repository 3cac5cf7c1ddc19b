import hashlib
import multiprocessing
import os
import stat
import time

import pytest

from expertsteer.cache import (
    LockedError,
    atomic_dir,
    atomic_file,
    cache_dir,
    concatenate,
    file_lock,
)


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTSTEER_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    assert cache_dir().is_dir()


def test_concatenate_writes_parts_in_order_and_returns_sha(tmp_path):
    parts = []
    for i, content in enumerate([b"GGUF", b"abc" * 1000, b"", b"end"]):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(content)
    out = tmp_path / "whole.gguf"
    digest = concatenate(parts, out)
    expected = b"GGUF" + b"abc" * 1000 + b"end"
    assert out.read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_file_leaves_nothing_when_the_body_fails(tmp_path):
    final = tmp_path / "f.bin"
    with pytest.raises(RuntimeError), atomic_file(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_the_old_version_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("v2-partial")
        raise RuntimeError("killed")
    assert (final / "a").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("v2")
    assert (final / "a").read_text() == "v2"


def _hold_lock(path, log, name):
    with file_lock(path):
        with open(log, "a") as handle:
            handle.write(f"{name}-in\n")
        time.sleep(0.3)
        with open(log, "a") as handle:
            handle.write(f"{name}-out\n")


def test_file_lock_serialises_processes(tmp_path):
    log = tmp_path / "log"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_hold_lock, args=(tmp_path / "l.lock", log, n)) for n in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    lines = log.read_text().split()
    assert len(lines) == 4
    # No interleaving: each holder leaves before the other enters.
    assert lines[0][0] == lines[1][0] and lines[2][0] == lines[3][0]


def test_cache_files_and_folders_are_group_readable_like_ordinary_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "entry") as tmp:
            (tmp / "x.bin").write_bytes(b"x")
            # A writer that makes its file private (safetensors' save_pretrained does).
            (tmp / "sub").mkdir()
            (tmp / "sub" / "model.safetensors").write_bytes(b"w")
            (tmp / "sub" / "model.safetensors").chmod(0o600)
        with atomic_file(tmp_path / "f.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "entry").stat().st_mode) == 0o755
    weights = tmp_path / "entry" / "sub" / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644


def test_lock_without_waiting_fails_at_once_while_held(tmp_path):
    with (
        file_lock(tmp_path / "l.lock"),
        pytest.raises(LockedError, match="locked"),
        file_lock(tmp_path / "l.lock", wait=False),
    ):
        pass
    with file_lock(tmp_path / "l.lock", wait=False):
        pass


def test_artifacts_written_by_safetensors_are_group_readable(tmp_path):
    """safetensors recreates the file it writes (mode 0600): the artifact still ends 0644."""
    import torch

    from expertsteer.artifacts import save_artifact

    umask = os.umask(0o022)
    try:
        save_artifact(tmp_path / "a.safetensors", "test", {"w": torch.zeros(2)}, {})
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o644
