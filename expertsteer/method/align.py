"""Representation alignment: one affine auto-encoder per expert layer, all trained as one module.

For expert layer i (index into the captured layers) with standardised input
x = (h - expert_mean_i) / expert_std_i:

    encoder  f_i(h) = W_i x + b_i          W_i: [d_T, d_E]   (into the target's width)
    decoder  g_i(z) = V_i z + c_i          V_i: [d_E, d_T]   (back to standardised expert space)

Inputs are standardised per layer and feature because residual norms differ by orders of
magnitude across layers (and a few "massive" features dominate within a layer); the statistics
are buffers, saved with the weights.

The translation term of `objective: recon+translate` regresses f_i(h^E_i) onto the paired target
state (h^T_j - target_mean_i) / target_scale_i. The target side is scaled by one scalar per
layer, not per feature, so that directions in the encoded space keep the target's raw geometry:
a steering vector is an encoded direction added to the target's raw residual stream.

Both losses are means over features as well as examples (squared norm / width), so each is a
fraction of the standardised variance left unexplained and `lambda_tr` weighs them
independently of d_E and d_T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from expertsteer.artifacts import ArtifactError, load_artifact, save_artifact
from expertsteer.data.activations import MODEL_FIELDS
from expertsteer.method.translate import PairFit, TranslateConfig, fit_pair, target_moments
from expertsteer.settings import check_choices, check_number

ALIGNMENT_KIND = "alignment"
Objective = Literal["recon", "recon+translate", "translate"]
"""Alignment objectives: reconstruction (the paper), plus a translation term, or closed-form
translation maps."""
OBJECTIVES: tuple[str, ...] = get_args(Objective)
Scheduler = Literal["cosine", "none"]
IDENTITY_FIELDS = (*MODEL_FIELDS, "expert_layers", "target_layers", "expert_dim", "target_dim")
"""Models, captured layers and widths: what must match for the weights to apply."""
REQUIRED_METADATA = (*IDENTITY_FIELDS, "objective", "translation_pairs", "data_fingerprint")
"""Metadata every alignment artifact carries (`translation_pairs`: real [expert, target] layer
numbers of the translation term, empty for `recon`)."""

STD_FLOOR = 1e-6
"""Standard deviations below this fraction of the layer's mean deviation are raised to it, so a
constant feature standardises to 0 instead of dividing by zero."""


def layer_moments(
    states: torch.Tensor, floor: float, relative: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer, per-feature mean and std [L, d] (float64) of states [n, L, d], one layer at
    a time (a large token corpus is never copied whole in float64).

    Standard deviations below `floor` are raised to it, or with `relative` below `floor`
    times the layer's mean std, so a constant feature standardises to 0 instead of dividing
    by zero.
    """
    means, stds = [], []
    for layer in range(states.shape[1]):
        x = states[:, layer].double()
        std = x.std(0, correction=0)
        if relative:
            std = torch.maximum(std, floor * std.mean().clamp_min(1e-12))
        else:
            std = std.clamp_min(floor)
        means.append(x.mean(0))
        stds.append(std)
    return torch.stack(means), torch.stack(stds)


@dataclass(frozen=True)
class TrainingConfig:
    """How the auto-encoders are trained by gradient (objectives `recon` and
    `recon+translate`, and `translate` with `refine`)."""

    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    scheduler: Scheduler = "cosine"
    """Learning-rate schedule: `cosine` (per step, over the whole fit) or `none`."""
    lambda_tr: float = 1.0
    """Weight of the translation term."""

    def __post_init__(self) -> None:
        check_number("lr", self.lr)
        check_number("weight_decay", self.weight_decay, positive=False)
        check_choices(self)
        check_number("lambda_tr", self.lambda_tr)


