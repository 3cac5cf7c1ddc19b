"""Mutual information between expert and target layers, and the choice of intervention pairs.

States are sequence-level vectors (one per prompt), so each layer is a cloud of n points and
the MI of a layer pair is estimated from the n paired points. Everything is in nats.

Both estimators first reduce each side to an orthonormal basis of its leading principal
subspace (eigendecomposition of the smaller Gram matrix of the centred states), i.e. whitened
principal scores. Components whose variance is below `max(n, d) * eps64` of the largest are
dropped (rank deficiency); a layer that does not vary across prompts (centred norm within one
rounding unit of its input dtype) carries no information, and every pair involving it is NaN
(skipped by `select_pairs`, grey in the heatmap).

`gaussian` (default, closed form). For jointly Gaussian vectors,
    MI = -1/2 sum_k log(1 - rho_k^2),
with rho_k the canonical correlations, here the singular values of U_x^T U_y where U_x, U_y
are the orthonormal principal bases (at most `mi_rank` columns each) of the centred states.
`shrinkage` lambda shrinks the joint covariance of the whitened components linearly toward the
identity (the scaled identity of equal trace, since whitened variances are 1):
    [[I, C], [C^T, I]] -> (1 - lambda) [[I, C], [C^T, I]] + lambda I,
which multiplies every canonical correlation by (1 - lambda). It bounds them away from 1, so
the MI stays finite when r_x + r_y >= n (sample correlations saturate at 1) or when two layers
are copies (at most -1/2 log(1 - (1 - lambda)^2) per component, 3.1 nats for the default 1e-3),
while moving a well-sampled estimate by less than its sampling error (-0.4% at rho = 0.8).
Unlike shrinking each side's raw covariance, it keeps the estimate exactly invariant to
invertible linear maps of either side. The plug-in estimate is biased upward by about
r_x r_y / (2n) nats under independence; the bias is the same for every pair of one matrix, so
the ranking used for selection is unaffected. For the matrix, each layer is decomposed once
(L_E + L_T eigendecompositions); the cross products of all pairs are one batched matmul and
their canonical correlations one batched SVD of [L_E, L_T, r_x, r_y].

`ksg` (Kraskov, Stoegbauer & Grassberger 2004, algorithm 1), on the whitened scores of at most
`ksg_rank` components per side:
    I = psi(k) + psi(n) - < psi(n_x(i) + 1) + psi(n_y(i) + 1) >_i,
with eps_i the max-norm distance from point i to its k-th nearest neighbour in the joint space
(max of the two sides' max-norm distances) and n_x(i) the number of points j != i with
||x_j - x_i||_inf < eps_i (strictly), likewise n_y(i). No density assumption; it can be
slightly negative, and k-NN degrades in high dimension, hence the small PCA rank. A check, and
slower: O(n^2) work per pair, and the L_T target distance matrices [n, n] are held at once.

Selection (paper): the lowest-MI pairs are where the target lacks what the expert holds.
Depth windows are judged on real depth: block j of a model with L blocks sits at depth
(j + 0.5) / L (the block's centre), and it is inside a window (lo, hi) when lo <= depth < hi.
The default target window (0.25, 0.75) is then exactly the middle half of the blocks whenever L
is a multiple of 4 (blocks 6..17 of 24, 7..21 of 30), and never empty for L >= 1.

The chosen pairs are saved as `pairs.json` (`pairs_payload`); `read_pairs_file` reads them back
for the later stages.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from expertsteer.artifacts import load_json
from expertsteer.data.activations import MODEL_FIELDS
from expertsteer.errors import ExpertSteerError
from expertsteer.settings import (
    check_bool,
    check_choices,
    check_integer,
    check_number,
    check_numbers,
)

log = logging.getLogger(__name__)

Estimator = Literal["gaussian", "ksg"]
Select = Literal["lowest_mi", "translatable", "dev"]
DEFAULT_SHRINKAGE = 1e-3
_MIN_SAMPLES = 3
_RHO_MAX = 1.0 - 1e-12


class PairingError(ExpertSteerError):
    """States the MI estimators cannot use, or windows that contain no layers."""


@dataclass(frozen=True)
class MIConfig:
    """Settings of the layer-pair MI estimate (the paper's layer-pairing step)."""

    estimator: Estimator = "gaussian"
    """`gaussian` (closed form, all pairs at once) or `ksg` (Kraskov k-NN, a slower check)."""
    mi_rank: int = 16
    """Principal components kept per side for `gaussian` (also at most n - 1 and the width)."""
    shrinkage: float = DEFAULT_SHRINKAGE
    """Shrinkage of the whitened joint covariance toward identity: correlations x (1 - it)."""
    ksg_k: int = 3
    """Neighbours k of the KSG estimator."""
    ksg_rank: int = 8
    """Principal components kept per side before KSG (k-NN degrades in high dimension)."""
    max_samples: int | None = None
    """For `ksg`: rows drawn without replacement (None: all; KSG holds L_T n x n matrices)."""
    seed: int = 0
    """Seed of the `max_samples` row draw."""

    def __post_init__(self) -> None:
        check_choices(self)
        check_integer("mi_rank", self.mi_rank, 1)
        check_number("shrinkage", self.shrinkage, positive=False)
        if self.shrinkage >= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1), got {self.shrinkage}")
        check_integer("ksg_k", self.ksg_k, 1)
        check_integer("ksg_rank", self.ksg_rank, 1)
        if self.max_samples is not None and (
            isinstance(self.max_samples, bool)
            or not isinstance(self.max_samples, int)
            or self.max_samples <= max(self.ksg_k, _MIN_SAMPLES)
        ):
            raise ValueError(
                f"max_samples must be None or > max(ksg_k, {_MIN_SAMPLES}), got {self.max_samples}"
            )
        check_integer("seed", self.seed, 0)


