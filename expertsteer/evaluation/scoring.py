"""Score a (steered) decoder on task examples: option log-likelihood with calibration, or
generation with answer extraction.

Option scoring: each option's completion is appended to the formatted prompt as the assistant's
text (`CausalLM.encode(prompts, completions)`), and its tokens' log-probabilities are summed (or
averaged per token). What the options are depends on `mode`:

* `letter` (default for `choice`): the option letters "A", "B", ... — the prompt asks for one.
* `text` (`choice`): "A. <option text>" as `prompts.answer_text` writes it; per-token mean by
  default, since option texts differ in length and a sum favours short ones.
* `label` (default for `yesno` / `classification`): the label words themselves ("positive").
* `generate` (the only mode of `numeric`; also possible for the others): greedy generation, then
  the last number, or the option letter / label word, is extracted from the text.

Calibration. Small models answer one letter (or one label) on most items whatever the question
(SmolLM2-135M gives one fixed letter on 76-100% of items), so raw argmax accuracy mostly
measures that habit, and a steering vector could look like a gain just by moving it. Scores
are therefore corrected for each model's average option preference, in log space over the
options of an item:

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
only shifts the preferred letter shifts b by the same amount and gains nothing.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertsteer.data.prompts import answer_text, render_prompt
from expertsteer.data.tasks import LETTERS, Example
from expertsteer.evaluation.stats import bootstrap_ci, macro_f1
from expertsteer.models.causal_lm import CausalLM, left_pad_positions

log = logging.getLogger(__name__)

SCORE_MODES: tuple[str, ...] = ("letter", "text", "label", "generate")
CALIBRATIONS: tuple[str, ...] = ("content_free", "mean", "none")
NORMALIZATIONS: tuple[str, ...] = ("sum", "mean")
MODES_BY_TYPE: dict[str, tuple[str, ...]] = {
    "choice": ("letter", "text", "generate"),
    "yesno": ("label", "generate"),
    "classification": ("label", "generate"),
    "numeric": ("generate",),
}
DEFAULT_MODE: dict[str, str] = {
    "choice": "letter",
    "yesno": "label",
    "classification": "label",
    "numeric": "generate",
}
# Letters and label words are one or a few tokens: the summed log-probability is the probability
# of the string. Option texts vary in length, so their per-token mean is compared instead.
DEFAULT_NORMALIZE: dict[str, str] = {"letter": "sum", "label": "sum", "text": "mean"}
# Numeric answers need room for some working; an option letter or label word does not.
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"numeric": 128, "option": 16}
CONTENT_FREE_INPUTS: tuple[str, ...] = ("N/A", "", "[MASK]")


# -- option log-likelihood ---------------------------------------------------------------------


@dataclass
class OptionScores:
    """Log-likelihood of every option completion of every item."""

    total: torch.Tensor
    """`[N, K]` summed log-probability of each option's tokens; -inf where an item has fewer
    than K options."""
    n_tokens: torch.Tensor
    """`[N, K]` number of scored tokens per option; 0 where an item has fewer than K options."""

    def normalized(self, normalize: str = "sum") -> torch.Tensor:
        """`total` (`sum`) or `total / n_tokens` (`mean`, length-normalised); padding stays -inf."""
        _check_choice("normalize", normalize, NORMALIZATIONS)
        if normalize == "sum":
            return self.total
        return torch.where(
            self.n_tokens > 0, self.total / self.n_tokens.clamp(min=1), float("-inf")
        )


@dataclass
class _Target:
    """Tokens of one option scored from one forward row."""

    item: int
    """Item index."""
    option: int
    """Option index."""
    ids: list[int]
    """Token ids whose log-probabilities are summed."""
    inside: int
    """How many of `ids` are the row's last tokens (all of them, or 0 when the row is the prompt
    alone and the single token is predicted after it)."""


@dataclass
class _Row:
    """One sequence of a forward batch: a prompt, possibly followed by one option."""

    prompt: str
    """User-turn text."""
    completion: str
    """Assistant text appended to the formatted prompt ("" for a prompt-only row)."""
    length: int
    """Real tokens in the row."""
    prompt_length: int
    """Tokens before the first scored completion token (steering positions use it)."""
    targets: list[_Target]
    """Options scored from this row."""


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got '{value}'")


def _token_ids(decoder: CausalLM, texts: list[str]) -> list[list[int]]:
    """Token ids exactly as `CausalLM.encode` makes them, without padding."""
    encoded = decoder.tokenizer(texts, add_special_tokens=not decoder.use_chat_template)
    return [list(ids) for ids in encoded["input_ids"]]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _plan_rows(
    decoder: CausalLM, prompts: list[str], options: list[list[str]], share_prompt: bool
) -> list[_Row]:
    """Tokenize every (prompt, option) pair and decide which forward rows score it.

    The scored tokens are those after the longest common prefix of the formatted prompt's tokens
    and the formatted prompt+option's tokens: if the tokenizer merges across the boundary, the
    merged token is scored (conditioned on the shorter prefix) instead of being split wrongly.
    When every option of an item is a single token after the whole prompt (letters, mostly),
    one prompt-only row scores them all: the logits at the prompt's last position are the same,
    by causality, as in the prompt+option row, and the forward count drops K-fold.
    """
    prompt_ids = _token_ids(decoder, decoder.format(prompts))
    flat = [(i, k) for i, item in enumerate(options) for k in range(len(item))]
    full_ids = _token_ids(
        decoder,
        decoder.format([prompts[i] for i, _ in flat], [options[i][k] for i, k in flat]),
    )
    splits: dict[int, list[tuple[int, int, list[int], int]]] = {}
    for (i, k), ids in zip(flat, full_ids, strict=True):
        prefix = _common_prefix(prompt_ids[i], ids)
        if prefix == len(ids):
            raise ValueError(
                f"option {k} ('{options[i][k]}') of item {i} adds no tokens after the prompt; "
                "options must be non-empty texts"
            )
        splits.setdefault(i, []).append((k, prefix, ids[prefix:], len(ids)))
    rows = []
    for i, parts in splits.items():
        whole_prompt = len(prompt_ids[i])
        if share_prompt and all(len(c) == 1 and p == whole_prompt for _, p, c, _ in parts):
            targets = [_Target(i, k, completion, 0) for k, _, completion, _ in parts]
            rows.append(_Row(prompts[i], "", whole_prompt, whole_prompt, targets))
            continue
        for k, prefix, completion, length in parts:
            target = _Target(i, k, completion, len(completion))
            rows.append(_Row(prompts[i], options[i][k], length, prefix, [target]))
    return rows


def _forward_logits(
    decoder: CausalLM,
    encoding: dict[str, torch.Tensor],
    intervention: Any | None,
    prompt_lengths: torch.Tensor,
    keep: int,
) -> torch.Tensor:
    """Logits (or log-probs) `[B, keep, V]` of the last `keep` positions, steered if asked."""
    if intervention is None:
        # Left-padded rows count positions from their first real token (absolute-position
        # models depend on it); only the positions that are scored go through the LM head.
        positions = left_pad_positions(encoding["attention_mask"])
        output = decoder.hf_model(
            **encoding, position_ids=positions, use_cache=False, logits_to_keep=keep
        )
        return output.logits[:, -keep:]
    # Imported here so that unsteered scoring never depends on the steering module.
    steering = importlib.import_module("expertsteer.method.steer")
    logits = steering.steered_logits(decoder, encoding, intervention, prompt_lengths=prompt_lengths)
    return logits[:, -keep:]


def _check_options(prompts: list[str], options: list[list[str]], batch_size: int) -> None:
    if len(options) != len(prompts):
        raise ValueError(
            f"options count mismatch: {len(prompts)} prompts but {len(options)} option lists"
        )
    if not prompts:
        raise ValueError("no prompts to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, item in enumerate(options):
        if not item:
            raise ValueError(f"item {i} has no options to score")
        if any(not isinstance(text, str) or not text for text in item):
            raise ValueError(f"item {i} has an empty or non-text option: {item!r}")


def _empty_scores(prompts: list[str], options: list[list[str]]) -> OptionScores:
    width = max(len(item) for item in options)
    total = torch.full((len(prompts), width), float("-inf"), dtype=torch.float64)
    return OptionScores(total, torch.zeros((len(prompts), width), dtype=torch.long))


def _batches(
    decoder: CausalLM,
    prompts: list[str],
    options: list[list[str]],
    batch_size: int,
    share_prompt: bool,
) -> Iterator[tuple[list[_Row], dict[str, torch.Tensor], torch.Tensor, int]]:
    """Forward batches of the planned rows: rows, left-padded encoding, prompt lengths and the
    number of last positions whose logits are needed."""
    # Longest first, so each batch holds rows of similar length (little padding).
    rows = sorted(_plan_rows(decoder, prompts, options, share_prompt), key=lambda r: -r.length)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        encoding = decoder.encode([r.prompt for r in batch], [r.completion for r in batch])
        lengths = encoding["attention_mask"].sum(dim=1).tolist()
        if lengths != [r.length for r in batch]:
            raise RuntimeError(
                "batch tokenization differs from per-text tokenization "
                f"({lengths} vs {[r.length for r in batch]} tokens)"
            )
        prompt_lengths = torch.tensor([r.prompt_length for r in batch], device=decoder.device)
        keep = max(t.inside for r in batch for t in r.targets) + 1
        yield batch, encoding, prompt_lengths, keep


def _accumulate(batch: list[_Row], logits: torch.Tensor, keep: int, scores: OptionScores) -> None:
    """Add the batch's option log-probabilities (from logits `[B, keep, V]`) to `scores`."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    # One gather per batch: (row, position, token) of every scored token, and the option
    # each belongs to. Position keep-1 is the row's last token; a target's first token is
    # predicted `inside` positions before it.
    rows_at, steps, tokens, owners, cells = [], [], [], [], []
    for b, row in enumerate(batch):
        for target in row.targets:
            first = keep - 1 - target.inside
            rows_at += [b] * len(target.ids)
            steps += range(first, first + len(target.ids))
            tokens += target.ids
            owners += [len(cells)] * len(target.ids)
            cells.append((target.item, target.option, len(target.ids)))
    device = logprobs.device
    picked = logprobs[
        torch.tensor(rows_at, device=device),
        torch.tensor(steps, device=device),
        torch.tensor(tokens, device=device),
    ].double()
    sums = torch.zeros(len(cells), dtype=torch.float64, device=device)
    sums = sums.index_add(0, torch.tensor(owners, device=device), picked).cpu()
    for (item, option, count), value in zip(cells, sums.tolist(), strict=True):
        scores.total[item, option] = value
        scores.n_tokens[item, option] = count


