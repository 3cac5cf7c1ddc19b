"""Calibration of option scores. Small models answer one letter (or one label) on most items
whatever the question (SmolLM2-135M gives one fixed letter on 76-100% of items), so raw argmax
accuracy mostly measures that habit, and a steering vector could look like a gain just by moving
it. Scores are therefore corrected for each model's average option preference, in log space
over the options of an item:

    calibrated[n, k] = log_softmax_k(s[n, k] - b[n, k]),  s = log_softmax_k(option scores)

* `content_free` (default for option modes; Zhao et al. 2021, "Calibrate before use"): b is the
  mean option log-distribution over content-free prompts — the item's prompt with only its
  content (question body or review text, and passage, if any) replaced by "N/A", "" and
  "[MASK]"; the task's instruction ("What is the sentiment of this movie review?") and answer
  format ("Answer with one of: ...", "Answer with the letter ...") stay, so the bias is
  measured on the task the items pose. In letter mode the shown option texts are content-free
  too; in text / label mode they are the item's own (those are what is scored; this is then
  the domain-conditional PMI of Holtzman et al. 2021).
* `mean`: b[k] is the mean of s[:, k] - s[:, 0] over the evaluated items (needs more than one
  item; see `mean_bias`).
* `none`: b = 0 (raw scores; always reported beside the calibrated ones).

The calibration prompts are scored under the same intervention as the items, so a vector that
only shifts the preferred letter shifts b by the same amount and gains nothing. An
input-dependent intervention (`expertsteer.method.conditioned`) calibrates under its reference
coefficients (the steer split's mean push): the average push is removed, the per-input part
stays.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch

from expertsteer.data.prompts import answer_text, render_prompt
from expertsteer.data.tasks import LETTERS, Example
from expertsteer.evaluation.options import score_options, score_options_grid
from expertsteer.models.causal_lm import CausalLM

log = logging.getLogger(__name__)

Calibration = Literal["content_free", "mean", "none"]
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)
CONTENT_FREE_INPUTS: tuple[str, ...] = ("N/A", "", "[MASK]")


def normalize_options(scores: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the options (last dim); -inf padding stays -inf."""
    return torch.log_softmax(scores, dim=-1)


def content_free_bias(scores: torch.Tensor) -> torch.Tensor:
    """`[K]` mean option log-distribution over content-free prompts `scores` `[C, K]`.

    Averaged in log space (a geometric mean of the probabilities, where Zhao et al. average the
    probabilities): only then does a per-option log-offset that a steering vector adds to every
    prompt reappear unchanged in the bias and cancel exactly.
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"content-free scores must be [C, K] with C >= 1, got {scores.shape}")
    return normalize_options(scores).mean(dim=0)


def mean_bias(scores: torch.Tensor) -> torch.Tensor:
    """`[K]` each option's mean log-odds against the first option over the items that have it.

    For a fixed option count this equals the mean option log-distribution over items (up to a
    constant, which calibration ignores). Measured against the first option, which every item
    has, a constant per-option offset still cancels exactly when items have different option
    counts; per-column means would average each column over a different set of items.
    """
    if scores.dim() != 2 or scores.shape[0] < 2:
        raise ValueError(
            "mean calibration needs more than one item (it estimates each option's average "
            f"preference over items), got scores of shape {tuple(scores.shape)}"
        )
    if not torch.isfinite(scores[:, 0]).all():
        raise ValueError("every item needs a finite score for its first option")
    odds = scores - scores[:, :1]
    valid = torch.isfinite(odds)
    counts = valid.sum(dim=0)
    sums = torch.where(valid, odds, 0.0).sum(dim=0)
    return torch.where(counts > 0, sums / counts.clamp(min=1), float("-inf"))


def apply_calibration(scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`log_softmax_k(log_softmax_k(scores) - bias)`; `bias` is `[K]` or `[N, K]`.

    A constant per-option offset in `scores` that is also in `bias` cancels exactly.
    """
    normalized = normalize_options(scores)
    bias = bias.to(normalized.dtype).expand_as(normalized)
    valid = torch.isfinite(normalized) & torch.isfinite(bias)
    return normalize_options(torch.where(valid, normalized - bias, float("-inf")))


def option_completions(task_type: str, example: Example, mode: str) -> list[str]:
    """The completions scored for `example` in `mode` (letters, answer texts or label words)."""
    count = len(example.choices)
    if mode == "letter":
        return list(LETTERS[:count])
    if mode == "text":
        return [answer_text(task_type, example, k) for k in range(count)]
    if mode == "label":
        return list(example.choices)
    raise ValueError(f"mode '{mode}' does not score options")