@dataclass(frozen=True)
class PairingConfig:
    """How intervention pairs are chosen from the MI matrix (the paper's layer-pairing step)."""

    top_k: int = 1
    """Number of (expert layer, target layer) pairs intervened on."""
    window: tuple[float, float] = (0.25, 0.75)
    """Allowed target depth [lo, hi): block j of L sits at (j + 0.5) / L; default middle half."""
    select: Select = "lowest_mi"
    """`lowest_mi` (the paper): the lowest-MI pairs; `translatable`: the pairs whose ridge map
    has the best held-out R^2 (needs a token corpus); `dev`: `candidates` lowest-MI pairs, for
    the evaluation to choose among on dev."""
    candidates: int = 4
    """With `select: dev`, how many lowest-MI pairs are returned as candidates."""
    expert_window: tuple[float, float] = (0.0, 1.0)
    """Allowed expert depth [lo, hi), same convention as `window`; default every block."""
    unique_target: bool = True
    """At most one pair per target layer (steering stores one vector per target layer)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", _check_window(self.window, "window"))
        object.__setattr__(
            self, "expert_window", _check_window(self.expert_window, "expert_window")
        )
        check_integer("top_k", self.top_k, 1)
        check_choices(self)
        check_integer("candidates", self.candidates, 1)
        if self.select == "dev" and self.candidates < self.top_k:
            raise ValueError(
                f"candidates ({self.candidates}) must be >= top_k ({self.top_k}) with select: dev"
            )
        check_bool("unique_target", self.unique_target)


def _check_window(window: Sequence[float], name: str) -> tuple[float, float]:
    check_numbers(name, window, positive=False)
    if len(window) != 2:
        raise ValueError(f"{name} must be a pair (lo, hi) of depth fractions, got {window!r}")
    lo, hi = float(window[0]), float(window[1])
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 <= lo < hi <= 1, got ({lo}, {hi})")
    return lo, hi


def _check_states(states: torch.Tensor, side: str, expected_dims: int) -> None:
    if states.ndim != expected_dims:
        layout = "[n, d]" if expected_dims == 2 else "[n, layers, d]"
        raise PairingError(f"{side} states must be {layout}, got shape {tuple(states.shape)}")
    if not states.is_floating_point():
        raise PairingError(f"{side} states must be floating point, got {states.dtype}")
    finite = torch.isfinite(states)
    if not finite.all():
        if expected_dims == 2:
            raise PairingError(f"{side} states contain NaN or inf; fix the capture (dtype?)")
        bad = (~finite.all(dim=2).all(dim=0)).nonzero().flatten().tolist()
        raise PairingError(
            f"{side} layer index {bad[0]} (of {states.shape[1]}; all bad: {bad}) contains NaN "
            "or inf values; recapture in float32 or drop that layer"
        )


def _check_pair(x: torch.Tensor, y: torch.Tensor, dims: int, minimum: int) -> None:
    _check_states(x, "expert", dims)
    _check_states(y, "target", dims)
    if x.shape[0] != y.shape[0]:
        raise PairingError(
            f"expert and target states must cover the same prompts: got n = {x.shape[0]} "
            f"and n = {y.shape[0]}"
        )
    if x.shape[0] < minimum:
        raise PairingError(f"MI needs at least {minimum} prompts, got {x.shape[0]}")


def _principal_bases(states: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of each layer's leading principal subspace.

    `states` [n, L, d] -> (bases [L, n, r] with dropped components zeroed, kept count [L]),
    r = min(rank, n - 1, d). Columns are unit-norm, mutually orthogonal and orthogonal to the
    ones vector. The eigendecomposition is of the smaller Gram matrix (n x n or d x d), which on
    CPU is several times faster than an SVD of the wide [n, d] block.
    """
    n, layers, d = states.shape
    r = min(rank, n - 1, d)
    input_eps = torch.finfo(states.dtype).eps
    cutoff = max(n, d) * torch.finfo(torch.float64).eps
    bases = torch.zeros(layers, n, r, dtype=torch.float64, device=states.device)
    kept = torch.zeros(layers, dtype=torch.long)
    for layer in range(layers):
        raw = states[:, layer].to(torch.float64)
        centred = raw - raw.mean(0, keepdim=True)
        if centred.norm() <= input_eps * raw.norm():
            continue
        if n <= d:
            variances, vectors = torch.linalg.eigh(centred @ centred.T)
            scores = vectors.flip(1)[:, :r]
        else:
            variances, vectors = torch.linalg.eigh(centred.T @ centred)
            scores = centred @ vectors.flip(1)[:, :r]
        variances = variances.flip(0)[:r]
        count = int((variances > cutoff * variances[0]).sum())
        bases[layer, :, :count] = torch.linalg.qr(scores[:, :count]).Q
        kept[layer] = count
    return bases, kept