def _check_finite(decoder: CausalLM, scores: OptionScores) -> OptionScores:
    if torch.isnan(scores.total).any() or torch.isposinf(scores.total).any():
        raise FloatingPointError(
            f"non-finite option log-probabilities from '{decoder.name}'; check the model "
            "weights, dtype and steering strength"
        )
    return scores


@torch.inference_mode()
def score_options(
    decoder: CausalLM,
    prompts: list[str],
    options: list[list[str]],
    intervention: Any | None = None,
    batch_size: int = 8,
    share_prompt: bool = True,
) -> OptionScores:
    """Summed log-probability and token count of each option completion after its prompt.

    `options[i]` are the completions of `prompts[i]`; items may have different option counts
    (the result is padded with -inf / 0). All (item, option) pairs are flattened into batches
    of `batch_size` sequences, one forward each, through `steering.steered_logits` when an
    `intervention` is given (so steering applies while scoring).
    """
    _check_options(prompts, options, batch_size)
    scores = _empty_scores(prompts, options)
    for batch, encoding, prompt_lengths, keep in _batches(
        decoder, prompts, options, batch_size, share_prompt
    ):
        logits = _forward_logits(decoder, encoding, intervention, prompt_lengths, keep)
        _accumulate(batch, logits, keep, scores)
    return _check_finite(decoder, scores)


