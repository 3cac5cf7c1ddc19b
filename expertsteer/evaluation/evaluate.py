"""Evaluate a (steered) decoder on task examples: option log-likelihood (`options`) with
calibration (`calibration`), or generation with answer extraction (`answers`).

What is scored depends on `mode`:

* `letter` (default for `choice`): the option letters "A", "B", ... — the prompt asks for one.
* `text` (`choice`): "A. <option text>" as `prompts.answer_text` writes it; per-token mean by
  default, since option texts differ in length and a sum favours short ones.
* `label` (default for `yesno` / `classification`): the label words themselves ("positive").
* `generate` (the only mode of `numeric`; also possible for the others): greedy generation, then
  the last number, or the option letter / label word, is extracted from the text.

Option scores are calibrated (content-free by default) and the raw ones are reported beside
them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from expertsteer.data.prompts import render_prompt
from expertsteer.data.tasks import LETTERS, Example
from expertsteer.evaluation.answers import (
    extract_number,
    extract_option,
    generate_answers,
    habit_rate,
    numbers_match,
)
from expertsteer.evaluation.calibration import (
    CALIBRATIONS,
    CONTENT_FREE_INPUTS,
    Calibration,
    apply_calibration,
    content_free_biases,
    content_free_biases_grid,
    mean_bias,
    normalize_options,
    option_completions,
)
from expertsteer.evaluation.options import (
    NORMALIZATIONS,
    check_choice,
    score_options,
    score_options_grid,
)
from expertsteer.evaluation.stats import bootstrap_ci, macro_f1
from expertsteer.method.vectors import POSITIONS
from expertsteer.models.batching import check_budget
from expertsteer.models.causal_lm import CausalLM
from expertsteer.models.zoo import AUTO_DTYPE, DTYPES
from expertsteer.settings import check_bool, check_choices, check_integer

log = logging.getLogger(__name__)

ScoreMode = Literal["letter", "text", "label", "generate"]
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


Positions = Literal[POSITIONS]
ModelDtype = Literal[(AUTO_DTYPE, *DTYPES)]
"""A model dtype, or `auto`: bfloat16 on a CUDA device that supports it, else float32."""


@dataclass(frozen=True)
class ScoringConfig:
    """How the evaluation stage (`lightning_modules.steer.SteeringModule`) scores the target
    and the expert, and how many random null draws it scores beside the methods."""

    positions: Positions = "all"
    """Steered positions: `all`, `prompt`, `generated` or `last_prompt`."""
    mode: ScoreMode | None = None
    """Scoring mode (None: per task type, letter, label or generate)."""
    calibration: Calibration | None = None
    """Option-score calibration: content_free (None: the default) or none (`mean` depends on
    which items share a batch, so the stage refuses it)."""
    max_new_tokens: int | None = None
    """Generation budget (None: 128 for numeric answers, 16 otherwise)."""
    batch_size: int = 8
    """Prompts per forward / generate call."""
    max_batch_tokens: int | None = None
    """Token budget of one scoring forward or generate call (padded tokens: sequences x
    longest, generated tokens and stacked `config_batch` configurations included); long
    prompts make smaller batches. None: `batch_size` alone."""
    model_dtype: ModelDtype = "auto"
    """Dtype the target and the expert are scored in; every method and control is scored in
    the same dtype."""
    chat_template: bool | None = None
    """Apply chat templates (None: when the tokenizer has one)."""
    null_k: int = 0
    """Random null draws, each chosen on dev and scored on test like a method (0: no null, and
    no method can then be called a gain)."""
    shuffle_k: int = 0
    """`shuffled` control of each conditioned method (`expertsteer.method.conditioned`): its
    test coefficients permuted across test items this many times, each permutation scored at
    the method's dev choice (0: none, and no conditioned method can then be called a gain)."""
    share_forwards: bool = True
    """Score the steered grid from shared forwards (the prompts' common prefix once per
    configuration, the blocks below each configuration's first steered block once per batch;
    same scores); false: one full forward per configuration."""
    config_batch: int = 1
    """Steered configurations stacked in one shared forward."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.calibration == "mean":
            raise ValueError(
                "calibration 'mean' depends on which items share a batch; use content_free or "
                "none in the evaluation stage"
            )
        if self.max_new_tokens is not None:
            check_integer("max_new_tokens", self.max_new_tokens, 1)
        check_integer("batch_size", self.batch_size, 1)
        check_budget("max_batch_tokens", self.max_batch_tokens)
        if self.chat_template is not None:
            check_bool("chat_template", self.chat_template)
        check_integer("null_k", self.null_k, 0)
        check_integer("shuffle_k", self.shuffle_k, 0)
        check_bool("share_forwards", self.share_forwards)
        check_integer("config_batch", self.config_batch, 1)


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
        check_choice("calibration", calibration, CALIBRATIONS)
        normalize = normalize or DEFAULT_NORMALIZE[mode]
        check_choice("normalize", normalize, NORMALIZATIONS)
        if calibration == "content_free" and not content_free_inputs:
            raise ValueError("content_free calibration needs at least one content-free input")
        if calibration == "mean" and n_examples < 2:
            raise ValueError("mean calibration needs more than one example")
    return mode, calibration, normalize


def _items(
    task_type: str, examples: list[Example]
) -> tuple[list[str], list[str], list[int | float]]:
    """Checked `examples` as prompts, ids and gold answers (a number for numeric tasks, else
    an option index)."""
    _check_examples(task_type, examples)
    prompts = [render_prompt(task_type, example) for example in examples]
    ids = [example.id for example in examples]
    gold = [float(e.answer) if task_type == "numeric" else int(e.answer) for e in examples]
    return prompts, ids, gold


def _generation_result(
    task_type: str,
    examples: list[Example],
    ids: list[str],
    gold: list[int | float],
    texts: list[str],
) -> EvalResult:
    """The `EvalResult` of generated `texts`: the last number in each (numeric tasks) or the
    option it names, against `gold`."""
    if task_type == "numeric":
        predictions: list[int | float | None] = [extract_number(t) for t in texts]
        hits = [numbers_match(p, g) for p, g in zip(predictions, gold, strict=True)]
    else:
        predictions = [
            extract_option(t, e.choices, letters=task_type == "choice")
            for t, e in zip(texts, examples, strict=True)
        ]
        hits = [p == g for p, g in zip(predictions, gold, strict=True)]
    return EvalResult(
        task_type,
        "generate",
        "none",
        None,
        ids,
        gold,
        torch.tensor(hits, dtype=torch.bool),
        predictions,
        generations=texts,
    )


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
    max_tokens: int | None = None,
) -> EvalResult:
    """Score `decoder` (steered by `intervention`, if any) on `examples` of `task_type`.

    Defaults: `mode` from `DEFAULT_MODE` (letter for choice, label for yesno / classification,
    generate for numeric); `calibration` content_free for option modes, none for generate;
    `normalize` sum for letters and labels, mean for option texts; `max_new_tokens` 128 for
    numeric tasks and 16 otherwise. `content_free_inputs` replace the item's content (not its
    instruction, see `content_free_prompts`) in the calibration prompts. `calibration_cache`, a
    dict kept by the caller, reuses content-free biases across calls made with the same decoder,
    intervention and settings (e.g. the batches of one evaluation). `max_tokens` caps the
    padded tokens of one forward or generate call (`ScoringConfig.max_batch_tokens`).
    """
    mode, calibration, normalize = _settings(
        task_type, len(examples), mode, calibration, normalize, content_free_inputs
    )
    prompts, ids, gold = _items(task_type, examples)
    if mode == "generate":
        kind = "numeric" if task_type == "numeric" else "option"
        budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[kind]
        texts = generate_answers(decoder, prompts, intervention, budget, batch_size, max_tokens)
        result = _generation_result(task_type, examples, ids, gold, texts)
    else:
        options = [option_completions(task_type, e, mode) for e in examples]
        scores = score_options(
            decoder, prompts, options, intervention, batch_size, share_prompt, max_tokens
        )
        raw = normalize_options(scores.normalized(normalize))
        bias = None
        if calibration == "content_free":
            bias = content_free_biases(
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
                max_tokens,
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
    max_tokens: int | None = None,
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
                max_tokens=max_tokens,
            )
            for name, intervention in interventions.items()
        }
    prompts, ids, gold = _items(task_type, examples)
    options = [option_completions(task_type, e, mode) for e in examples]
    sharing = {
        "batch_size": batch_size,
        "share_prompt": share_prompt,
        "store": store,
        "config_batch": config_batch,
        "max_tokens": max_tokens,
    }
    grid = score_options_grid(decoder, prompts, options, list(interventions.values()), **sharing)
    raws = {
        name: normalize_options(scores.normalized(normalize))
        for name, scores in zip(interventions, grid, strict=True)
    }
    biases: dict[Any, torch.Tensor | None] = dict.fromkeys(interventions)
    if calibration == "content_free":
        width = next(iter(raws.values())).shape[1]
        biases |= content_free_biases_grid(
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