def _warn_degenerate(kept: torch.Tensor, side: str) -> None:
    constant = (kept == 0).nonzero().flatten().tolist()
    if constant:
        log.warning(
            "%s layer indices %s do not vary across prompts; their MI is NaN and they are "
            "never selected",
            side,
            constant,
        )


def _gaussian_from_bases(
    expert: torch.Tensor, target: torch.Tensor, shrinkage: float
) -> torch.Tensor:
    """[L_E, n, r_x] and [L_T, n, r_y] orthonormal bases -> MI [L_E, L_T] in nats."""
    cross = torch.einsum("anr,bns->abrs", expert, target)
    rho = ((1.0 - shrinkage) * torch.linalg.svdvals(cross)).clamp(0.0, _RHO_MAX)
    return -0.5 * torch.log1p(-(rho**2)).sum(-1)


def gaussian_mi(
    x: torch.Tensor, y: torch.Tensor, rank: int = 16, shrinkage: float = DEFAULT_SHRINKAGE
) -> float:
    """Gaussian (canonical-correlation) MI in nats between paired rows of x [n, d_x], y [n, d_y]."""
    _check_pair(x, y, 2, _MIN_SAMPLES)
    config = MIConfig(mi_rank=rank, shrinkage=shrinkage)
    return float(mi_matrix(x[:, None], y[:, None], config)[0, 0])


