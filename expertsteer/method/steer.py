"""Steer a target LLM at inference: add alpha * s_j * v to the residual stream of block j.

The addition happens on the output of decoder block j inside an nnsight trace, so the model's
weights never change. `s_j` is the mean residual norm of block j (`mean_residual_norms`), which
makes `alpha` a dimensionless fraction of the typical hidden-state size.

Which tokens receive the addition (`positions`):

* In a forward over prompt (+ completion) texts (`steered_logits`, used for option scoring):
  `all` every real token, `prompt` the prompt's tokens, `generated` the completion's tokens,
  `last_prompt` the prompt's last token. Pad positions never.
* During generation (`steered_generate`, KV cache on): `all` the prompt pass and every decode
  step, `prompt` the prompt pass only, `generated` the decode steps only (the first new token is
  predicted from the unsteered prompt pass), `last_prompt` the last prompt token of the prompt
  pass only. Both views agree: a forward over prompt + generated text with the same positions
  reproduces the generation's steered states.

A conditioned intervention (`Intervention.coefficients`, `expertsteer.method.conditioned`)
adds a different multiple of its directions to each row: alpha * s_j * c(x) @ v_j.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

import nnsight
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from expertsteer.method.vectors import POSITIONS, SteeringVectors
from expertsteer.models.causal_lm import CausalLM, block_hidden

log = logging.getLogger(__name__)

__all__ = [
    "POSITIONS",
    "Intervention",
    "mean_residual_norms",
    "position_mask",
    "prompt_lengths",
    "steered_generate",
    "steered_generate_ids",
    "steered_logits",
]

# nnsight warns when a bounded `tracer.iter` loop asks for more decode steps than the run made;
# that is expected whenever every row stops at EOS before `max_new_tokens`.
_CUT_SHORT = r".*was never reached: the loop asked for a step the run did not make"


@dataclass
class Intervention:
    """What to add where: alpha * scales[j] * vectors[j] on the output of target block j."""

    vectors: dict[int, torch.Tensor]
    """Target block -> direction [d] (normally unit length); negative indices count from the end."""
    scales: dict[int, float]
    """Target block -> s_j, the mean residual norm of that block (alpha is a fraction of it)."""
    alpha: float = 0.0
    """Steering strength as a fraction of s_j; 0 leaves the model unchanged."""
    positions: str = "all"
    """Which tokens are steered: one of `POSITIONS` (see the module docstring)."""
    coefficients: torch.Tensor | None = None
    """Input-dependent steering (`expertsteer.method.conditioned`): `[N, K]` weights, one row
    per prompt row, of the K directions each `vectors[j]` then holds (`[K, d]`): row n gets
    alpha * s_j * coefficients[n] @ vectors[j]. None: the same addition for every row."""
    reference: torch.Tensor | None = None
    """`[K]` coefficients of the calibration prompts (the steer split's mean coefficient), so
    calibration removes the average push and keeps the input-dependent part; None: zeros."""

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got '{self.positions}'")
        if not self.vectors:
            raise ValueError("an Intervention needs at least one target layer in `vectors`")
        if set(self.vectors) != set(self.scales):
            raise ValueError(
                f"vectors are given for layers {sorted(self.vectors)} but scales for "
                f"{sorted(self.scales)}; every steered layer needs exactly one of each"
            )
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha}")
        widths = set()
        rank = 1 if self.coefficients is None else 2
        self._check_coefficients()
        for layer, vector in self.vectors.items():
            if not isinstance(vector, torch.Tensor) or vector.ndim != rank:
                shape = "a 1-d tensor [d]" if rank == 1 else "a 2-d tensor [K, d] (coefficients)"
                raise ValueError(f"steering vector of layer {layer} must be {shape}")
            if rank == 2 and vector.shape[0] != self.coefficients.shape[1]:
                raise ValueError(
                    f"layer {layer} has {vector.shape[0]} directions but the coefficients weigh "
                    f"{self.coefficients.shape[1]}"
                )
            if not torch.isfinite(vector).all():
                raise ValueError(f"steering vector of layer {layer} has NaN or inf entries")
            scale = float(self.scales[layer])
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(
                    f"scale (mean residual norm) of layer {layer} must be a positive finite "
                    f"number, got {scale}"
                )
            widths.add(int(vector.shape[-1]))
        if len(widths) != 1:
            raise ValueError(f"steering vectors must all have one width, got {sorted(widths)}")

    def _check_coefficients(self) -> None:
        for name in ("coefficients", "reference"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(value).all():
                raise ValueError(f"{name} of a conditioned intervention have NaN or inf entries")
        if self.coefficients is None:
            if self.reference is not None:
                raise ValueError("reference coefficients need per-row coefficients")
            return
        if self.coefficients.ndim != 2:
            raise ValueError(
                f"coefficients must be [N, K], got shape {tuple(self.coefficients.shape)}"
            )
        if self.reference is not None and self.reference.shape != self.coefficients.shape[1:]:
            raise ValueError(
                f"reference must be [K] = [{self.coefficients.shape[1]}], got shape "
                f"{tuple(self.reference.shape)}"
            )

    @classmethod
    def from_steering(
        cls,
        steering: SteeringVectors,
        alpha: float,
        positions: str = "all",
        layers: list[int] | None = None,
    ) -> Intervention:
        """An intervention from a steering artifact, on all its layers or the chosen `layers`."""
        chosen = steering.layers if layers is None else list(layers)
        missing = [layer for layer in chosen if layer not in steering.vectors]
        if missing:
            raise ValueError(
                f"layers {missing} have no steering vector; the artifact steers {steering.layers}"
            )
        return cls(
            vectors={layer: steering.vectors[layer] for layer in chosen},
            scales={layer: float(steering.norm_scale[layer]) for layer in chosen},
            alpha=alpha,
            positions=positions,
        )

    @property
    def width(self) -> int:
        return int(next(iter(self.vectors.values())).shape[-1])

    @property
    def conditioned(self) -> bool:
        """Whether the addition differs per row (`coefficients`)."""
        return self.coefficients is not None

    def for_rows(self, rows: list[int] | torch.Tensor) -> Intervention:
        """The intervention of a forward batch whose row b is row `rows[b]` of this one (the
        same one when the addition is the same for every row)."""
        if self.coefficients is None:
            return self
        index = torch.as_tensor(rows, dtype=torch.long, device=self.coefficients.device)
        return replace(self, coefficients=self.coefficients[index])

    def calibration(self) -> Intervention:
        """What the content-free calibration prompts get: this intervention, or for a
        conditioned one the fixed addition of its `reference` coefficients (alpha 0 when they
        are zero: then the calibration is unsteered)."""
        if self.coefficients is None:
            return self
        reference = (
            torch.zeros(self.coefficients.shape[1], dtype=torch.float64)
            if self.reference is None
            else self.reference.double()
        )
        return Intervention(
            vectors={
                layer: (reference.to(rows.device) @ rows.double()).to(rows.dtype)
                for layer, rows in self.vectors.items()
            },
            scales=dict(self.scales),
            alpha=self.alpha if bool(reference.any()) else 0.0,
            positions=self.positions,
        )

    @property
    def active(self) -> bool:
        """Whether applying it changes anything at all."""
        return self.alpha != 0.0

    def additions(self, decoder: CausalLM) -> dict[int, torch.Tensor]:
        """alpha * s_j * v `[d]` per resolved (non-negative) block (conditioned: one row per
        prompt row, `[N, 1, d]`), in the model's dtype and device, sorted by layer (the order
        the forward reaches them). Checks layers and width first."""
        if self.width != decoder.hidden_size:
            raise ValueError(
                f"steering vectors have width {self.width} but '{decoder.name}' has hidden size "
                f"{decoder.hidden_size}; they were made for another model"
            )
        resolved: dict[int, torch.Tensor] = {}
        dtype = _dtype(decoder)
        for layer in self.vectors:
            (index,) = decoder.check_layers([layer])
            if index in resolved:
                raise ValueError(
                    f"layers {layer} and {index} name the same block of '{decoder.name}'"
                )
            vector = self.vectors[layer].double()
            if self.coefficients is not None:
                vector = (self.coefficients.double().to(vector.device) @ vector).unsqueeze(1)
            added = self.alpha * float(self.scales[layer]) * vector
            resolved[index] = added.to(decoder.device, dtype)
        return dict(sorted(resolved.items()))


def _dtype(decoder: CausalLM) -> torch.dtype:
    return next(decoder.hf_model.parameters()).dtype


def position_mask(
    attention_mask: torch.Tensor,
    prompt_lengths: torch.Tensor | None,
    positions: str,
) -> torch.Tensor:
    """Which tokens of a left-padded prompt (+ completion) batch get the addition: bool [B, T].

    `prompt_lengths[b]` counts the prompt's real tokens in row b (the rest of the row's real
    tokens are the completion); `None` means every real token is prompt.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got '{positions}'")
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    counts = real.sum(-1)
    if prompt_lengths is None:
        prompt_lengths = counts
    prompt_lengths = torch.as_tensor(prompt_lengths, device=real.device)
    if prompt_lengths.shape != counts.shape:
        raise ValueError(
            f"prompt_lengths must have one entry per row ({counts.shape[0]}), "
            f"got shape {tuple(prompt_lengths.shape)}"
        )
    if ((prompt_lengths < 0) | (prompt_lengths > counts)).any():
        raise ValueError(
            f"prompt_lengths {prompt_lengths.tolist()} must lie between 0 and each row's number "
            f"of real tokens {counts.tolist()}"
        )
    # Index of each token among its row's real tokens (left padding puts them at the right).
    rank = real.long().cumsum(-1) - 1
    boundary = prompt_lengths.unsqueeze(-1)
    if positions == "all":
        return real
    if positions == "prompt":
        return real & (rank < boundary)
    if positions == "generated":
        return real & (rank >= boundary)
    return real & (rank == boundary - 1)


