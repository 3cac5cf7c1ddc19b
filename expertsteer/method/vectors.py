"""Steering vectors per target layer and their artifact, `steering.safetensors`.

Tensors: `vector.<layer>` (unit direction [d_T] added at target block `<layer>`),
`directions.<layer>` (the leading eigenvectors / alternatives [k, d_T], row 0 = the vector) and
`norm_scale.<layer>` (mean residual norm s_j of that block on the dev split, so that steering
adds alpha * s_j * v with a dimensionless alpha). The JSON metadata names the method, the
models and their weight checksums, the layer pairs, the space the extractor ran in, the data
fingerprint and the fit's diagnostics. `load_steering` checks all of it against what the caller
is about to steer.

The vectors are self-describing: the strength, layers and positions chosen for them (on dev,
by the evaluation stage, or set with `SteeringVectors.with_choice`) are the metadata's `choice`,
or live in a sibling `<name>.choice.json` (`write_choice`) that `load_steering` reads when it
still belongs to the file (same sha256). So `apply`, `expertsteer generate --steer` and
`export-gguf` need no `metrics.json`; vectors that record no choice still load, and only
steering without an explicit alpha is refused, with the fix.

`SteeringVectors` is also the public object of the Python API (`expertsteer.SteeringVectors`):
`apply(model, alpha)` steers a plain transformers model by forward hooks
(`expertsteer.method.hooks`), `save` / `load` round-trip the artifact, and `*`, `+`, `-`
combine vectors of one target.

`orient` is the one sign rule of every direction: extractors, the RFM's eigenvectors, the
fitting stage and the transfer diagnostics all flip a direction so that label-1 states project
higher.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from expertsteer.artifacts import ArtifactError, load_artifact, save_artifact, save_json
from expertsteer.cache import sha256_file

log = logging.getLogger(__name__)

KIND = "steering"
CHOICE_KIND = "steering_choice"
POSITIONS = ("all", "prompt", "generated", "last_prompt")
TARGET_FIELDS = ("target_model_id", "target_weights_sha256")
"""Metadata naming the model the vectors steer (vectors of two targets never combine)."""


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

    # -- the recorded choice -------------------------------------------------------------------

    @property
    def choice(self) -> dict[str, Any] | None:
        """The recorded strength: `{"alpha", "layers", "positions", ...}`, or None.

        Written by the evaluation stage (chosen on dev) or by `with_choice`; an older
        artifact's top-level metadata `alpha` counts as a choice on every layer."""
        recorded = self.metadata.get("choice")
        if isinstance(recorded, dict) and recorded.get("alpha") is not None:
            return recorded
        if self.metadata.get("alpha") is not None:
            return {
                "alpha": float(self.metadata["alpha"]),
                "layers": self.layers,
                "positions": self.metadata.get("positions", "all"),
            }
        return None

    def with_choice(
        self, alpha: float, layers: list[int] | None = None, positions: str = "all", **extra: Any
    ) -> SteeringVectors:
        """A copy that records `alpha` (and the layers and positions to steer) as its choice:
        `apply` and `save` then need no alpha."""
        choice = check_choice(alpha, layers, positions, self.layers)
        return replace(self, metadata={**self.metadata, "choice": {**choice, **extra}})

    def resolve(
        self,
        alpha: float | None = None,
        positions: str | None = None,
        layers: list[int] | None = None,
    ) -> tuple[float, str, list[int]]:
        """(alpha, positions, layers) to steer with: the given ones, else the recorded choice
        (layers default to the choice's, else every layer; positions to the choice's, else
        `all`). Without an alpha and without a choice: `ArtifactError` naming the fix."""
        choice = self.choice
        if alpha is None:
            if choice is None:
                raise ArtifactError(
                    "these steering vectors record no chosen alpha (an artifact written before "
                    "ExpertSteer 0.2, or vectors never evaluated): pass the strength, e.g. "
                    "`apply(model, alpha=0.3)` / `--alpha 0.3` (a fraction of each layer's mean "
                    "residual norm), or record one with `with_choice(alpha)`"
                )
            alpha = float(choice["alpha"])
        if layers is None:
            layers = list(choice["layers"]) if choice and choice.get("layers") else self.layers
        if positions is None:
            positions = choice.get("positions", "all") if choice else "all"
        check_choice(alpha, layers, positions, self.layers)
        return float(alpha), positions, [int(layer) for layer in layers]

    # -- steering ------------------------------------------------------------------------------

    def additions(
        self, alpha: float, layers: list[int], dtype: torch.dtype, device: torch.device | str
    ) -> dict[int, torch.Tensor]:
        """alpha * s_j * v_j per layer, computed in float64 and cast to the model's dtype (the
        same numbers as `expertsteer.method.steer.Intervention.additions`)."""
        return {
            layer: (alpha * float(self.norm_scale[layer]) * self.vectors[layer].double()).to(
                device, dtype
            )
            for layer in sorted(layers)
        }

    def apply(
        self,
        model: Any,
        alpha: float | None = None,
        positions: str | None = None,
        layers: list[int] | None = None,
    ) -> AbstractContextManager[None]:
        """Context manager steering `model` (a transformers causal LM, or an object holding one
        as `.model` / `.hf_model`) by forward hooks: inside it every forward and `generate`
        adds alpha * s_j * v_j to the output of block j at `positions` (`all`, `prompt`,
        `generated`, `last_prompt`; see `expertsteer.method.hooks`). `alpha`, `positions` and
        `layers` default to the recorded choice. The hooks are removed on exit."""
        from expertsteer.method.hooks import find_blocks, steering_hooks

        module = plain_model(model)
        alpha, positions, layers = self.resolve(alpha, positions, layers)
        parameter = next(module.parameters())
        blocks = find_blocks(module)
        width = _hidden_size(module)
        if width is not None and width != self.width:
            raise ValueError(
                f"steering vectors have width {self.width} but the model's hidden size is "
                f"{width}; they were made for another model"
            )
        too_deep = [layer for layer in layers if layer >= len(blocks)]
        if too_deep:
            raise ValueError(
                f"layers {too_deep} do not exist: the model has {len(blocks)} decoder blocks"
            )
        additions = self.additions(alpha, layers, parameter.dtype, parameter.device)
        return _logged(steering_hooks(module, additions, positions), alpha, layers, positions)

    # -- arithmetic ----------------------------------------------------------------------------

    def __mul__(self, factor: float) -> SteeringVectors:
        """Every vector times `factor` (the recorded choice is kept: the same alpha now adds
        `factor` times as much)."""
        factor = float(factor)
        if not math.isfinite(factor):
            raise ValueError(f"a steering vector can only be scaled by a finite number: {factor}")
        return SteeringVectors(
            {layer: vector * factor for layer, vector in self.vectors.items()},
            dict(self.norm_scale),
            {},
            {**self.metadata, "derived": f"{factor:g} x ({_describe(self)})"},
        )

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVectors:
        return self * -1.0

    def __add__(self, other: SteeringVectors) -> SteeringVectors:
        """The sum of two vectors of one target: per layer, the additions alpha * s_j * v_j at
        alpha = 1 add up (a layer only one side steers keeps its own). The recorded choices do
        not carry over: steering the sum needs an explicit alpha, or `with_choice`."""
        if not isinstance(other, SteeringVectors):
            return NotImplemented
        if other.width != self.width:
            raise ValueError(f"cannot add vectors of widths {self.width} and {other.width}")
        for name in TARGET_FIELDS:
            mine, theirs = self.metadata.get(name), other.metadata.get(name)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(
                    f"cannot add steering vectors of two targets ({name} {mine!r} vs "
                    f"{theirs!r}); they act on different models"
                )
        vectors, scales = dict(self.vectors), dict(self.norm_scale)
        for layer, vector in other.vectors.items():
            if layer in vectors:
                total = scales[layer] * vectors[layer].double() + other.norm_scale[
                    layer
                ] * vector.double().to(vectors[layer].device)
                vectors[layer] = (total / scales[layer]).to(vectors[layer].dtype)
            else:
                vectors[layer], scales[layer] = vector, other.norm_scale[layer]
        identity = {
            name: self.metadata.get(name) or other.metadata.get(name)
            for name in TARGET_FIELDS
            if self.metadata.get(name) or other.metadata.get(name)
        }
        metadata = {
            **identity,
            "method": "combination",
            "derived": f"({_describe(self)}) + ({_describe(other)})",
        }
        return SteeringVectors(vectors, scales, {}, metadata)

    def __sub__(self, other: SteeringVectors) -> SteeringVectors:
        return self + (-other)

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the artifact (`save_steering`), the recorded choice included."""
        return save_steering(path, self)

    @classmethod
    def load(cls, path: str | Path, expect: dict[str, Any] | None = None) -> SteeringVectors:
        """Read an artifact (`load_steering`), with its recorded choice when it has one."""
        return load_steering(path, expect)


def _describe(steering: SteeringVectors) -> str:
    if steering.metadata.get("derived"):
        return str(steering.metadata["derived"])
    method = steering.metadata.get("method", "vectors")
    return f"{method} on layers {steering.layers}"


@contextmanager
def _logged(
    hooks: AbstractContextManager[None], alpha: float, layers: list[int], positions: str
) -> Iterator[None]:
    log.debug("steering layers %s at alpha %g (%s positions)", layers, alpha, positions)
    with hooks:
        yield


def plain_model(model: Any) -> torch.nn.Module:
    """The transformers module behind `model`: itself, or its `.hf_model` (a `CausalLM`) or
    `.model` (a loaded model of the API or the zoo)."""
    for name in ("hf_model", "model"):
        inner = getattr(model, name, None)
        if isinstance(inner, torch.nn.Module) and not isinstance(model, torch.nn.Module):
            return inner
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a transformers model, got {type(model).__name__}")
    return model


def _hidden_size(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


ALPHA_LIMIT = 20.0
"""Largest |alpha| accepted: alpha is a fraction of the mean residual norm, and far beyond a
few norms the steered state is the vector alone (garbage text, then non-finite logits)."""
TOO_STRONG = (
    "alpha is a fraction of the mean residual norm, and at such strengths the target only "
    "emits the vector (garbage text, then non-finite logits); use strengths of a few norms at most"
)


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """`alpha` as a float if it is finite and within +-`ALPHA_LIMIT`, else a `ValueError`
    naming `name` (every place a user gives one strength: generate, export, the API)."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {alpha!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {alpha!r}")
    if abs(value) > ALPHA_LIMIT:
        raise ValueError(f"{name} {value:g} exceeds +-{ALPHA_LIMIT:g}: {TOO_STRONG}")
    return value