def _ksg_scores(states: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened principal scores [L, n, r] (unit variance per kept component) and kept counts."""
    bases, kept = _principal_bases(states, rank)
    return bases * math.sqrt(states.shape[0] - 1), kept


def _ksg_from_distances(dx: torch.Tensor, dy: torch.Tensor, k: int) -> float:
    """KSG algorithm 1 from max-norm distance matrices whose diagonals are +inf."""
    n = dx.shape[0]
    eps = torch.maximum(dx, dy).topk(k, dim=1, largest=False).values[:, k - 1 : k]
    nx = (dx < eps).sum(1).to(torch.float64)
    ny = (dy < eps).sum(1).to(torch.float64)
    psi = torch.special.digamma
    constant = psi(torch.tensor(float(k), dtype=torch.float64)) + psi(
        torch.tensor(float(n), dtype=torch.float64)
    )
    return float(constant - (psi(nx + 1) + psi(ny + 1)).mean())


def _max_norm_distances(scores: torch.Tensor) -> torch.Tensor:
    distances = torch.cdist(scores, scores, p=math.inf)
    return distances.fill_diagonal_(math.inf)


def ksg_mi(x: torch.Tensor, y: torch.Tensor, k: int = 3, rank: int = 8) -> float:
    """KSG (Kraskov algorithm 1) MI in nats between paired rows of x [n, d_x], y [n, d_y]."""
    _check_pair(x, y, 2, max(_MIN_SAMPLES, k + 1))
    config = MIConfig(estimator="ksg", ksg_k=k, ksg_rank=rank)
    return float(mi_matrix(x[:, None], y[:, None], config)[0, 0])


def _ksg_matrix(expert: torch.Tensor, target: torch.Tensor, config: MIConfig) -> torch.Tensor:
    n = expert.shape[0]
    if config.max_samples is not None and n > config.max_samples:
        generator = torch.Generator().manual_seed(config.seed)
        rows = torch.randperm(n, generator=generator)[: config.max_samples].sort().values
        expert, target = expert[rows], target[rows]
        log.info("KSG on %d of %d rows (seed %d)", config.max_samples, n, config.seed)
    x_scores, x_kept = _ksg_scores(expert, config.ksg_rank)
    y_scores, y_kept = _ksg_scores(target, config.ksg_rank)
    _warn_degenerate(x_kept, "expert")
    _warn_degenerate(y_kept, "target")
    target_distances = [_max_norm_distances(scores) for scores in y_scores]
    mi = torch.full((expert.shape[1], target.shape[1]), math.nan, dtype=torch.float64)
    for i, scores in enumerate(x_scores):
        if x_kept[i] == 0:
            continue
        dx = _max_norm_distances(scores)
        for j, dy in enumerate(target_distances):
            if y_kept[j] > 0:
                mi[i, j] = _ksg_from_distances(dx, dy, config.ksg_k)
    return mi


def mi_matrix(
    expert: torch.Tensor, target: torch.Tensor, config: MIConfig | None = None
) -> torch.Tensor:
    """MI in nats [L_E, L_T] (float64) between every expert layer i and target layer j.

    `expert` [n, L_E, d_E'] (encoded expert states, any width) and `target` [n, L_T, d_T] hold
    the same n prompts in the same order. Pairs with a layer that does not vary are NaN.
    """
    config = config or MIConfig()
    minimum = max(_MIN_SAMPLES, config.ksg_k + 1) if config.estimator == "ksg" else _MIN_SAMPLES
    _check_pair(expert, target, 3, minimum)
    n, layers_e, _ = expert.shape
    layers_t = target.shape[1]
    if config.estimator == "ksg":
        mi = _ksg_matrix(expert, target, config)
    else:
        x_bases, x_kept = _principal_bases(expert, config.mi_rank)
        y_bases, y_kept = _principal_bases(target, config.mi_rank)
        _warn_degenerate(x_kept, "expert")
        _warn_degenerate(y_kept, "target")
        r_x, r_y = x_bases.shape[2], y_bases.shape[2]
        if r_x + r_y >= n:
            log.warning(
                "MI with %d + %d components from only %d prompts: sample canonical correlations "
                "saturate and the estimates mostly reflect the shrinkage; use more prompts or a "
                "smaller mi_rank",
                r_x,
                r_y,
                n,
            )
        mi = _gaussian_from_bases(x_bases, y_bases, config.shrinkage)
        invalid = (x_kept == 0)[:, None] | (y_kept == 0)[None, :]
        mi = mi.masked_fill(invalid.to(mi.device), math.nan)
    log.info("%s MI over %d prompts: %d x %d layer pairs", config.estimator, n, layers_e, layers_t)
    return mi.cpu()


def window_mask(
    count: int,
    layers: Sequence[int] | None,
    num_layers: int | None,
    window: tuple[float, float],
    side: str,
) -> torch.Tensor:
    """Which of the `count` captured layers lie in `window` of the model's real depth."""
    option = "window" if side == "target" else "expert_window"
    if layers is None:
        layers = list(range(count))
        num_layers = count if num_layers is None else num_layers
    elif num_layers is None:
        raise ValueError(
            f"pass num_{side}_layers (the {side}'s total block count) together with "
            f"{side}_layers, so that `{option}` is judged on the model's real depth"
        )
    layers = [int(layer) for layer in layers]
    if len(layers) != count:
        raise PairingError(
            f"{side}_layers has {len(layers)} entries but the MI matrix has {count} {side} layers"
        )
    if len(set(layers)) != count or not all(0 <= layer < num_layers for layer in layers):
        raise PairingError(
            f"{side}_layers must be distinct block indices in 0..{num_layers - 1}, got {layers}"
        )
    depth = (torch.tensor(layers, dtype=torch.float64) + 0.5) / num_layers
    lo, hi = window
    mask = (depth >= lo) & (depth < hi)
    if not mask.any():
        raise PairingError(
            f"`{option}` {window} contains none of the captured {side} layers {layers} "
            f"(L={num_layers} blocks; block j sits at depth (j + 0.5) / L, inside when "
            f"lo <= depth < hi); widen `{option}` or capture layers inside it"
        )
    return mask


def pair_indices(
    pairs: Sequence[tuple[int, int]],
    *,
    expert_layers: Sequence[int],
    target_layers: Sequence[int],
    num_expert_layers: int,
    num_target_layers: int,
) -> list[tuple[int, int]]:
    """(expert, target) indices into the captured `expert_layers` / `target_layers` of pairs
    given as real block numbers (negative numbers count from the last block); each layer must
    have been captured, each expert layer used once (one translation target per encoder)."""
    sides = {
        "expert": (expert_layers, num_expert_layers),
        "target": (target_layers, num_target_layers),
    }
    indices = []
    for i, j in pairs:
        for side, layer in (("expert", i), ("target", j)):
            captured, depth = sides[side]
            if not -depth <= layer < depth or layer % depth not in captured:
                raise ValueError(
                    f"translation pair [{i}, {j}]: {side} layer {layer} was not captured "
                    f"(captured: {captured}); add it to the data module's {side}_layers"
                )
        indices.append(
            (
                list(expert_layers).index(i % num_expert_layers),
                list(target_layers).index(j % num_target_layers),
            )
        )
    experts = [i for i, _ in indices]
    if len(set(experts)) != len(experts):
        raise ValueError(
            f"translation pairs {pairs} use an expert layer twice; each encoder is translated "
            "into one target layer"
        )
    return indices


def same_depth(
    layer: int, num_layers: int, target_layers: Sequence[int], num_target_layers: int
) -> int:
    """Index into `target_layers` of the block closest in relative depth to block `layer` of
    an expert with `num_layers` blocks (block centres, (j + 0.5) / L; ties to the lower)."""
    depth = (layer + 0.5) / num_layers
    target = [(block + 0.5) / num_target_layers for block in target_layers]
    return min(range(len(target)), key=lambda j: abs(target[j] - depth))


def select_pairs(
    mi: torch.Tensor,
    config: PairingConfig | None = None,
    *,
    expert_layers: Sequence[int] | None = None,
    target_layers: Sequence[int] | None = None,
    num_expert_layers: int | None = None,
    num_target_layers: int | None = None,
    r2: torch.Tensor | None = None,
) -> list[tuple[int, int]]:
    """Lowest-MI (row, column) indices of `mi` inside both depth windows, ascending MI — or,
    with `select: translatable`, the highest held-out R^2 of `r2` (same shape).

    Returns `top_k` pairs (`candidates` with `select: dev`; the dev choice happens elsewhere),
    fewer with a warning when the windows hold fewer. Rows/columns index `expert_layers` /
    `target_layers` (the captured block numbers; default 0..L-1), judged against the models'
    total depths `num_*_layers` (required when the layer lists are given). NaN entries are
    skipped; ties go to the lower row, then the lower column.
    """
    config = config or PairingConfig()
    if config.select == "translatable":
        if r2 is None or tuple(r2.shape) != tuple(mi.shape):
            raise PairingError(
                "select 'translatable' needs the held-out R^2 matrix of the ridge maps, which "
                "comes from a token-level corpus: set the data module's `corpus` option"
            )
        mi = -r2
    if mi.ndim != 2 or mi.numel() == 0:
        raise PairingError(f"MI matrix must be 2-D and non-empty, got shape {tuple(mi.shape)}")
    shape = mi.shape
    rows = window_mask(shape[0], expert_layers, num_expert_layers, config.expert_window, "expert")
    cols = window_mask(shape[1], target_layers, num_target_layers, config.window, "target")
    values = mi.detach().to("cpu", torch.float64)
    allowed = rows[:, None] & cols[None, :] & torch.isfinite(values)
    if not allowed.any():
        raise PairingError("every MI entry inside the depth windows is NaN (constant layers)")
    flat = values.masked_fill(~allowed, math.inf).flatten()
    order = torch.sort(flat, stable=True).indices[: int(allowed.sum())].tolist()
    wanted = config.candidates if config.select == "dev" else config.top_k
    chosen: list[tuple[int, int]] = []
    used_targets: set[int] = set()
    for index in order:
        i, j = divmod(index, mi.shape[1])
        if config.unique_target and j in used_targets:
            continue
        chosen.append((i, j))
        used_targets.add(j)
        if len(chosen) == wanted:
            break
    if len(chosen) < wanted:
        log.warning("only %d pairs inside the windows, %d requested", len(chosen), wanted)
    return chosen


def _jsonable(config: Any) -> dict[str, Any]:
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in asdict(config).items()
    }


def pairs_payload(
    mi: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    mi_config: MIConfig,
    pairing_config: PairingConfig,
    expert_layers: list[int],
    target_layers: list[int],
    extra: dict[str, torch.Tensor | None] | None = None,
) -> dict[str, Any]:
    """JSON-able content of `pairs.json`: the chosen pairs with real block numbers and MI
    (and each matrix of `extra`, e.g. `mi_shuffled`, `heldout_r2`, at the pair)."""
    if mi.ndim != 2 or tuple(mi.shape) != (len(expert_layers), len(target_layers)):
        raise PairingError(
            f"MI matrix shape {tuple(mi.shape)} does not match {len(expert_layers)} expert and "
            f"{len(target_layers)} target layers"
        )
    entries = []
    for i, j in pairs:
        if not (0 <= i < mi.shape[0] and 0 <= j < mi.shape[1]):
            raise PairingError(f"pair ({i}, {j}) is outside the MI matrix {tuple(mi.shape)}")
        entry = {
            "expert_layer": int(expert_layers[i]),
            "target_layer": int(target_layers[j]),
            "expert_index": int(i),
            "target_index": int(j),
            "mi": float(mi[i, j]),
        }
        for name, matrix in (extra or {}).items():
            entry[name] = None if matrix is None else float(matrix[i, j])
        entries.append(entry)
    return {
        "kind": "pairs",
        "units": "nats",
        "estimator": mi_config.estimator,
        "pairs": entries,
        "expert_layers": [int(layer) for layer in expert_layers],
        "target_layers": [int(layer) for layer in target_layers],
        "mi_config": _jsonable(mi_config),
        "pairing_config": _jsonable(pairing_config),
    }


def read_pairs_file(path: str | Path) -> tuple[list[list[int]], dict[str, Any]]:
    """[expert_layer, target_layer] pairs (real layer numbers) of a `pairs.json`, and the
    model identity fields it records (`MODEL_FIELDS`, for the caller to check)."""
    payload = load_json(path, "pairs")
    try:
        pairs = [[int(p["expert_layer"]), int(p["target_layer"])] for p in payload["pairs"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{path}: 'pairs' must be a list of {{expert_layer, target_layer}} objects ({error})"
        ) from error
    identity = {name: payload[name] for name in MODEL_FIELDS if name in payload}
    return pairs, identity