@torch.inference_mode()
def score_options_grid(
    decoder: CausalLM,
    prompts: list[str],
    options: list[list[str]],
    interventions: Sequence[Any | None],
    batch_size: int = 8,
    share_prompt: bool = True,
    store: Any | None = None,
    config_batch: int = 1,
) -> list[OptionScores]:
    """`score_options` under each of `interventions` (None: unsteered), one result each, from
    shared forwards (`expertsteer.evaluation.branching.grid_log_probs`): per batch of rows, the
    blocks
    below each configuration's first steered block run once, and the prompts' common prefix
    is forwarded once per configuration and kept in `store` (a `branching.PrefixStore`; None:
    no prefix sharing). `config_batch` configurations share one forward."""
    _check_options(prompts, options, batch_size)
    if not interventions:
        raise ValueError("no interventions to score")
    branching = importlib.import_module("expertsteer.evaluation.branching")
    results = [_empty_scores(prompts, options) for _ in interventions]
    for batch, encoding, prompt_lengths, keep in _batches(
        decoder, prompts, options, batch_size, share_prompt
    ):
        mask = encoding["attention_mask"].bool()
        rows = [ids[real].tolist() for ids, real in zip(encoding["input_ids"], mask, strict=True)]
        log_probs = branching.grid_log_probs(
            decoder, rows, prompt_lengths.tolist(), list(interventions), keep, store, config_batch
        )
        for scores, logits in zip(results, log_probs, strict=True):
            _accumulate(batch, logits, keep, scores)
    return [_check_finite(decoder, scores) for scores in results]


