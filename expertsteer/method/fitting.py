"""Steering vectors from captured states: the one code path of the vectors stage
(`lightning_modules.vectors.VectorsModule`) and of the Python API (`expertsteer.api`).

For one (expert layer i, target layer j) pair, `VectorFit`:

1. puts the states where the extractor runs (`features`): the target's own states at block j
   (`source: target`), or the expert's at block i, encoded by the alignment (`space: encoded`)
   or raw (`space: raw`), in the fit precision;
2. extracts the leading direction(s) there (`directions`: the RFM, or a baseline of
   `expertsteer.method.extractors`); the stage advances the same `RFMFitter` one iteration per
   epoch instead, which gives the same result as `fit_rfm`'s loop;
3. brings them into the target's space as unit rows (`to_target`: a raw expert direction goes
   through the encoder's linear part) and orients them so that label-1 rows project higher in
   those target-space coordinates (`orient`; the `random` control is never flipped);
4. scales by s_j, the mean L2 norm of the target's block-j states of the validation split
   (`norm_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from expertsteer.method.align import AffineAutoencoders
from expertsteer.method.extractors import extract
from expertsteer.method.rfm import RFMResult, VectorsConfig, fit_rfm
from expertsteer.method.vectors import orient


def norm_scale(states: torch.Tensor) -> float:
    """s_j: the mean L2 norm of target states [n, d_T] (the validation split's)."""
    return float(states.float().norm(dim=-1).mean())


def fit_record(pair: tuple[int, int], result: RFMResult | None) -> dict[str, Any]:
    """What the artifact's metadata `fits` records of one pair's fit."""
    record: dict[str, Any] = {"expert_layer": pair[0], "target_layer": pair[1]}
    if result is not None:
        record |= {
            "best_iteration": result.best_iteration,
            "bandwidth": result.bandwidth,
            "val_auroc": result.val_auroc,
            "grid_auroc": {f"{k:.6g}": v for k, v in result.grid_auroc.items()},
            "eigenvalues": [float(v) for v in result.eigenvalues],
        }
    return record


@dataclass
class VectorFit:
    """How steering directions are fitted and brought into the target's space."""

    method: str
    """Extractor: `rfm`, `mean_diff`, `pca_diff`, `logistic` or `random`."""
    source: str
    """Whose states the extractor reads: `expert` or `target`."""
    config: VectorsConfig
    """The RFM's settings, the expert's space and the fit precision."""
    aligner: AffineAutoencoders | None = None
    """The alignment (required for the expert): one encoder per entry of `expert_layers`."""
    expert_layers: list[int] | None = None
    """Expert blocks of the aligner's encoders, in order."""
    seed: int = 0
    """Seed of the `random` baseline."""

    def __post_init__(self) -> None:
        if self.source == "expert" and (self.aligner is None or self.expert_layers is None):
            raise ValueError("expert vectors need the alignment and its expert layers")

    @property
    def space(self) -> str:
        """The space recorded in the artifact: `encoded`, `raw` or `target`."""
        return self.config.space if self.source == "expert" else "target"

    def encoder_index(self, expert_layer: int) -> int:
        """Index of `expert_layer`'s auto-encoder in the alignment."""
        return list(self.expert_layers).index(expert_layer)

    def features(self, pair: tuple[int, int], states: torch.Tensor) -> torch.Tensor:
        """States [n, d] of the pair's source side in the space the extractor runs in."""
        x = states.to(getattr(torch, self.config.fit_dtype))
        if self.source == "expert" and self.config.space == "encoded":
            with torch.no_grad():
                x = self.aligner.to(x.dtype).encode(self.encoder_index(pair[0]), x)
        return x.detach()

    def directions(
        self, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor
    ) -> tuple[torch.Tensor, RFMResult | None]:
        """Leading directions [k, d] in the extractor's space (the RFM's eigenvectors, or a
        baseline's one direction) and the RFM's result."""
        if self.method == "rfm":
            result = fit_rfm(x, y, x_val, y_val, self.config)
            return result.directions, result
        return extract(self.method, x, y, x_val, y_val, seed=self.seed)[None, :], None

    def to_target(self, pair: tuple[int, int], rows: torch.Tensor) -> torch.Tensor:
        """Directions [k, d] of the extractor's space as unit rows in the target's space."""
        if self.source == "expert" and self.config.space == "raw":
            index = self.encoder_index(pair[0])
            with torch.no_grad():
                rows = self.aligner.to(rows.dtype).encode_direction(index, rows)
        return rows / rows.norm(dim=-1, keepdim=True)

    def orient(
        self, pair: tuple[int, int], rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Rows flipped so that the fit rows `x` (extractor space) project higher for label 1
        in the target-space coordinates the vector lives in; a linear map can reverse the sign.
        `random` is a label-free control and is never flipped (the evaluation tries both)."""
        if self.method == "random":
            return rows
        if self.source == "expert" and self.config.space == "raw":
            with torch.no_grad():
                x = self.aligner.to(x.dtype).encode(self.encoder_index(pair[0]), x)
        return orient(rows, x, y)

    def target_rows(
        self, pair: tuple[int, int], rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """`to_target` then `orient`: the pair's unit rows [k, d_T], row 0 the vector."""
        return self.orient(pair, self.to_target(pair, rows), x, y)