def check_choice(
    alpha: float, layers: list[int] | None, positions: str, available: list[int]
) -> dict[str, Any]:
    """A validated choice `{"alpha", "layers", "positions"}` for vectors on `available`."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    alpha = check_alpha(alpha)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    layers = list(available) if layers is None else [int(layer) for layer in layers]
    missing = [layer for layer in layers if layer not in available]
    if not layers or missing:
        raise ValueError(
            f"layers {missing or layers} have no steering vector; the vectors steer {available}"
        )
    return {"alpha": float(alpha), "layers": sorted(layers), "positions": positions}


def choice_path(path: str | Path) -> Path:
    """The sibling file recording the chosen strength of the steering artifact at `path`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.choice.json")


def write_choice(
    path: str | Path, alpha: float, layers: list[int], positions: str, **extra: Any
) -> Path:
    """Record alpha, layers and positions chosen for the artifact at `path` beside it, tied to
    the artifact's sha256 (a choice outlives no rewrite of the vectors)."""
    path = Path(path)
    steering = load_steering(path)
    payload = {
        "kind": CHOICE_KIND,
        "steering_file": path.name,
        "steering_sha256": sha256_file(path),
        **check_choice(alpha, layers, positions, steering.layers),
        **extra,
    }
    return save_json(choice_path(path), payload)


