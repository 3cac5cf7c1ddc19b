"""Run artifacts: safetensors files with JSON metadata, written atomically, loaded with checks.

Every artifact carries `{"kind": ..., "version": ...}` plus stage-specific metadata (model ids
and weight checksums, layers, dims, data fingerprint). `load_artifact` refuses a file of another
kind or version and, given `expect`, any metadata value that differs, naming the field and both
values. No pickle: tensors go through safetensors, metadata through JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from expertsteer.cache import atomic_file
from expertsteer.errors import ExpertSteerError

ALIGNMENT_FILE = "alignment.safetensors"
MI_FILE = "mi.safetensors"
PAIRS_FILE = "pairs.json"
MI_HEATMAP_FILE = "mi_heatmap.png"
R2_HEATMAP_FILE = "r2_heatmap.png"
STEERING_FILE = "steering.safetensors"
METRICS_FILE = "metrics.json"
METADATA_KEY = "expertsteer"
VERSION = 1


class ArtifactError(ExpertSteerError):
    """An artifact is missing, unreadable, of another kind, or from another model / data."""


def save_artifact(
    path: str | Path, kind: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> Path:
    """Write `tensors` and `metadata` to `path` (write-then-rename: never a half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"kind": kind, "version": VERSION, **metadata}
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(contiguous, str(tmp), metadata={METADATA_KEY: json.dumps(header)})
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an artifact without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size <= 0 or size > path.stat().st_size:
                raise ValueError("bad header length")
            header = json.loads(handle.read(size))
        return json.loads(header["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise ArtifactError(
            f"{path} is not an ExpertSteer artifact (unreadable header: {error})"
        ) from error


def check_metadata(path: Path, metadata: dict[str, Any], expect: dict[str, Any]) -> None:
    for name, wanted in expect.items():
        found = metadata.get(name)
        if _normalise(found) != _normalise(wanted):
            raise ArtifactError(
                f"{path}: artifact has {name}={found!r} but this run expects {wanted!r}; "
                "it was made for another model pair, layer set or data — rerun that stage "
                "or point to the matching run directory"
            )


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value))


def load_artifact(
    path: str | Path, kind: str, expect: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of an artifact of `kind`; `expect` values must match exactly."""
    path = Path(path)
    metadata = read_metadata(path)
    if metadata.get("kind") != kind:
        raise ArtifactError(f"{path} holds a '{metadata.get('kind')}' artifact, not '{kind}'")
    if metadata.get("version") != VERSION:
        raise ArtifactError(
            f"{path} has artifact version {metadata.get('version')}; this ExpertSteer "
            f"reads version {VERSION}"
        )
    check_metadata(path, metadata, expect or {})
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ArtifactError(f"{path}: cannot read tensors ({error})") from error
    return tensors, metadata


def save_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def load_json(path: str | Path, kind: str, expect: dict[str, Any] | None = None) -> dict:
    """A JSON artifact of `kind` (same checks as `load_artifact`)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path}")
    try:
        payload = json.loads(path.read_text())
    except (ValueError, OSError) as error:
        raise ArtifactError(f"{path}: unreadable JSON ({error})") from error
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        raise ArtifactError(f"{path} is not a '{kind}' artifact")
    check_metadata(path, payload, expect or {})
    return payload