def content_free_prompts(
    task_type: str, example: Example, mode: str, inputs: Sequence[str] = CONTENT_FREE_INPUTS
) -> list[str]:
    """`example`'s prompt with its content replaced by each content-free text.

    The content is the question body (a review, a headline, a question) and the passage, if
    any; the instruction (`Example.instruction`) and the answer format `render_prompt` adds for
    the task type are kept. Letter mode also blanks the option texts: the letter habit is what
    is measured. Text and label modes keep the item's options, since those are the scored
    completions (and, for yes/no and classification tasks, the answer format lists them).
    """
    prompts = []
    for text in inputs:
        shown = (text,) * len(example.choices) if mode == "letter" else example.choices
        blank = Example(
            id="content-free",
            question=text,
            choices=shown,
            context=text if example.context else "",
            instruction=example.instruction,
        )
        prompts.append(render_prompt(task_type, blank))
    return prompts


def _template_keys(
    task_type: str, examples: list[Example], mode: str, inputs: Sequence[str]
) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Per item, its content-free prompts and scored options (items of a task share one)."""
    return [
        (
            tuple(content_free_prompts(task_type, example, mode, inputs)),
            tuple(option_completions(task_type, example, mode)),
        )
        for example in examples
    ]


def _per_item_bias(cache: dict, item_keys: list[tuple], width: int) -> torch.Tensor:
    """`[N, width]` the cached bias of each item's template, -inf past its options."""
    dtype = cache[item_keys[0]].dtype
    per_item = torch.full((len(item_keys), width), float("-inf"), dtype=dtype)
    for row, key in enumerate(item_keys):
        bias = cache[key]
        per_item[row, : bias.shape[0]] = bias
    return per_item


def _calibrating(intervention: Any | None) -> Any | None:
    """The intervention the calibration prompts are scored under: the items' own, or for a
    conditioned one (per-item coefficients) its fixed reference addition."""
    fixed = getattr(intervention, "calibration", None)
    return intervention if fixed is None else fixed()


def content_free_biases(
    decoder: CausalLM,
    task_type: str,
    examples: list[Example],
    mode: str,
    normalize: str,
    inputs: Sequence[str],
    intervention: Any | None,
    batch_size: int,
    width: int,
    share_prompt: bool,
    cache: dict | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """`[N, width]` content-free bias of each item, scored once per distinct template.

    `cache` (template -> bias) carries biases across calls with the same decoder, intervention
    and settings — e.g. the batches of one evaluation, which share a template per task."""
    cache = {} if cache is None else cache
    item_keys = _template_keys(task_type, examples, mode, inputs)
    missing = list(dict.fromkeys(key for key in item_keys if key not in cache))
    if missing:
        prompts = [p for cf_prompts, _ in missing for p in cf_prompts]
        options = [list(opts) for cf_prompts, opts in missing for _ in cf_prompts]
        log.info("content-free calibration: %d templates x %d inputs", len(missing), len(inputs))
        scores = score_options(
            decoder,
            prompts,
            options,
            _calibrating(intervention),
            batch_size,
            share_prompt,
            max_tokens,
        )
        normalized = scores.normalized(normalize)
        for g, key in enumerate(missing):
            cache[key] = content_free_bias(normalized[g * len(inputs) : (g + 1) * len(inputs)])
    return _per_item_bias(cache, item_keys, width)


def content_free_biases_grid(
    decoder: CausalLM,
    task_type: str,
    examples: list[Example],
    mode: str,
    normalize: str,
    inputs: Sequence[str],
    interventions: dict[Any, Any | None],
    width: int,
    caches: dict[Any, dict],
    sharing: dict[str, Any],
) -> dict[Any, torch.Tensor]:
    """`content_free_biases` for every configuration of `interventions` (one cache each in
    `caches`); configurations missing the same templates are scored together."""
    item_keys = _template_keys(task_type, examples, mode, inputs)
    wanted: dict[tuple, list[Any]] = {}
    for name in interventions:
        cache = caches.setdefault(name, {})
        missing = tuple(dict.fromkeys(key for key in item_keys if key not in cache))
        if missing:
            wanted.setdefault(missing, []).append(name)
    for missing, names in wanted.items():
        prompts = [p for cf_prompts, _ in missing for p in cf_prompts]
        options = [list(opts) for cf_prompts, opts in missing for _ in cf_prompts]
        log.info(
            "content-free calibration: %d templates x %d inputs x %d configurations",
            len(missing),
            len(inputs),
            len(names),
        )
        steering = [_calibrating(interventions[n]) for n in names]
        grid = score_options_grid(decoder, prompts, options, steering, **sharing)
        for name, scores in zip(names, grid, strict=True):
            normalized = scores.normalized(normalize)
            for g, key in enumerate(missing):
                block = normalized[g * len(inputs) : (g + 1) * len(inputs)]
                caches[name][key] = content_free_bias(block)
    return {name: _per_item_bias(caches[name], item_keys, width) for name in interventions}
