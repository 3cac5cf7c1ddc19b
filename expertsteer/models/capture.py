"""Capture sequence-level hidden states of chosen decoder blocks through nnsight traces."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import nnsight
import torch
from tqdm.auto import tqdm

from expertsteer.models.batching import check_budget, token_batches
from expertsteer.models.causal_lm import CausalLM, block_hidden

log = logging.getLogger(__name__)

Position = Literal["last", "mean"]
POSITIONS: tuple[str, ...] = ("last", "mean")


def pool(hidden: torch.Tensor, mask: torch.Tensor, position: Position) -> torch.Tensor:
    """Reduce `[B, T, d]` block outputs to `[B, d]` per prompt.

    `last` takes the last prompt token (the right edge, since batches are left-padded); `mean`
    averages over the prompt's real tokens only.
    """
    if position == "last":
        return hidden[:, -1, :]
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


def capture_batches(
    decoder: CausalLM,
    prompts: list[str],
    completions: list[str] | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """The index groups `capture` runs one traced forward each over: `batch_size` texts at
    most and, with `max_tokens`, at most that many padded tokens (an over-budget text alone)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_budget("max_tokens", max_tokens)
    if max_tokens is None:
        return token_batches([0] * len(prompts), batch_size)
    return token_batches(decoder.token_lengths(prompts, completions), batch_size, max_tokens)


def capture(
    decoder: CausalLM,
    prompts: list[str],
    layers: list[int] | None = None,
    position: Position = "last",
    completions: list[str] | None = None,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    on_batch: Callable[[], None] | None = None,
    max_tokens: int | None = None,
) -> dict[int, torch.Tensor]:
    """Hidden states of `layers` (default: all) for every prompt: `{layer: [N, d]}` on CPU.

    With `completions`, each text is the formatted prompt followed by its completion, and
    `last` is the completion's last token.

    "Hidden state of layer i" is the residual-stream output of decoder block i (the last
    block's output is taken before the model's final norm). The forward stops after the deepest
    requested block, so the LM head is never computed. Batches hold `batch_size` texts, fewer
    where `max_tokens` caps their padded size (`capture_batches`). States stay on the model's
    device, in `dtype`, until all are captured. `on_batch` is called after each traced forward
    (e.g. to advance a caller's progress bar).
    """
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got '{position}'")
    if not prompts:
        raise ValueError("capture needs at least one prompt")
    if completions is not None and len(completions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    layers = decoder.check_layers(layers)
    groups = capture_batches(decoder, prompts, completions, batch_size, max_tokens)
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for group in tqdm(groups, desc=f"capture {decoder.name}", disable=not progress):
        batch = capture_batch(
            decoder,
            [prompts[k] for k in group],
            layers,
            position,
            [completions[k] for k in group] if completions is not None else None,
        )
        for layer in layers:
            chunks[layer].append(batch[layer].to(dtype))
        if on_batch is not None:
            on_batch()
    return {layer: torch.cat(parts).cpu() for layer, parts in chunks.items()}


@torch.inference_mode()
def capture_batch(
    decoder: CausalLM,
    prompts: list[str],
    layers: list[int],
    position: Position,
    completions: list[str] | None = None,
) -> dict[int, torch.Tensor]:
    """One traced forward over `prompts`; `layers` must be sorted (model execution order)."""
    encoding = decoder.encode(prompts, completions)
    mask = encoding["attention_mask"]
    blocks = decoder.blocks()
    with decoder.lm.trace(**encoding) as tracer:
        # Only values passed to nnsight.save leave the trace.
        saved = nnsight.save(
            [pool(block_hidden(blocks[layer].output), mask, position) for layer in layers]
        )
        tracer.stop()
    out = dict(zip(layers, saved, strict=True))
    for layer, tensor in out.items():
        if not torch.isfinite(tensor).all():
            raise FloatingPointError(
                f"non-finite activations at layer {layer} of '{decoder.name}' (NaN or inf); "
                "check the model weights and dtype (float16 overflows on some models)"
            )
    return out