def _steer(block: Any, added: torch.Tensor, weights: torch.Tensor, stop: int) -> None:
    """Add `added` [d], weighted per token by `weights` [B, total, 1], to a block's output.

    The output's T columns are the sequence's columns stop - T .. stop - 1: a KV-cache decode
    step forwards only the newest token.
    """
    output = block.output
    hidden = block_hidden(output)
    steered = hidden + weights[:, stop - hidden.shape[1] : stop] * added
    block.output = (steered, *output[1:]) if isinstance(output, tuple) else steered


def _plan(
    decoder: CausalLM,
    intervention: Intervention | None,
    mask: torch.Tensor,
    prompt_lengths: torch.Tensor | None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """The additions per block (none when nothing changes) and the token weights [B, T, 1].

    Everything is checked even at alpha = 0, so a sweep fails on its first point.
    """
    if intervention is None:
        return {}, None
    if intervention.conditioned and intervention.coefficients.shape[0] != mask.shape[0]:
        rows = intervention.coefficients.shape[0]
        raise ValueError(
            f"the conditioned intervention has coefficients for {rows} rows but the batch has "
            f"{mask.shape[0]}; select them with `for_rows`"
        )
    token_mask = position_mask(mask, prompt_lengths, intervention.positions)
    additions = intervention.additions(decoder)
    weights = token_mask.to(_dtype(decoder)).unsqueeze(-1)
    return (additions if intervention.active else {}), weights


def _check_encoding(encoding: dict) -> None:
    missing = {"input_ids", "attention_mask"} - set(encoding)
    if missing:
        raise ValueError(f"encoding lacks {sorted(missing)}; build it with CausalLM.encode")


@torch.inference_mode()
def steered_logits(
    decoder: CausalLM,
    encoding: dict[str, torch.Tensor],
    intervention: Intervention | None,
    prompt_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token log-probabilities (log-softmax, float32) [B, T, V] under steering, from one
    traced forward over a left-padded `encoding` (`CausalLM.encode`).

    `prompt_lengths` (see `prompt_lengths`) splits each row into prompt and completion for the
    `prompt` / `generated` / `last_prompt` positions; `None` treats whole rows as prompt.
    """
    _check_encoding(encoding)
    mask = encoding["attention_mask"]
    additions, weights = _plan(decoder, intervention, mask, prompt_lengths)
    blocks = decoder.blocks()
    with decoder.lm.trace(**encoding):
        for layer, added in additions.items():
            _steer(blocks[layer], added, weights, mask.shape[1])
        logits = nnsight.save(decoder.lm.output.logits)
    return torch.log_softmax(logits.float(), dim=-1)


def steered_generate(
    decoder: CausalLM,
    prompts: list[str],
    intervention: Intervention | None,
    max_new_tokens: int = 32,
    **generate_kwargs: Any,
) -> list[str]:
    """Completions of `prompts` (greedy unless `generate_kwargs` say otherwise) under steering,
    decoded without special tokens; one left-padded batch, one nnsight generation trace."""
    ids = steered_generate_ids(decoder, prompts, intervention, max_new_tokens, **generate_kwargs)
    return decoder.tokenizer.batch_decode(ids, skip_special_tokens=True)


@torch.inference_mode()
def steered_generate_ids(
    decoder: CausalLM,
    prompts: list[str],
    intervention: Intervention | None,
    max_new_tokens: int = 32,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """The new token ids [B, n <= max_new_tokens] of `steered_generate` (rows that stopped
    early are filled with the pad id)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for option in ("num_beams", "num_return_sequences"):
        if generate_kwargs.get(option, 1) != 1:
            raise ValueError(
                f"{option}={generate_kwargs[option]} is not supported under steering: the "
                "additions are laid out per prompt row; generate one sequence per prompt"
            )
    generate_kwargs.setdefault("do_sample", False)
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    processors.append(CheckLogits(intervention))
    generate_kwargs["logits_processor"] = processors
    encoding = decoder.encode(prompts)
    mask = encoding["attention_mask"]
    width = mask.shape[1]
    # Columns past the prompt are the generated tokens (real in every row); the mask over
    # prompt + generated columns serves cached steps (one new column) and uncached ones.
    grown = torch.cat([mask, mask.new_ones(mask.shape[0], max_new_tokens)], dim=-1)
    additions, weights = _plan(decoder, intervention, grown, mask.sum(-1))
    if additions:
        cached = generate_kwargs.get("use_cache", decoder.hf_model.generation_config.use_cache)
        # Step 0 is the prompt pass; with the KV cache step k > 0 forwards only the k-th new
        # token, so prompt-side modes are done after step 0. Without the cache every step
        # recomputes the prompt, which must be steered again.
        if intervention.positions == "generated":
            first, stop = 1, max_new_tokens
        elif intervention.positions == "all" or cached is False:
            first, stop = 0, max_new_tokens
        else:
            first, stop = 0, 1
    blocks = decoder.blocks()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CUT_SHORT, category=UserWarning)
        try:
            with decoder.lm.generate(max_new_tokens=max_new_tokens, **generate_kwargs) as tracer:
                # The steering loop may outrun an EOS-shortened run, which ends its block
                # early, so the result is read in a block of its own.
                with tracer.invoke(encoding):
                    if additions:
                        for step in tracer.iter[first:stop]:
                            for layer, added in additions.items():
                                _steer(blocks[layer], added, weights, width + step)
                with tracer.invoke():
                    ids = tracer.result.save()
        except Exception as error:
            cause = _degenerate_cause(error)
            if cause is None:
                raise
            raise cause from error
    return ids[:, width:]


class DegenerateLogitsError(FloatingPointError):
    """Generation met NaN / inf logits, or logits equal across the vocabulary (an overflowed
    state normalised to zero); greedy decoding would silently pick token 0."""


class CheckLogits(LogitsProcessor):
    """Raises `DegenerateLogitsError` at the first decode step whose logits are not finite or
    carry no preference (every token scored the same)."""

    def __init__(self, intervention: Intervention | None) -> None:
        self.alpha = None if intervention is None else intervention.alpha

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        flat = scores.amax(dim=-1) == scores.amin(dim=-1)
        if torch.isnan(scores).any() or torch.isposinf(scores).any() or flat.any():
            where = "" if self.alpha is None else f" under steering at alpha {self.alpha:g}"
            raise DegenerateLogitsError(
                f"non-finite or constant logits at decode step {input_ids.shape[1]}{where}: "
                "the steered states overflow; use a smaller alpha (a few mean residual norms "
                "at most)"
            )
        return scores


def _degenerate_cause(error: BaseException) -> DegenerateLogitsError | None:
    """The `DegenerateLogitsError` behind `error` (nnsight may wrap what generate raised)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, DegenerateLogitsError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def prompt_lengths(
    decoder: CausalLM,
    prompts: list[str],
    completions: list[str],
    strict: bool = False,
) -> torch.Tensor:
    """Number of prompt tokens per row of `decoder.encode(prompts, completions)`: long [B].

    The formatted prompt's tokens should be a prefix of the formatted prompt + completion's.
    Where a tokenizer merges across the boundary they are not; then the shared prefix counts as
    prompt (the merged token holds completion text) and a warning is logged, or with `strict`
    a ValueError is raised.
    """
    if len(completions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    special = not decoder.use_chat_template
    alone = decoder.tokenizer(decoder.format(prompts), add_special_tokens=special)["input_ids"]
    joined = decoder.tokenizer(decoder.format(prompts, completions), add_special_tokens=special)[
        "input_ids"
    ]
    lengths = []
    for row, (head, full) in enumerate(zip(alone, joined, strict=True)):
        if full[: len(head)] == head:
            lengths.append(len(head))
            continue
        shared = next(
            (i for i, (a, b) in enumerate(zip(head, full, strict=False)) if a != b),
            min(len(head), len(full)),
        )
        message = (
            f"row {row}: the prompt's {len(head)} tokens are not a prefix of prompt + completion "
            f"(they agree on the first {shared}; the tokenizer merges across the boundary)"
        )
        if strict:
            raise ValueError(message + "; end prompts or start completions at a token boundary")
        log.warning("%s; counting %d tokens as prompt", message, shared)
        lengths.append(shared)
    return torch.tensor(lengths, dtype=torch.long, device=decoder.device)


@torch.inference_mode()
def mean_residual_norms(
    decoder: CausalLM,
    prompts: list[str],
    layers: list[int] | None,
    batch_size: int = 8,
    skip_first: int = 0,
) -> dict[int, float]:
    """s_j: the mean L2 norm of block j's output over the real tokens of the formatted
    `prompts`, for `layers` (default: all). One traced forward per batch, stopped after the
    deepest requested block.

    `skip_first` leaves out each prompt's first real tokens: attention-sink tokens (the first
    one, usually BOS or `<|im_start|>`) can carry norms ~100x the others (SmolLM2, middle
    blocks), so with them the mean depends on prompt length.
    """
    if not prompts:
        raise ValueError("mean_residual_norms needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if skip_first < 0:
        raise ValueError(f"skip_first must be >= 0, got {skip_first}")
    layers = decoder.check_layers(layers)
    totals = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    blocks = decoder.blocks()
    for start in range(0, len(prompts), batch_size):
        encoding = decoder.encode(prompts[start : start + batch_size])
        mask = encoding["attention_mask"]
        counted = mask.bool() & (mask.cumsum(-1) > skip_first)
        with decoder.lm.trace(**encoding) as tracer:
            sums = nnsight.save(
                [
                    block_hidden(blocks[layer].output).double().norm(dim=-1)[counted].sum()
                    for layer in layers
                ]
            )
            tracer.stop()
        totals += torch.stack(sums).cpu()
        count += int(counted.sum())
    if count == 0:
        raise ValueError(f"no tokens left to average: every prompt has <= {skip_first} tokens")
    norms = (totals / count).tolist()
    bad = [layer for layer, norm in zip(layers, norms, strict=True) if not math.isfinite(norm)]
    if bad:
        raise FloatingPointError(
            f"non-finite residual norms at layers {bad} of '{decoder.name}'; check the model "
            "weights and dtype"
        )
    return dict(zip(layers, norms, strict=True))
