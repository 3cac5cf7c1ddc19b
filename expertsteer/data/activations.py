"""On-disk cache of paired expert / target activations, sharded and fingerprinted.

Layout of one entry, `<cache>/activations/<fingerprint>/`:

* `<split>-<k>.safetensors` — shard k of a split: `expert [n, L_E, d_E]`, `target [n, L_T, d_T]`
  and `label [n]`, with the item ids in the metadata. Each shard is written under a temporary
  name and renamed when complete, so a restarted capture keeps finished shards and redoes
  only the rest.
* `meta.json` — written last: what was captured, with every shard's sha256 (checked on load,
  so a damaged shard of the right size is not read as data). An entry without it is incomplete.

The fingerprint hashes everything the states depend on: both models' ids and weight checksums,
chat-template use, layers, position mode, storage dtype, shard size and every item's text and
label. Any change gives a new entry; nothing else does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from expertsteer.cache import atomic_file, sha256_file
from expertsteer.data.prompts import Item
from expertsteer.errors import ExpertSteerError

META = "meta.json"
# 2: completions of steering items are part of the captured text (version 1 dropped them).
# 3: meta.json records each shard's sha256.
FORMAT_VERSION = 3
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheMismatchError(ExpertSteerError):
    """A cache entry does not hold what the request expects."""


@dataclass(frozen=True)
class ModelKey:
    """What identifies one side's activations."""

    model_id: str
    """Name the model was requested by."""
    weights_sha256: str
    """Checksum of its weights."""
    layers: tuple[int, ...]
    """Captured decoder blocks, sorted."""
    chat_template: bool | None
    """Chat-template setting (None: automatic)."""


MODEL_FIELDS = (
    "expert_model_id",
    "expert_weights_sha256",
    "target_model_id",
    "target_weights_sha256",
)
"""Which models an artifact was made for (`model_identity`)."""


def model_identity(expert: ModelKey, target: ModelKey) -> dict[str, str]:
    """The `MODEL_FIELDS` of an artifact made from the activations of these two models."""
    return {
        "expert_model_id": expert.model_id,
        "expert_weights_sha256": expert.weights_sha256,
        "target_model_id": target.model_id,
        "target_weights_sha256": target.weights_sha256,
    }


def fingerprint(
    expert: ModelKey,
    target: ModelKey,
    position: str,
    dtype: str,
    shard_size: int,
    splits: dict[str, list[Item]],
) -> str:
    """Hex digest identifying a cache entry."""
    digest = hashlib.sha256()
    header = {
        "version": FORMAT_VERSION,
        "expert": asdict(expert),
        "target": asdict(target),
        "position": position,
        "dtype": dtype,
        "shard_size": shard_size,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for split in sorted(splits):
        digest.update(f"\0split\0{split}".encode())
        for item in splits[split]:
            digest.update(json.dumps([item.id, item.prompt, item.completion, item.label]).encode())
    return digest.hexdigest()[:32]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def write_shard(
    path: Path, expert: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, ids: list[str]
) -> None:
    """Write one shard atomically; refuses non-finite activations."""
    for side, tensor in (("expert", expert), ("target", target)):
        if not torch.isfinite(tensor).all():
            raise FloatingPointError(f"non-finite {side} activations in shard {path.name}")
    tensors = {
        "expert": expert.contiguous(),
        "target": target.contiguous(),
        "label": labels.contiguous(),
    }
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ids": json.dumps(ids)})


def read_shard(path: Path, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors and ids of one shard; with `sha256`, the file must have that checksum."""
    if sha256 is not None and path.is_file() and sha256_file(path) != sha256:
        raise CacheMismatchError(
            f"cannot read activation shard {path}: its sha256 differs from the one recorded at "
            f"capture (damaged or edited); delete {path.parent} to capture again"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            ids = json.loads(handle.metadata()["ids"])
    except Exception as error:
        raise CacheMismatchError(
            f"cannot read activation shard {path}: {error}; delete {path.parent} to capture again"
        ) from error
    return tensors, ids


def shard_names(meta: dict) -> list[str]:
    """Every shard file of an entry described by `meta` (its split sizes and shard size)."""
    return [
        shard_name(split, k)
        for split, count in sorted(meta["splits"].items())
        for k in range(len(shard_ranges(count, meta["shard_size"])))
    ]


def write_meta(directory: Path, meta: dict) -> None:
    """Write `meta.json` (last: it marks the entry complete) with every shard's sha256."""
    meta = {**meta, "shard_sha256": {n: sha256_file(directory / n) for n in shard_names(meta)}}
    with atomic_file(directory / META) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(directory: Path) -> dict | None:
    path = directory / META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CacheMismatchError(f"unreadable cache metadata {path}: {error}") from error


def load_split(directory: Path, split: str, meta: dict) -> dict[str, torch.Tensor | list[str]]:
    """All shards of one split, concatenated; checked against `meta`."""
    count = meta["splits"][split]
    checksums = meta.get("shard_sha256")
    if checksums is None:
        raise CacheMismatchError(
            f"cache {directory} records no shard checksums (written by an older ExpertSteer); "
            "delete it to capture again"
        )
    names = [shard_name(split, k) for k in range(len(shard_ranges(count, meta["shard_size"])))]
    parts = [read_shard(directory / name, checksums.get(name, "")) for name in names]
    expert = torch.cat([tensors["expert"] for tensors, _ in parts])
    target = torch.cat([tensors["target"] for tensors, _ in parts])
    labels = torch.cat([tensors["label"] for tensors, _ in parts])
    ids = [i for _, shard_ids in parts for i in shard_ids]
    expected = {
        "expert": (count, len(meta["expert"]["layers"]), meta["expert"]["hidden_size"]),
        "target": (count, len(meta["target"]["layers"]), meta["target"]["hidden_size"]),
    }
    for side, tensor in (("expert", expert), ("target", target)):
        if tuple(tensor.shape) != expected[side]:
            raise CacheMismatchError(
                f"cache {directory}: {split} {side} activations have shape "
                f"{tuple(tensor.shape)}, metadata says {expected[side]}"
            )
    return {"expert": expert, "target": target, "label": labels, "id": ids}
