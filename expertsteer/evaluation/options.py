"""Option log-likelihood: each option's completion is appended to the formatted prompt as the
assistant's text (`CausalLM.encode(prompts, completions)`), and its tokens' log-probabilities are
summed (or averaged per token, `OptionScores.normalized`), steered if an intervention is given.
`score_options_grid` scores many steering configurations from shared forwards (`branching`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertsteer.models.batching import check_budget, token_batches
from expertsteer.models.causal_lm import CausalLM, left_pad_positions

NORMALIZATIONS: tuple[str, ...] = ("sum", "mean")


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
        check_choice("normalize", normalize, NORMALIZATIONS)
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


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise a ValueError naming option `name` unless `value` is one of `allowed`."""
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


def _for_batch(intervention: Any | None, batch: list[_Row]) -> Any | None:
    """The intervention of a forward batch: a conditioned one (per-item coefficients) keeps
    the coefficients of each row's item, in row order."""
    select = getattr(intervention, "for_rows", None)
    return intervention if select is None else select([row.targets[0].item for row in batch])


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
    max_tokens: int | None = None,
) -> Iterator[tuple[list[_Row], dict[str, torch.Tensor], torch.Tensor, int]]:
    """Forward batches of the planned rows: rows, left-padded encoding, prompt lengths and the
    number of last positions whose logits are needed. At most `batch_size` rows each and, with
    `max_tokens`, at most that many padded tokens (rows x longest row; a longer row goes alone)."""
    # Longest first, so each batch holds rows of similar length (little padding).
    rows = sorted(_plan_rows(decoder, prompts, options, share_prompt), key=lambda r: -r.length)
    for group in token_batches([r.length for r in rows], batch_size, max_tokens):
        batch = [rows[k] for k in group]
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
    max_tokens: int | None = None,
) -> OptionScores:
    """Summed log-probability and token count of each option completion after its prompt.

    `options[i]` are the completions of `prompts[i]`; items may have different option counts
    (the result is padded with -inf / 0). All (item, option) pairs are flattened into batches
    of `batch_size` sequences (with `max_tokens`, also at most that many padded tokens), one
    forward each, through `steering.steered_logits` when an `intervention` is given (so
    steering applies while scoring).
    """
    _check_options(prompts, options, batch_size)
    scores = _empty_scores(prompts, options)
    for batch, encoding, prompt_lengths, keep in _batches(
        decoder, prompts, options, batch_size, share_prompt, max_tokens
    ):
        steering = _for_batch(intervention, batch)
        logits = _forward_logits(decoder, encoding, steering, prompt_lengths, keep)
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
    max_tokens: int | None = None,
) -> list[OptionScores]:
    """`score_options` under each of `interventions` (None: unsteered), one result each, from
    shared forwards (`expertsteer.evaluation.branching.grid_log_probs`): per batch of rows, the
    blocks below each configuration's first steered block run once, and the prompts' common
    prefix is forwarded once per configuration and kept in `store` (a `branching.PrefixStore`;
    None: no prefix sharing). `config_batch` configurations share one forward; `max_tokens`
    bounds that forward's padded tokens, the stacked configurations included (rows x longest
    row x `config_batch`; a longer row goes alone)."""
    _check_options(prompts, options, batch_size)
    check_budget("max_tokens", max_tokens)
    if not interventions:
        raise ValueError("no interventions to score")
    branching = importlib.import_module("expertsteer.evaluation.branching")
    results = [_empty_scores(prompts, options) for _ in interventions]
    row_tokens = None if max_tokens is None else max(1, max_tokens // config_batch)
    for batch, encoding, prompt_lengths, keep in _batches(
        decoder, prompts, options, batch_size, share_prompt, row_tokens
    ):
        mask = encoding["attention_mask"].bool()
        rows = [ids[real].tolist() for ids, real in zip(encoding["input_ids"], mask, strict=True)]
        steering = [_for_batch(intervention, batch) for intervention in interventions]
        log_probs = branching.grid_log_probs(
            decoder, rows, prompt_lengths.tolist(), steering, keep, store, config_batch
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
    check_choice("normalize", normalize, NORMALIZATIONS)
    scores = score_options(decoder, prompts, options, intervention, batch_size, share_prompt)
    return scores.normalized(normalize)