class AffineAutoencoders(nn.Module):
    """L affine auto-encoders R^{d_E} -> R^{d_T} -> R^{d_E}, batched over layers."""

    expert_mean: torch.Tensor
    expert_std: torch.Tensor
    target_mean: torch.Tensor
    target_scale: torch.Tensor

    def __init__(self, num_layers: int, expert_dim: int, target_dim: int) -> None:
        """
        Args:
            num_layers: Expert layers aligned (one auto-encoder each).
            expert_dim: Expert hidden size d_E.
            target_dim: Target hidden size d_T (the code size).
        """
        super().__init__()
        for name, value in (
            ("num_layers", num_layers),
            ("expert_dim", expert_dim),
            ("target_dim", target_dim),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_layers, self.expert_dim, self.target_dim = num_layers, expert_dim, target_dim
        self.encoder_weight = nn.Parameter(torch.empty(num_layers, target_dim, expert_dim))
        self.encoder_bias = nn.Parameter(torch.zeros(num_layers, target_dim))
        self.decoder_weight = nn.Parameter(torch.empty(num_layers, expert_dim, target_dim))
        self.decoder_bias = nn.Parameter(torch.zeros(num_layers, expert_dim))
        self.register_buffer("expert_mean", torch.zeros(num_layers, expert_dim))
        self.register_buffer("expert_std", torch.ones(num_layers, expert_dim))
        self.register_buffer("target_mean", torch.zeros(num_layers, target_dim))
        self.register_buffer("target_scale", torch.ones(num_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Tied orthogonal start: each decoder is its encoder's transpose, so training begins
        from an orthogonal projection (exact reconstruction when d_T >= d_E)."""
        with torch.no_grad():
            for layer in range(self.num_layers):
                nn.init.orthogonal_(self.encoder_weight[layer])
            self.decoder_weight.copy_(self.encoder_weight.transpose(1, 2))
            self.encoder_bias.zero_()
            self.decoder_bias.zero_()

    def subset(self, layers: list[int]) -> AffineAutoencoders:
        """A copy holding only the auto-encoders (and statistics) of layer indices `layers`."""
        for layer in layers:
            self._check_layer(layer)
        out = AffineAutoencoders(len(layers), self.expert_dim, self.target_dim)
        index = torch.tensor(layers, dtype=torch.long)
        out.load_state_dict({name: t[index] for name, t in self.state_dict().items()})
        return out.to(self.encoder_weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, expert_dim={self.expert_dim}, "
            f"target_dim={self.target_dim}"
        )

    # -- standardisation ---------------------------------------------------------------------

    @torch.no_grad()
    def fit_standardisation(self, expert_states: torch.Tensor) -> None:
        """Per-layer, per-feature mean and std of expert states [n, L, d_E] (`layer_moments`,
        floored at `STD_FLOOR` of each layer's mean std)."""
        self._check_expert(expert_states, "expert_states")
        if expert_states.shape[0] < 2:
            raise ValueError(
                f"standardisation needs at least 2 examples, got {expert_states.shape[0]}; "
                "use a larger steer split"
            )
        mean, std = layer_moments(expert_states, STD_FLOOR, relative=True)
        self.expert_mean.copy_(mean.to(self.expert_mean.dtype))
        self.expert_std.copy_(std.to(self.expert_std.dtype))

    @torch.no_grad()
    def set_linear_maps(self, layer: int, encoder: torch.Tensor, decoder: torch.Tensor) -> None:
        """Install a closed-form encoder [d_T, d_E] and decoder [d_E, d_T] for `layer` (both
        between centred spaces, so the biases are zero)."""
        self._check_layer(layer)
        for name, tensor, shape in (
            ("encoder", encoder, (self.target_dim, self.expert_dim)),
            ("decoder", decoder, (self.expert_dim, self.target_dim)),
        ):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must be {list(shape)}, got {list(tensor.shape)}")
        self.encoder_weight[layer] = encoder.to(self.encoder_weight.dtype)
        self.decoder_weight[layer] = decoder.to(self.decoder_weight.dtype)
        self.encoder_bias[layer] = 0.0
        self.decoder_bias[layer] = 0.0

    @torch.no_grad()
    def fit_target_standardisation(self, layer_index: int, target_states: torch.Tensor) -> None:
        """Mean [d_T] and one scalar scale (RMS deviation per feature) of the target states
        [n, d_T] that expert layer `layer_index` is translated into."""
        self._check_layer(layer_index)
        if target_states.ndim != 2 or target_states.shape[1] != self.target_dim:
            raise ValueError(
                f"target_states must be [n, {self.target_dim}], got {tuple(target_states.shape)}"
            )
        if target_states.shape[0] < 2:
            raise ValueError(
                f"target standardisation needs at least 2 examples, got {target_states.shape[0]}"
            )
        mean, scale = target_moments(target_states)
        if not torch.isfinite(scale) or scale <= 0:
            raise ValueError(
                f"target states for expert layer index {layer_index} are constant or "
                "non-finite; they cannot be a translation target"
            )
        self.target_mean[layer_index] = mean.to(self.target_mean.dtype)
        self.target_scale[layer_index] = scale.to(self.target_scale.dtype)

    def standardise(self, h: torch.Tensor) -> torch.Tensor:
        """(h - mean) / std for expert states of all layers [..., L, d_E]."""
        return (h - self.expert_mean) / self.expert_std

    def standardise_layer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """(h - mean) / std for raw expert states [..., d_E] of one layer."""
        self._check_layer(layer)
        return (h - self.expert_mean[layer]) / self.expert_std[layer]

    def standardise_target(self, layer_index: int, h: torch.Tensor) -> torch.Tensor:
        """Target states [..., d_T] in the translation space of expert layer `layer_index`."""
        return (h - self.target_mean[layer_index]) / self.target_scale[layer_index]

    # -- the maps ----------------------------------------------------------------------------

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes z [B, L, d_T] and standardised-space reconstructions [B, L, d_E] of h."""
        self._check_expert(h, "h")
        x = self.standardise(h)
        z = torch.einsum("lte,ble->blt", self.encoder_weight, x) + self.encoder_bias
        reconstruction = torch.einsum("let,blt->ble", self.decoder_weight, z) + self.decoder_bias
        return z, reconstruction

    def encode(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """f_layer(h) for raw expert states [..., d_E] of one layer -> [..., d_T]."""
        x = self.standardise_layer(layer, h)
        return x @ self.encoder_weight[layer].T + self.encoder_bias[layer]

    def encode_direction(self, layer: int, v: torch.Tensor) -> torch.Tensor:
        """Linear part of f_layer applied to direction(s) v [d_E] or [k, d_E]: W (v / std).

        f(h + v) - f(h) for any h; the mean and bias cancel for a difference of states.
        """
        self._check_layer(layer)
        if v.shape[-1] != self.expert_dim or v.ndim > 2:
            raise ValueError(f"v must be [{self.expert_dim}] or [k, {self.expert_dim}]")
        return (v / self.expert_std[layer]) @ self.encoder_weight[layer].T

    def decode(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """g_layer(z) for codes [..., d_T], mapped back to RAW expert space [..., d_E]
        (`forward` returns standardised reconstructions, the space the loss is measured in)."""
        self._check_layer(layer)
        x = z @ self.decoder_weight[layer].T + self.decoder_bias[layer]
        return x * self.expert_std[layer] + self.expert_mean[layer]

    # -- losses ------------------------------------------------------------------------------

    def reconstruction_loss(self, h: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error per layer [L], standardised space."""
        _, reconstruction = self(h)
        return (reconstruction - self.standardise(h)).pow(2).mean(dim=(0, 2))

    def translation_loss(
        self, h_expert: torch.Tensor, h_target: torch.Tensor, pairs: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Mean squared error [P] of f_i(h^E_i) against the standardised target state h^T_j.

        Args:
            h_expert: Expert states [B, L, d_E].
            h_target: Target states [B, L_T, d_T] of the captured target layers.
            pairs: (i, j) indices into the captured expert / target layers; one pair per
                expert layer (its target statistics are per expert layer).
        """
        if not pairs:
            raise ValueError("translation_loss needs at least one (expert, target) pair")
        expert_indices = [i for i, _ in pairs]
        if len(set(expert_indices)) != len(expert_indices):
            raise ValueError(
                f"pairs {pairs} translate one expert layer into several target layers; "
                "each encoder has one translation target"
            )
        if h_target.ndim != 3 or h_target.shape[-1] != self.target_dim:
            raise ValueError(
                f"h_target must be [B, L_T, {self.target_dim}], got {tuple(h_target.shape)}"
            )
        losses = []
        for i, j in pairs:
            if not 0 <= j < h_target.shape[1]:
                raise IndexError(f"target layer index {j} outside 0..{h_target.shape[1] - 1}")
            code = self.encode(i, h_expert[:, i])
            goal = self.standardise_target(i, h_target[:, j])
            losses.append((code - goal).pow(2).mean())
        return torch.stack(losses)

    # -- checks ------------------------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(
                f"expert layer index {layer} outside 0..{self.num_layers - 1} (indices count "
                "captured layers, not model depth)"
            )

    def _check_expert(self, h: torch.Tensor, name: str) -> None:
        if h.ndim != 3 or tuple(h.shape[1:]) != (self.num_layers, self.expert_dim):
            raise ValueError(
                f"{name} must be [n, {self.num_layers}, {self.expert_dim}], got {tuple(h.shape)}"
            )


@torch.no_grad()
def fit_translation(
    autoencoders: AffineAutoencoders,
    expert: torch.Tensor,
    target: torch.Tensor,
    fit: torch.Tensor,
    heldout: torch.Tensor,
    targets: list[int],
    config: TranslateConfig,
) -> list[PairFit]:
    """Closed-form encoder and decoder (`expertsteer.method.translate.fit_pair`) of every
    expert layer i into target layer index `targets[i]`, installed in `autoencoders`.

    Args:
        autoencoders: The auto-encoders to fit (standardisation and maps).
        expert: Expert states [n, L_E, d_E].
        target: Target states [n, L_T, d_T] of the same rows.
        fit: Rows the standardisation and the maps are fitted on.
        heldout: Rows that choose lambda and report R^2.
        targets: Target layer index per expert layer.
        config: Ridge settings.
    """
    if len(targets) != autoencoders.num_layers:
        raise ValueError(
            f"targets has {len(targets)} entries for {autoencoders.num_layers} expert layers"
        )
    x_fit, x_ho = expert[fit], expert[heldout]
    autoencoders.fit_standardisation(x_fit)
    results = []
    for i, j in enumerate(targets):
        y_fit = target[fit, j].float()
        autoencoders.fit_target_standardisation(i, y_fit)
        result = fit_pair(
            autoencoders.standardise_layer(i, x_fit[:, i].float()),
            autoencoders.standardise_target(i, y_fit),
            autoencoders.standardise_layer(i, x_ho[:, i].float()),
            autoencoders.standardise_target(i, target[heldout, j].float()),
            config,
        )
        autoencoders.set_linear_maps(i, result.encoder, result.decoder)
        results.append(result)
    return results


def explained_variance_sums(
    module: AffineAutoencoders, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sums from which per-layer explained variance follows, in standardised space (float64):
    squared error [L], sum [L, d_E] and squared sum [L, d_E] of the inputs, and the count.

    They add across batches and ranks, so a TorchMetrics metric can accumulate them.
    """
    with torch.no_grad():
        _, reconstruction = module(h)
        x = module.standardise(h).double()
    squared_error = (reconstruction.double() - x).pow(2).sum(dim=(0, 2))
    return squared_error, x.sum(0), x.pow(2).sum(0), h.shape[0]


def explained_variance_from_sums(
    squared_error: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor, count: int | float
) -> torch.Tensor:
    """1 - SSE / SST per layer [L]; SST is taken about the data's own mean."""
    count = float(count)
    if count < 2:
        raise ValueError(f"explained variance needs at least 2 examples, got {count:g}")
    sst = (total_sq - total.pow(2) / count).sum(-1).clamp_min(1e-12)
    return 1.0 - squared_error / sst


def explained_variance(module: AffineAutoencoders, h: torch.Tensor) -> torch.Tensor:
    """Per-layer explained variance [L] of the reconstructions of h [n, L, d_E]."""
    return explained_variance_from_sums(*explained_variance_sums(module, h))


def save_alignment(path: str | Path, module: AffineAutoencoders, metadata: dict[str, Any]) -> Path:
    """Write the auto-encoders (weights and standardisation) as an `alignment` artifact.

    `metadata` must hold every field of `REQUIRED_METADATA` except the dims, which are taken
    from the module (and must agree if given).
    """
    metadata = dict(metadata)
    for name, value in (("expert_dim", module.expert_dim), ("target_dim", module.target_dim)):
        if metadata.setdefault(name, value) != value:
            raise ValueError(f"metadata {name}={metadata[name]} but the module has {value}")
    missing = [name for name in REQUIRED_METADATA if name not in metadata]
    if missing:
        raise ValueError(f"alignment metadata lacks {missing}")
    if len(metadata["expert_layers"]) != module.num_layers:
        raise ValueError(
            f"metadata lists {len(metadata['expert_layers'])} expert layers but the module "
            f"has {module.num_layers} auto-encoders"
        )
    if metadata["objective"] not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {metadata['objective']!r}")
    metadata["num_layers"] = module.num_layers
    return save_artifact(path, ALIGNMENT_KIND, dict(module.state_dict()), metadata)


def load_alignment(
    path: str | Path, expect: dict[str, Any] | None = None
) -> tuple[AffineAutoencoders, dict[str, Any]]:
    """Auto-encoders and metadata from an `alignment` artifact, checked against `expect`
    (e.g. the model ids, checksums and layers of the run that uses them) and for shapes."""
    tensors, metadata = load_artifact(path, ALIGNMENT_KIND, expect)
    missing = [name for name in REQUIRED_METADATA if name not in metadata]
    if missing:
        raise ArtifactError(f"{path}: alignment metadata lacks {missing}; rerun alignment")
    num_layers = len(metadata["expert_layers"])
    expert_dim, target_dim = int(metadata["expert_dim"]), int(metadata["target_dim"])
    module = AffineAutoencoders(num_layers, expert_dim, target_dim)
    wanted = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    for name, shape in wanted.items():
        if name not in found:
            raise ArtifactError(f"{path}: tensor '{name}' is missing; the file is incomplete")
        if found[name] != shape:
            raise ArtifactError(
                f"{path}: tensor '{name}' has shape {found[name]} but the metadata "
                f"({num_layers} layers, d_E={expert_dim}, d_T={target_dim}) implies {shape}"
            )
    extra = sorted(set(found) - set(wanted))
    if extra:
        raise ArtifactError(f"{path}: unexpected tensors {extra}; not an alignment of this version")
    module.load_state_dict(tensors)
    if not all(math.isfinite(float(t.abs().sum())) for t in tensors.values()):
        raise ArtifactError(f"{path}: non-finite values in the alignment weights")
    return module, metadata
