"""Steering vectors per target layer and their artifact, `steering.safetensors`.

Tensors: `vector.<layer>` (unit direction [d_T] added at target block `<layer>`),
`directions.<layer>` (the leading eigenvectors / alternatives [k, d_T], row 0 = the vector) and
`norm_scale.<layer>` (mean residual norm s_j of that block on the dev split, so that steering
adds alpha * s_j * v with a dimensionless alpha). The JSON metadata names the method, the
models and their weight checksums, the layer pairs, the space the extractor ran in, the data
fingerprint and the fit's diagnostics. `load_steering` checks all of it against what the caller
is about to steer.

`orient` is the one sign rule of every direction: extractors, the RFM's eigenvectors, the
fitting stage and the transfer diagnostics all flip a direction so that label-1 states project
higher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertsteer.artifacts import ArtifactError, load_artifact, save_artifact

KIND = "steering"
POSITIONS = ("all", "prompt", "generated", "last_prompt")


def orient(directions: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rows [k, d] (or one direction [d]) flipped so that label-1 rows of x [n, d] project
    higher on average than label-0 rows; a tie keeps the sign. Computed in float64."""
    rows = directions if directions.ndim == 2 else directions[None]
    projections = x.double() @ rows.double().T
    gap = projections[y == 1].mean(0) - projections[y == 0].mean(0)
    signs = torch.where(gap >= 0, 1.0, -1.0).to(rows.dtype)
    oriented = rows * signs[:, None]
    return oriented if directions.ndim == 2 else oriented[0]


@dataclass
class SteeringVectors:
    """Unit steering directions for target layers, with where they came from."""

    vectors: dict[int, torch.Tensor]
    """Target layer -> unit direction [d_T]."""
    norm_scale: dict[int, float]
    """Target layer -> mean residual norm s_j on the dev split."""
    directions: dict[int, torch.Tensor] = field(default_factory=dict)
    """Target layer -> leading alternative directions [k, d_T] (row 0 is the vector)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Method, models, pairs, space, data fingerprint, diagnostics (JSON-able)."""

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ValueError("SteeringVectors needs at least one target layer")
        widths = {int(v.shape[-1]) for v in self.vectors.values()}
        if len(widths) != 1 or any(v.ndim != 1 for v in self.vectors.values()):
            raise ValueError(f"vectors must all be 1-d of one width, got widths {widths}")
        for layer, vector in self.vectors.items():
            if not torch.isfinite(vector).all():
                raise ValueError(f"steering vector of layer {layer} has NaN or inf")
            if layer not in self.norm_scale:
                raise ValueError(f"no norm scale for target layer {layer}")

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def width(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


def save_steering(path: str | Path, steering: SteeringVectors) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for layer in steering.layers:
        tensors[f"vector.{layer}"] = steering.vectors[layer].float()
        tensors[f"norm_scale.{layer}"] = torch.tensor([steering.norm_scale[layer]])
        if layer in steering.directions:
            tensors[f"directions.{layer}"] = steering.directions[layer].float()
    metadata = {**steering.metadata, "target_layers": steering.layers, "width": steering.width}
    return save_artifact(path, KIND, tensors, metadata)


def load_steering(
    path: str | Path, expect: dict[str, Any] | None = None, num_layers: int | None = None
) -> SteeringVectors:
    """Read and validate a steering artifact; `num_layers` checks the layers exist."""
    tensors, metadata = load_artifact(path, KIND, expect)
    layers = [int(layer) for layer in metadata.get("target_layers", [])]
    missing = [layer for layer in layers if f"vector.{layer}" not in tensors]
    if not layers or missing:
        raise ArtifactError(f"{path}: steering vectors missing for target layers {missing}")
    if num_layers is not None and max(layers) >= num_layers:
        raise ArtifactError(
            f"{path}: steers target layer {max(layers)} but the target has {num_layers} blocks"
        )
    width = metadata.get("width")
    for layer in layers:
        if tuple(tensors[f"vector.{layer}"].shape) != (width,):
            raise ArtifactError(
                f"{path}: vector.{layer} has shape {tuple(tensors[f'vector.{layer}'].shape)}, "
                f"metadata says width {width}"
            )
    try:
        return SteeringVectors(
            vectors={layer: tensors[f"vector.{layer}"] for layer in layers},
            norm_scale={layer: float(tensors[f"norm_scale.{layer}"][0]) for layer in layers},
            directions={
                layer: tensors[f"directions.{layer}"]
                for layer in layers
                if f"directions.{layer}" in tensors
            },
            metadata=metadata,
        )
    except (KeyError, ValueError) as error:
        raise ArtifactError(f"{path}: malformed steering artifact ({error})") from error
