"""A tiny option-scored task file and a target-side steering artifact for the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from expertsteer.method.extractors import random_unit_vectors
from expertsteer.method.vectors import SteeringVectors, save_steering
from expertsteer.models.zoo import weights_identity

WORDS = ["dull", "grand", "slow", "witty", "bleak", "warm", "odd", "sharp"]


def text_task(directory: Path, rows: list[dict], name: str = "reviews") -> Path:
    """A good/bad review task over `rows` ({"text", "y"} with label words), one pool `test`."""
    (directory / f"{name}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    spec = {
        "name": name,
        "type": "classification",
        "files": {"test": f"{name}.jsonl"},
        "fields": {"question": "text", "answer": "y"},
        "answer_format": "text",
        "labels": ["bad", "good"],
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def review_task(
    directory: Path, name: str, labels: list[int], names: tuple[str, ...] = ("bad", "good")
) -> Path:
    """A review task labelled `names` (default two labels; `<name>.yaml` over `<name>.jsonl`
    in `directory`), one row per label."""
    rows = [
        {"text": f"{WORDS[i % 8]} and {WORDS[(3 * i + 1) % 8]} film {i}", "label": label}
        for i, label in enumerate(labels)
    ]
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {
        "name": name,
        "type": "classification",
        "labels": list(names),
        "instruction": "Rate this review.",
        "files": {"all": data.name},
        "fields": {"question": "text", "answer": "label"},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def target_steering(path: Path, target: str, task: str, seed: int, norm_scale: float) -> str:
    """A mean-difference steering artifact at `path` for the tiny target's block 1 (48-d): a
    seeded random unit vector with norm scale `norm_scale`."""
    vector = random_unit_vectors(1, 48, seed)[0].float()
    metadata = {
        "method": "mean_diff",
        "source": "target",
        "target_model_id": target,
        "target_weights_sha256": weights_identity(target),
        "task": task,
    }
    save_steering(path, SteeringVectors({1: vector}, {1: norm_scale}, metadata=metadata))
    return str(path)