def record_choices(
    paths: dict[str, str | Path],
    chosen: dict[str, tuple[tuple[int, ...], float]],
    positions: str,
    **extra: Any,
) -> list[Path]:
    """The evaluation's dev choices, one `write_choice` per method: `paths` maps a method to
    its steering artifact, `chosen` to its (layers, alpha); `extra` (e.g. the task) is
    recorded with each."""
    return [
        write_choice(
            paths[method], alpha, list(layers), positions, method=method, chosen_on="dev", **extra
        )
        for method, (layers, alpha) in chosen.items()
        if method in paths
    ]


def read_choice(path: str | Path) -> dict[str, Any] | None:
    """The choice recorded beside the artifact at `path`, if any and if it still belongs to
    that file (a stale one is ignored with a warning)."""
    sibling = choice_path(path)
    if not sibling.is_file():
        return None
    try:
        payload = json.loads(sibling.read_text())
    except (OSError, ValueError) as error:
        log.warning("ignoring unreadable %s (%s)", sibling, error)
        return None
    if not isinstance(payload, dict) or payload.get("kind") != CHOICE_KIND:
        log.warning("ignoring %s: not a steering choice", sibling)
        return None
    if payload.get("steering_sha256") != sha256_file(path):
        log.warning(
            "ignoring %s: it was written for other vectors than the current %s (rerun the "
            "evaluation to choose again)",
            sibling,
            Path(path).name,
        )
        return None
    return {k: v for k, v in payload.items() if k not in ("kind", "steering_sha256")}


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
            metadata=_with_recorded_choice(path, metadata),
        )
    except (KeyError, ValueError) as error:
        raise ArtifactError(f"{path}: malformed steering artifact ({error})") from error


def _with_recorded_choice(path: str | Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """`metadata` with the sibling choice file's choice (it overrides an embedded one: the
    evaluation chose it for exactly these bytes)."""
    sibling = read_choice(path)
    return metadata if sibling is None else {**metadata, "choice": sibling}
