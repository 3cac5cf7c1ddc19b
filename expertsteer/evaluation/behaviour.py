"""Behaviour steering: continuations of neutral prompts under steering, scored for a concept and
for fluency, with the dev rule that chooses each direction's alpha and layers.

* `continue_prompts`: plain-text continuations (no chat template: the target continues the
  prompt's sentence) of many (prompt, steering, sample) rows at once. Each row carries its own
  additions, so the configurations of a grid share one batched `generate` with the KV cache.
  Sampling is a Gumbel-max draw from a per-row generator seeded by (seed, prompt id, sample):
  the same seed gives the same continuations whatever the batch holds, and every configuration
  sees the same noise for the same prompt and sample (common random numbers). Each batch's
  continuations are then scored under the unsteered target (perplexity of the new tokens).
* `median_token_norms`: s_j, the median per-token residual norm of block j on the dev prompts,
  each prompt's first position left out (it carries outlier norms): alpha is a fraction of it.
* Fluency and diversity: `distinct2`, `degenerate` (empty, or a token loop).
* `choose`: the dev rule, `perplexity_cap` (the highest concept score whose mean perplexity is
  within `perplexity_cap` x the unsteered one) or `harmonic` (the harmonic mean of the concept
  share and the fluency min(1, ppl_none / ppl)).
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from expertsteer.models.causal_lm import CausalLM, block_hidden
from expertsteer.settings import check_choices, check_integer

Rule = Literal["perplexity_cap", "harmonic"]


@dataclass(frozen=True)
class BehaviourConfig:
    """How continuations are generated and how a direction's setting is chosen on dev."""

    max_new_tokens: int = 30
    """New tokens per continuation."""
    samples: int = 2
    """Sampled continuations per test prompt, besides the greedy one (fixed seeds)."""
    temperature: float = 0.7
    """Sampling temperature."""
    dev_samples: int = 0
    """Sampled continuations per dev prompt besides the greedy one."""
    rule: Rule = "perplexity_cap"
    """Dev rule: `perplexity_cap` (highest concept score within the cap) or `harmonic`."""
    perplexity_cap: float = 2.0
    """`perplexity_cap` rule: the largest mean dev perplexity allowed, as a multiple of the
    unsteered target's."""
    batch_size: int = 48
    """Continuations per `generate` call."""
    num_examples: int = 4
    """Test prompts shown side by side in the report."""

    def __post_init__(self) -> None:
        check_choices(self)
        check_integer("max_new_tokens", self.max_new_tokens, 1)
        check_integer("samples", self.samples, 0)
        check_integer("dev_samples", self.dev_samples, 0)
        check_integer("batch_size", self.batch_size, 1)
        check_integer("num_examples", self.num_examples, 0)
        for option in ("temperature", "perplexity_cap"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{option} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Row:
    """One continuation to make: a prompt, the additions per block (None: unsteered), and the
    sample index (None: greedy)."""

    prompt_id: str
    """Id of the prompt (seeds the sampling noise)."""
    text: str
    """Text to continue."""
    additions: dict[int, torch.Tensor] | None = None
    """Block -> vector [d] added at every position of that block's output."""
    sample: int | None = None
    """Sample index; None for the greedy continuation."""


@dataclass
class Continuation:
    """A continuation and its unsteered perplexity."""

    text: str
    """The new text, decoded without special tokens."""
    perplexity: float
    """exp(mean negative log-likelihood) of the new tokens (through EOS) under the unsteered
    target, given the prompt."""


def row_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The sampling seed of one (prompt, sample), independent of batch and configuration."""
    return zlib.crc32(f"{seed}\0{prompt_id}\0{sample}".encode())


class GumbelSampler(LogitsProcessor):
    """Turns greedy decoding into sampling at `temperature` for the rows with a seed: adds
    Gumbel noise drawn from each row's own generator (seeded per row and step), so argmax is a
    draw from softmax(logits / temperature). Rows without a seed stay greedy."""

    def __init__(self, seeds: Sequence[int | None], temperature: float, width: int) -> None:
        self.seeds = list(seeds)
        self.temperature = temperature
        self.width = width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.width
        rows = [row for row, seed in enumerate(self.seeds) if seed is not None]
        if not rows:
            return scores
        noise = torch.stack(
            [
                torch.rand(
                    scores.shape[-1],
                    generator=torch.Generator().manual_seed(self.seeds[row] * 1009 + step),
                    dtype=torch.float64,
                )
                for row in rows
            ]
        ).clamp(1e-12, 1 - 1e-12)
        gumbel = -torch.log(-torch.log(noise)).to(scores.device)
        out = scores.clone()
        logp = torch.log_softmax(scores[rows].double() / self.temperature, dim=-1)
        out[rows] = (logp + gumbel).to(scores.dtype)
        return out


def _encode(decoder: CausalLM, texts: list[str]) -> dict[str, torch.Tensor]:
    """Plain text (no chat template), left-padded."""
    tokenizer = decoder.tokenizer
    tokenizer.padding_side = "left"
    encoding = tokenizer(texts, return_tensors="pt", padding=True)
    return {key: encoding[key].to(decoder.device) for key in ("input_ids", "attention_mask")}


def _add_hooks(decoder: CausalLM, additions: dict[int, torch.Tensor]) -> list[Any]:
    """Forward hooks adding `additions[j]` ([B, d], one vector per row) to block j's output."""
    blocks = decoder.hf_blocks()
    handles = []
    for layer, added in additions.items():

        def hook(module: Any, args: Any, output: Any, added: torch.Tensor = added) -> Any:
            hidden = block_hidden(output)
            steered = hidden + added[: hidden.shape[0], None, :].to(hidden.dtype)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        handles.append(blocks[layer].register_forward_hook(hook))
    return handles


def _stacked(rows: list[Row], width: int, device: torch.device) -> dict[int, torch.Tensor]:
    """Block -> [B, d] additions of a batch (zeros for rows that leave that block alone)."""
    layers = sorted({layer for row in rows if row.additions for layer in row.additions})
    stacked = {}
    for layer in layers:
        matrix = torch.zeros(len(rows), width, dtype=torch.float64)
        for index, row in enumerate(rows):
            if row.additions and layer in row.additions:
                matrix[index] = row.additions[layer].double()
        stacked[layer] = matrix.to(device)
    return stacked


@torch.inference_mode()
def continue_prompts(
    decoder: CausalLM,
    rows: list[Row],
    max_new_tokens: int,
    seed: int = 0,
    temperature: float = 0.7,
    batch_size: int = 48,
    min_new_tokens: int = 0,
) -> list[Continuation]:
    """Continuations of `rows`, `batch_size` rows per batched `generate` (KV cache on), each
    scored under the unsteered target. `min_new_tokens` > 0 suppresses EOS until then (the
    speed benchmark counts exact tokens)."""
    if not rows:
        return []
    out: list[Continuation] = []
    model = decoder.hf_model
    tokenizer = decoder.tokenizer
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    # Rows of one prompt length pad least together; results go back in the given order.
    order = sorted(range(len(rows)), key=lambda k: len(rows[k].text))
    results: dict[int, Continuation] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = [rows[k] for k in indices]
        encoding = _encode(decoder, [row.text for row in batch])
        width = encoding["input_ids"].shape[1]
        seeds = [
            None if row.sample is None else row_seed(seed, row.prompt_id, row.sample)
            for row in batch
        ]
        handles = _add_hooks(decoder, _stacked(batch, decoder.hidden_size, decoder.device))
        try:
            sequences = model.generate(
                **encoding,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([GumbelSampler(seeds, temperature, width)]),
                pad_token_id=tokenizer.pad_token_id,
                **({"min_new_tokens": min_new_tokens} if min_new_tokens else {}),
            )
        finally:
            for handle in handles:
                handle.remove()
        new = sequences[:, width:]
        keep = _through_eos(new, eos_ids)
        perplexities = _perplexities(model, sequences, encoding["attention_mask"], keep)
        for row_index, k in enumerate(indices):
            ids = new[row_index][keep[row_index]].tolist()
            text = tokenizer.decode(ids, skip_special_tokens=True)
            results[k] = Continuation(text, perplexities[row_index])
    out = [results[k] for k in range(len(rows))]
    return out


def _through_eos(new: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """bool [B, n]: the new tokens up to and including each row's first EOS."""
    if not eos_ids or new.shape[1] == 0:
        return torch.ones_like(new, dtype=torch.bool)
    is_eos = torch.zeros_like(new, dtype=torch.bool)
    for token in eos_ids:
        is_eos |= new == token
    before = is_eos.long().cumsum(-1) - is_eos.long()
    return before == 0


def _perplexities(
    model: torch.nn.Module, sequences: torch.Tensor, prompt_mask: torch.Tensor, keep: torch.Tensor
) -> list[float]:
    """exp(mean NLL) of the kept new tokens of each row under the unsteered model."""
    mask = torch.cat([prompt_mask, keep.long()], dim=-1)
    logits = model(input_ids=sequences, attention_mask=mask).logits
    width = prompt_mask.shape[1]
    # Token t is predicted from position t - 1.
    logp = torch.log_softmax(logits[:, width - 1 : -1].float(), dim=-1)
    new = sequences[:, width:]
    nll = -logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
    counts = keep.sum(-1).clamp(min=1)
    mean = (nll * keep).sum(-1) / counts
    return [float(math.exp(value)) for value in mean.tolist()]


@torch.inference_mode()
def median_token_norms(
    decoder: CausalLM, prompts: list[str], layers: list[int], batch_size: int = 16
) -> dict[int, float]:
    """s_j: the median L2 norm of block j's output over the real tokens of the plain-text
    `prompts`, each prompt's first real token left out (an attention sink with outlier norms)."""
    if not prompts:
        raise ValueError("median_token_norms needs at least one prompt")
    layers = decoder.check_layers(layers)
    norms: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    blocks = decoder.hf_blocks()
    for start in range(0, len(prompts), batch_size):
        encoding = _encode(decoder, prompts[start : start + batch_size])
        mask = encoding["attention_mask"]
        counted = mask.bool() & (mask.cumsum(-1) > 1)
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for layer in layers:

            def hook(
                module: Any,
                args: Any,
                output: Any,
                layer: int = layer,
                captured: dict[int, torch.Tensor] = captured,
            ) -> None:
                captured[layer] = block_hidden(output).detach()

            handles.append(blocks[layer].register_forward_hook(hook))
        try:
            decoder.hf_model(**encoding)
        finally:
            for handle in handles:
                handle.remove()
        for layer in layers:
            norms[layer].append(captured[layer].double().norm(dim=-1)[counted].cpu())
    medians = {layer: float(torch.cat(values).median()) for layer, values in norms.items()}
    bad = [layer for layer, value in medians.items() if not (math.isfinite(value) and value > 0)]
    if bad:
        raise FloatingPointError(f"non-finite or zero residual norms at blocks {bad}")
    return medians


# -- fluency and diversity -------------------------------------------------------------------


def _bigrams(words: list[str]) -> list[tuple[str, str]]:
    return list(itertools.pairwise(words))


def distinct2(texts: Sequence[str]) -> float:
    """Distinct word bigrams over all bigrams of `texts` (corpus-level distinct-2; 0 with none)."""
    bigrams = [pair for text in texts for pair in _bigrams(text.lower().split())]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def degenerate(text: str, repeats: int = 3, max_period: int = 4) -> bool:
    """Whether a continuation is empty, or a token loop: some word n-gram (n <= `max_period`)
    repeated `repeats` times in a row."""
    words = text.split()
    if not words:
        return True
    for period in range(1, max_period + 1):
        span = period * repeats
        for start in range(0, len(words) - span + 1):
            unit = words[start : start + period]
            if all(
                words[start + k * period : start + (k + 1) * period] == unit for k in range(repeats)
            ):
                return True
    return False


# -- the dev rule ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevPoint:
    """A configuration's dev figures."""

    concept: float
    """Mean concept score."""
    share: float
    """Share of continuations showing the concept."""
    perplexity: float
    """Mean perplexity under the unsteered target."""


Setting = tuple[tuple[int, ...], float]
"""(target layers, alpha)."""


def choose(
    points: dict[Setting, DevPoint],
    none: DevPoint,
    rule: Rule = "perplexity_cap",
    cap: float = 2.0,
    layer_order: Sequence[tuple[int, ...]] = (),
) -> Setting:
    """The setting the dev rule keeps.

    `perplexity_cap`: the highest mean concept score among settings whose mean perplexity is at
    most `cap` x the unsteered one's; when none stays within the cap, the least perplexing
    setting. `harmonic`: the highest harmonic mean of the concept share and the fluency
    min(1, ppl_none / ppl). Ties go to the smaller |alpha|, then the earlier layer set of
    `layer_order`, then alpha > 0."""
    if not points:
        raise ValueError("no dev results to choose from")
    order = {layers: k for k, layers in enumerate(layer_order)}

    def tie(setting: Setting) -> tuple:
        layers, alpha = setting
        return (-abs(alpha), -order.get(layers, len(order)), alpha)

    if rule == "harmonic":

        def harmonic(point: DevPoint) -> float:
            fluency = min(1.0, none.perplexity / point.perplexity)
            total = point.share + fluency
            return 0.0 if total == 0 else 2 * point.share * fluency / total

        return max(points, key=lambda s: (harmonic(points[s]), *tie(s)))
    within = [s for s, p in points.items() if p.perplexity <= cap * none.perplexity]
    if within:
        return max(within, key=lambda s: (points[s].concept, *tie(s)))
    return max(points, key=lambda s: (-points[s].perplexity, *tie(s)))
