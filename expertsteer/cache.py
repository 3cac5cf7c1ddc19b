"""The user cache directory, and the file primitives that keep it consistent.

Everything written into the cache is produced under a temporary name and renamed into place
once complete, so a killed process never leaves something that looks whole but is not. A
per-entry lock file serialises processes preparing the same entry (e.g. DDP ranks).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from expertsteer.errors import ExpertSteerError

CACHE_ENV = "EXPERTSTEER_CACHE"
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Root of the ExpertSteer cache: `$EXPERTSTEER_CACHE`, else `~/.cache/expertsteer`."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "expertsteer"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of one file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def concatenate(parts: list[Path], out: Path) -> str:
    """Write `parts` end to end into `out` (atomically) and return the sha256 of the result."""
    digest = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp, open(tmp, "wb") as sink:
        for part in parts:
            with open(part, "rb") as source:
                while block := source.read(_CHUNK):
                    digest.update(block)
                    sink.write(block)
    return digest.hexdigest()


class LockedError(ExpertSteerError):
    """Another process holds a lock this one was told not to wait for."""


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if missing), released on exit; with
    `wait=False` a lock held elsewhere raises `LockedError` at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise LockedError(f"{path} is locked by another process") from error
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the body succeeds."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates 0600, and some writers (safetensors) recreate the file with their
        # own mode: give the finished file the usual permissions (0666 minus umask), so that a
        # shared run directory or cache is readable by the group.
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; rename it to `final` on success.

    An existing `final` is replaced only after the new directory is complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    # mkdtemp creates 0700; give the final folder the usual permissions (0777 minus umask).
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        # Writers inside (e.g. safetensors' save_pretrained) may create 0600 files; the cache
        # holds every file with the usual permissions (0666 minus umask).
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                path.chmod(0o666 & ~_umask())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