def option_logprobs(
    decoder: CausalLM,
    prompts: list[str],
    options: list[list[str]],
    intervention: Any | None = None,
    batch_size: int = 8,
    normalize: str = "sum",
    share_prompt: bool = True,
) -> torch.Tensor:
    """`[N, K]` log-probability of each option's completion tokens given its formatted prompt.

    `normalize`: `sum` (the string's log-probability; the choice for letters and label words)
    or `mean` (per token; for option texts of different lengths). See `score_options`.
    """
    _check_choice("normalize", normalize, NORMALIZATIONS)
    scores = score_options(decoder, prompts, options, intervention, batch_size, share_prompt)
    return scores.normalized(normalize)


# -- calibration -------------------------------------------------------------------------------


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


def _content_free_biases(
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
        scores = score_options(decoder, prompts, options, intervention, batch_size, share_prompt)
        normalized = scores.normalized(normalize)
        for g, key in enumerate(missing):
            cache[key] = content_free_bias(normalized[g * len(inputs) : (g + 1) * len(inputs)])
    return _per_item_bias(cache, item_keys, width)


def _content_free_biases_grid(
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
    """`_content_free_biases` for every configuration of `interventions` (one cache each in
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
        grid = score_options_grid(
            decoder, prompts, options, [interventions[n] for n in names], **sharing
        )
        for name, scores in zip(names, grid, strict=True):
            normalized = scores.normalized(normalize)
            for g, key in enumerate(missing):
                block = normalized[g * len(inputs) : (g + 1) * len(inputs)]
                caches[name][key] = content_free_bias(block)
    return {name: _per_item_bias(caches[name], item_keys, width) for name in interventions}


# -- generation and answer extraction ----------------------------------------------------------


@torch.inference_mode()
def generate_answers(
    decoder: CausalLM,
    prompts: list[str],
    intervention: Any | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions of `prompts` (chat-formatted as the decoder does), steered if asked."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}"
        )
    steering = None if intervention is None else importlib.import_module("expertsteer.method.steer")
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        if steering is None:
            texts.extend(decoder.generate(chunk, max_new_tokens=max_new_tokens))
        else:
            texts.extend(
                steering.steered_generate(
                    decoder, chunk, intervention, max_new_tokens=max_new_tokens
                )
            )
    return texts


# A number not glued to a word or a preceding dot: optional sign and dollar sign (either
# order), thousands groups "1,234" or plain digits, optional decimals; a sentence's trailing
# period is not a decimal point. "10 - 5" is not read as -5 (no space after the sign).
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>-?)\$?(?P<sign2>-?)"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
)


def extract_number(text: str) -> float | None:
    """The last number in `text` ("1,234", "-5", "$3.50", "42." ...), or None if there is none."""
    normalized = text.replace("\u2212", "-")
    matches = list(_NUMBER.finditer(normalized))
    if not matches:
        return None
    last = matches[-1]
    value = float(last["body"].replace(",", ""))
    return -value if (last["sign"] or last["sign2"]) else value


def numbers_match(pred: float | None, gold: float, tol: float = 1e-6) -> bool:
    """Whether `pred` equals `gold` within `tol`, relative for |gold| > 1; None never matches."""
    if pred is None or not math.isfinite(pred):
        return False
    return abs(pred - gold) <= tol * max(1.0, abs(gold))


_LEAD_LETTER = re.compile(r"^[\s*_(\[\"'`]*([A-J])(?:[.):\]*]|\s*$|\s*\n)")
_NAMED_LETTER = re.compile(
    r"(?i:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*[*_(\[]*([A-J])(?![A-Za-z])"
)


def _earliest_phrase(text: str, phrases: Sequence[str]) -> int | None:
    """Index of the phrase occurring first as whole words in `text` (ties: the longer one)."""
    lowered = text.lower()
    best: tuple[int, int] | None = None
    found = None
    for index, phrase in enumerate(phrases):
        if not phrase.strip():
            continue
        match = re.search(rf"(?<!\w){re.escape(phrase.strip().lower())}(?!\w)", lowered)
        if match is None:
            continue
        key = (match.start(), -len(phrase))
        if best is None or key < best:
            best, found = key, index
    return found


def extract_option(text: str, choices: Sequence[str], letters: bool) -> int | None:
    """The option a generated answer names, or None.

    With `letters` (choice tasks): a leading letter ("B", "(B)", "B. ..."), then "answer is B",
    then the earliest option text. Otherwise (label words): the earliest label word.
    """
    if letters:
        valid = LETTERS[: len(choices)]
        for pattern in (_LEAD_LETTER, _NAMED_LETTER):
            match = pattern.search(text)
            if match and match.group(1) in valid:
                return valid.index(match.group(1))
    return _earliest_phrase(text, choices)


def habit_rate(predictions: Sequence[Any]) -> float:
    """Share of items given the single most common prediction (unanswered items never count)."""
    if not predictions:
        raise ValueError("no predictions")
    answered = Counter(p for p in predictions if p is not None)
    return max(answered.values(), default=0) / len(predictions)


# -- evaluation --------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Per-item outcome of evaluating a decoder on a list of examples."""

    task_type: str
    """Task type of the examples."""
    mode: str
    """Score mode used (letter, text, label, generate)."""
    calibration: str
    """Calibration applied to option scores (content_free, mean, none)."""
    normalize: str | None
    """Option-score normalisation (sum or mean); None in generate mode."""
    ids: list[str]
    """Example ids, in order."""
    gold: list[int | float]
    """Gold option index or number per item."""
    correct: torch.Tensor
    """`[N]` bool: the (calibrated) prediction is right."""
    predictions: list[int | float | None]
    """Calibrated option index, extracted option, or extracted number; None if unanswered."""
    raw_correct: torch.Tensor | None = None
    """`[N]` bool correctness of the uncalibrated argmax (option modes)."""
    raw_predictions: list[int] | None = None
    """Uncalibrated argmax option per item (option modes)."""
    scores: torch.Tensor | None = None
    """`[N, K]` option scores normalised over options, before calibration (option modes)."""
    calibrated: torch.Tensor | None = None
    """`[N, K]` calibrated option log-probabilities (option modes)."""
    bias: torch.Tensor | None = None
    """`[N, K]` per-item calibration bias subtracted from `scores` (option modes)."""
    generations: list[str] | None = None
    """Generated texts (generate mode)."""

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())

    @property
    def raw_accuracy(self) -> float | None:
        return None if self.raw_correct is None else float(self.raw_correct.float().mean())

    @property
    def habit_rate(self) -> float:
        """Share of items answered with the most common answer (exposes letter habits)."""
        return habit_rate(self.predictions)

    @property
    def raw_habit_rate(self) -> float | None:
        return None if self.raw_predictions is None else habit_rate(self.raw_predictions)

    @property
    def macro_f1(self) -> float | None:
        """Macro-F1 over option positions / labels (None for numeric tasks)."""
        if self.task_type == "numeric":
            return None
        preds = torch.tensor([-1 if p is None else int(p) for p in self.predictions])
        target = torch.tensor([int(g) for g in self.gold])
        return macro_f1(preds, target, num_classes=_num_classes(self))

    def summary(self, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
        """JSON-ready numbers: accuracy with its bootstrap interval, habit rates, macro-F1."""
        mean, low, high = bootstrap_ci(self.correct, n_boot, seed, level)
        out: dict[str, Any] = {
            "n": self.n,
            "mode": self.mode,
            "calibration": self.calibration,
            "normalize": self.normalize,
            "accuracy": mean,
            "accuracy_low": low,
            "accuracy_high": high,
            "habit_rate": self.habit_rate,
            "macro_f1": self.macro_f1,
        }
        if self.raw_correct is not None:
            raw_mean, raw_low, raw_high = bootstrap_ci(self.raw_correct, n_boot, seed, level)
            out |= {
                "raw_accuracy": raw_mean,
                "raw_accuracy_low": raw_low,
                "raw_accuracy_high": raw_high,
                "raw_habit_rate": self.raw_habit_rate,
            }
        return out


def _num_classes(result: EvalResult) -> int:
    if result.scores is not None:
        return result.scores.shape[1]
    predicted = [int(p) for p in result.predictions if p is not None]
    return max([int(g) for g in result.gold] + predicted) + 1


def _check_examples(task_type: str, examples: list[Example]) -> None:
    if not examples:
        raise ValueError(f"no examples to evaluate for a {task_type} task")
    for example in examples:
        if task_type == "numeric":
            if example.answer is None:
                raise ValueError(f"numeric example '{example.id}' has no gold answer")
            continue
        if len(example.choices) < 2:
            raise ValueError(
                f"example '{example.id}' has {len(example.choices)} option(s); a {task_type} "
                "task needs at least two"
            )
        if task_type == "choice" and len(example.choices) > len(LETTERS):
            raise ValueError(
                f"example '{example.id}' has {len(example.choices)} options; letters exist for "
                f"at most {len(LETTERS)}"
            )
        answer = example.answer
        if answer is None or int(answer) != answer or not 0 <= int(answer) < len(example.choices):
            raise ValueError(
                f"example '{example.id}': gold answer {answer!r} is not an option index in "
                f"0..{len(example.choices) - 1}"
            )


def _settings(
    task_type: str,
    n_examples: int,
    mode: str | None,
    calibration: str | None,
    normalize: str | None,
    content_free_inputs: Sequence[str],
) -> tuple[str, str, str | None]:
    """Checked (mode, calibration, normalize), defaults filled in (see `evaluate`)."""
    if task_type not in MODES_BY_TYPE:
        why = " (a concept set is steering data; it has no answers)" * (task_type == "concept")
        raise ValueError(
            f"cannot evaluate task type '{task_type}'{why}; evaluable: {tuple(MODES_BY_TYPE)}"
        )
    mode = mode or DEFAULT_MODE[task_type]
    if mode not in MODES_BY_TYPE[task_type]:
        raise ValueError(
            f"unknown mode '{mode}' for a {task_type} task; choose one of "
            f"{MODES_BY_TYPE[task_type]}"
        )
    if mode == "generate":
        if calibration not in (None, "none"):
            raise ValueError(
                f"calibration '{calibration}' applies to option scoring, not to mode 'generate'"
            )
        calibration = "none"
        if normalize is not None:
            raise ValueError("normalize applies to option scoring, not to mode 'generate'")
    else:
        calibration = calibration or "content_free"
        _check_choice("calibration", calibration, CALIBRATIONS)
        normalize = normalize or DEFAULT_NORMALIZE[mode]
        _check_choice("normalize", normalize, NORMALIZATIONS)
        if calibration == "content_free" and not content_free_inputs:
            raise ValueError("content_free calibration needs at least one content-free input")
        if calibration == "mean" and n_examples < 2:
            raise ValueError("mean calibration needs more than one example")
    return mode, calibration, normalize


def _option_result(
    task_type: str,
    mode: str,
    calibration: str,
    normalize: str,
    ids: list[str],
    gold: list[int | float],
    raw: torch.Tensor,
    bias: torch.Tensor | None,
) -> EvalResult:
    """The `EvalResult` of option scores `raw` (normalised over options); `bias` is the
    content-free bias (None for the other calibrations, computed here)."""
    if bias is None:
        if calibration == "mean":
            bias = mean_bias(raw).expand_as(raw).clone()
        else:
            bias = torch.zeros_like(raw)
    calibrated = apply_calibration(raw, bias)
    target = torch.tensor(gold)
    predicted = calibrated.argmax(dim=1)
    raw_predicted = raw.argmax(dim=1)
    return EvalResult(
        task_type,
        mode,
        calibration,
        normalize,
        ids,
        gold,
        predicted == target,
        predicted.tolist(),
        raw_correct=raw_predicted == target,
        raw_predictions=raw_predicted.tolist(),
        scores=raw,
        calibrated=calibrated,
        bias=bias,
    )


def evaluate(
    decoder: CausalLM,
    task_type: str,
    examples: list[Example],
    intervention: Any | None = None,
    mode: str | None = None,
    calibration: str | None = None,
    normalize: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    content_free_inputs: Sequence[str] = CONTENT_FREE_INPUTS,
    share_prompt: bool = True,
    calibration_cache: dict | None = None,
) -> EvalResult:
    """Score `decoder` (steered by `intervention`, if any) on `examples` of `task_type`.

    Defaults: `mode` from `DEFAULT_MODE` (letter for choice, label for yesno / classification,
    generate for numeric); `calibration` content_free for option modes, none for generate;
    `normalize` sum for letters and labels, mean for option texts; `max_new_tokens` 128 for
    numeric tasks and 16 otherwise. `content_free_inputs` replace the item's content (not its
    instruction, see `content_free_prompts`) in the calibration prompts. `calibration_cache`, a
    dict kept by the caller, reuses content-free biases across calls made with the same decoder,
    intervention and settings (e.g. the batches of one evaluation).
    """
    mode, calibration, normalize = _settings(
        task_type, len(examples), mode, calibration, normalize, content_free_inputs
    )
    _check_examples(task_type, examples)
    prompts = [render_prompt(task_type, example) for example in examples]
    ids = [example.id for example in examples]
    gold = [float(e.answer) if task_type == "numeric" else int(e.answer) for e in examples]
    if mode == "generate":
        budget = (
            max_new_tokens
            or DEFAULT_MAX_NEW_TOKENS["numeric" if task_type == "numeric" else "option"]
        )
        texts = generate_answers(decoder, prompts, intervention, budget, batch_size)
        if task_type == "numeric":
            predictions: list[int | float | None] = [extract_number(t) for t in texts]
            hits = [numbers_match(p, g) for p, g in zip(predictions, gold, strict=True)]
        else:
            predictions = [
                extract_option(t, e.choices, letters=task_type == "choice")
                for t, e in zip(texts, examples, strict=True)
            ]
            hits = [p == g for p, g in zip(predictions, gold, strict=True)]
        result = EvalResult(
            task_type,
            mode,
            calibration,
            None,
            ids,
            gold,
            torch.tensor(hits, dtype=torch.bool),
            predictions,
            generations=texts,
        )
    else:
        options = [option_completions(task_type, e, mode) for e in examples]
        scores = score_options(decoder, prompts, options, intervention, batch_size, share_prompt)
        raw = normalize_options(scores.normalized(normalize))
        bias = None
        if calibration == "content_free":
            bias = _content_free_biases(
                decoder,
                task_type,
                examples,
                mode,
                normalize,
                content_free_inputs,
                intervention,
                batch_size,
                raw.shape[1],
                share_prompt,
                calibration_cache,
            )
        result = _option_result(task_type, mode, calibration, normalize, ids, gold, raw, bias)
    _log_result(decoder, result)
    return result


def _log_result(decoder: CausalLM, result: EvalResult) -> None:
    log.info(
        "%s %s (%s, calibration %s): accuracy %.3f, habit rate %.3f over %d items",
        decoder.name,
        result.task_type,
        result.mode,
        result.calibration,
        result.accuracy,
        result.habit_rate,
        result.n,
    )


def evaluate_grid(
    decoder: CausalLM,
    task_type: str,
    examples: list[Example],
    interventions: dict[Any, Any | None],
    mode: str | None = None,
    calibration: str | None = None,
    normalize: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    content_free_inputs: Sequence[str] = CONTENT_FREE_INPUTS,
    share_prompt: bool = True,
    calibration_caches: dict[Any, dict] | None = None,
    store: Any | None = None,
    config_batch: int = 1,
) -> dict[Any, EvalResult]:
    """`evaluate` under each configuration of `interventions` (name -> intervention or None),
    one result per name, with the same numbers.

    Option modes score every configuration from shared forwards (`score_options_grid`: the
    states below each configuration's first steered block once per batch of rows, the
    prompts' common prefix once per configuration through `store`, a
    `branching.PrefixStore`; None shares no prefix). `calibration_caches` holds one
    `calibration_cache` per name. Generation (`generate` mode) runs `evaluate` per name.
    """
    if not interventions:
        raise ValueError("no interventions to evaluate")
    caches = {} if calibration_caches is None else calibration_caches
    mode, calibration, normalize = _settings(
        task_type, len(examples), mode, calibration, normalize, content_free_inputs
    )
    if mode == "generate":
        return {
            name: evaluate(
                decoder,
                task_type,
                examples,
                intervention,
                mode=mode,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            for name, intervention in interventions.items()
        }
    _check_examples(task_type, examples)
    prompts = [render_prompt(task_type, example) for example in examples]
    ids = [example.id for example in examples]
    gold: list[int | float] = [int(e.answer) for e in examples]
    options = [option_completions(task_type, e, mode) for e in examples]
    sharing = {
        "batch_size": batch_size,
        "share_prompt": share_prompt,
        "store": store,
        "config_batch": config_batch,
    }
    grid = score_options_grid(decoder, prompts, options, list(interventions.values()), **sharing)
    raws = {
        name: normalize_options(scores.normalized(normalize))
        for name, scores in zip(interventions, grid, strict=True)
    }
    biases: dict[Any, torch.Tensor | None] = dict.fromkeys(interventions)
    if calibration == "content_free":
        width = next(iter(raws.values())).shape[1]
        biases |= _content_free_biases_grid(
            decoder,
            task_type,
            examples,
            mode,
            normalize,
            content_free_inputs,
            interventions,
            width,
            caches,
            sharing,
        )
    results = {}
    for name, raw in raws.items():
        results[name] = _option_result(
            task_type, mode, calibration, normalize, ids, gold, raw, biases[name]
        )
        _log_result(decoder, results[name])
    return results
