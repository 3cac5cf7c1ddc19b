"""Evaluation end to end: result shapes and summaries, steering (stand-in and real) through
scoring, generation and calibration, the calibration cache, named errors."""

import math
import sys
import types

import pytest
import torch

from expertsteer.data.tasks import Example
from expertsteer.evaluation.evaluate import evaluate
from expertsteer.evaluation.stats import accuracy
from expertsteer.models.causal_lm import left_pad_positions

CHOICE = [
    Example("c0", "Which is a fruit?", ("stone", "apple", "chair"), 1),
    Example("c1", "Which is a colour?", ("red", "dog", "run", "sky"), 0),
    Example("c2", "Which is a number?", ("seven", "cat", "tree"), 0, context="Count things."),
]
YESNO = [
    Example("y0", "Is fire hot?", ("yes", "no"), 0),
    Example("y1", "Is ice hot?", ("yes", "no"), 1),
    Example("y2", "Is snow cold?", ("yes", "no"), 0),
]
NUMERIC = [
    Example("n0", "What is 2 + 3?", answer=5),
    Example("n1", "What is 10 - 4?", answer=6),
]


# -- steering goes through steered_logits, calibration included --------------------------------


@pytest.fixture
def letter_shift(monkeypatch, chat_decoder):
    """A stand-in steering module whose 'vector' only raises the logit of the letter A."""
    token_a = chat_decoder.tokenizer.convert_tokens_to_ids("A")
    calls = []

    def steered_logits(decoder, encoding, intervention, prompt_lengths=None):
        mask = encoding["attention_mask"]
        assert prompt_lengths is not None and (prompt_lengths <= mask.sum(1)).all()
        calls.extend(decoder.tokenizer.batch_decode(encoding["input_ids"]))
        with torch.no_grad():
            logits = decoder.hf_model(
                **encoding, position_ids=left_pad_positions(mask)
            ).logits.clone()
        logits[..., token_a] += intervention.alpha
        return torch.log_softmax(logits, -1)

    def steered_generate(decoder, prompts, intervention, max_new_tokens=32, **kwargs):
        return [intervention.text] * len(prompts)

    module = types.ModuleType("expertsteer.method.steer")
    module.steered_logits = steered_logits
    module.steered_generate = steered_generate
    monkeypatch.setitem(sys.modules, "expertsteer.method.steer", module)
    return calls


@pytest.mark.parametrize("calibration", ["content_free", "mean"])
def test_a_vector_that_only_moves_the_letter_habit_gains_nothing(
    chat_decoder, letter_shift, calibration
):
    # Distinct items: mean calibration ties the options of a lone item by construction.
    animals = ("cat", "dog", "fish", "bird")
    examples = [
        Example(f"q{i}", f"Which is pet number {i}?", animals[: 3 + i % 2], i % 3)
        for i in range(10)
    ]
    plain = evaluate(chat_decoder, "choice", examples, calibration=calibration)
    steered = evaluate(
        chat_decoder,
        "choice",
        examples,
        intervention=types.SimpleNamespace(alpha=30.0),
        calibration=calibration,
    )
    assert steered.raw_predictions == [0] * len(examples)  # raw: the habit moved to A
    assert steered.raw_habit_rate == 1.0
    torch.testing.assert_close(steered.calibrated, plain.calibrated, rtol=0, atol=1e-4)
    assert steered.predictions == plain.predictions
    # Items and (for content_free) the calibration prompts were all scored under steering.
    assert sum("Which is pet" in text for text in letter_shift) == len(examples)
    content_free = [text for text in letter_shift if "Which is pet" not in text]
    assert len(content_free) == (6 if calibration == "content_free" else 0)  # 2 templates x 3
    assert all("pet" not in text and "cat" not in text for text in content_free)


def test_steered_generation_is_used_and_numbers_are_checked(chat_decoder, letter_shift):
    steered = types.SimpleNamespace(alpha=0.0, text="So 2 + 3 = 5. The answer is $6.")
    result = evaluate(chat_decoder, "numeric", NUMERIC, intervention=steered)
    assert result.generations == [steered.text] * 2
    assert result.predictions == [6.0, 6.0]
    assert result.correct.tolist() == [False, True]


# -- evaluation end to end ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_type", "examples", "mode", "width"),
    [
        ("choice", CHOICE, None, 4),
        ("choice", CHOICE, "text", 4),
        ("yesno", YESNO, None, 2),
        ("classification", YESNO, "label", 2),
    ],
)
def test_option_evaluation_shapes(chat_decoder, task_type, examples, mode, width):
    result = evaluate(chat_decoder, task_type, examples, mode=mode)
    n = len(examples)
    assert result.correct.shape == (n,) and result.correct.dtype == torch.bool
    assert result.scores.shape == result.calibrated.shape == result.bias.shape == (n, width)
    assert len(result.predictions) == len(result.raw_predictions) == n
    assert result.calibration == "content_free"
    assert result.normalize == ("mean" if mode == "text" else "sum")
    target = torch.tensor(result.gold)
    assert result.correct.tolist() == [
        p == g for p, g in zip(result.predictions, result.gold, strict=True)
    ]
    assert math.isclose(accuracy(torch.tensor(result.predictions), target, width), result.accuracy)
    assert 1 / n <= result.habit_rate <= 1.0
    summary = result.summary(n_boot=200)
    assert summary["accuracy_low"] <= summary["accuracy"] <= summary["accuracy_high"]
    assert {"raw_accuracy", "raw_habit_rate", "macro_f1"} <= set(summary)


@pytest.mark.parametrize(("task_type", "examples"), [("choice", CHOICE), ("yesno", YESNO)])
def test_calibration_cache_across_batches_equals_one_call(chat_decoder, task_type, examples):
    whole = evaluate(chat_decoder, task_type, examples)
    cache: dict = {}
    parts = [
        evaluate(chat_decoder, task_type, examples[:1], calibration_cache=cache),
        evaluate(chat_decoder, task_type, examples[1:], calibration_cache=cache),
    ]
    assert cache  # the second batch read the first one's biases
    # float32 noise only: batch composition changes the padding
    rows = [row for part in parts for row in zip(part.bias, part.calibrated, strict=True)]
    for (bias, calibrated), whole_bias, whole_calibrated in zip(
        rows, whole.bias, whole.calibrated, strict=True
    ):
        k = bias.shape[0]  # a batch is as wide as its widest item; padding is -inf
        torch.testing.assert_close(bias, whole_bias[:k], atol=1e-5, rtol=0)
        torch.testing.assert_close(calibrated, whole_calibrated[:k], atol=1e-5, rtol=0)
    assert [p for part in parts for p in part.predictions] == whole.predictions


def test_generate_mode_for_choice_and_numeric(chat_decoder):
    choice = evaluate(chat_decoder, "choice", CHOICE, mode="generate", max_new_tokens=3)
    assert len(choice.generations) == len(choice.predictions) == 3
    assert choice.scores is None and choice.calibration == "none"
    assert all(p is None or 0 <= p < 4 for p in choice.predictions)
    numeric = evaluate(chat_decoder, "numeric", NUMERIC, max_new_tokens=3)
    assert numeric.correct.shape == (2,) and numeric.macro_f1 is None
    assert numeric.mode == "generate" and len(numeric.generations) == 2


def test_evaluate_errors_are_named(chat_decoder):
    with pytest.raises(ValueError, match="no examples to evaluate"):
        evaluate(chat_decoder, "choice", [])
    with pytest.raises(ValueError, match="unknown mode 'label' for a choice task"):
        evaluate(chat_decoder, "choice", CHOICE, mode="label")
    with pytest.raises(ValueError, match="calibration must be one of"):
        evaluate(chat_decoder, "choice", CHOICE, calibration="platt")
    with pytest.raises(ValueError, match="concept set is steering data"):
        evaluate(chat_decoder, "concept", CHOICE)
    with pytest.raises(ValueError, match="mean calibration needs more than one"):
        evaluate(chat_decoder, "yesno", YESNO[:1], calibration="mean")
    with pytest.raises(ValueError, match="not to mode 'generate'"):
        evaluate(chat_decoder, "numeric", NUMERIC, calibration="mean")
    bad = [Example("b", "Q?", ("yes", "no"), 2)]
    with pytest.raises(ValueError, match="gold answer 2 is not an option index in 0..1"):
        evaluate(chat_decoder, "yesno", bad)
    with pytest.raises(ValueError, match="needs at least two"):
        evaluate(chat_decoder, "choice", [Example("s", "Q?", ("only",), 0)])
    with pytest.raises(ValueError, match="has no gold answer"):
        evaluate(chat_decoder, "numeric", [Example("m", "Q?")])


def test_a_token_budget_splits_generation_calls_and_keeps_the_answers(chat_decoder, monkeypatch):
    from expertsteer.evaluation.answers import generate_answers

    prompts = [
        f"Count to {n}." if n % 2 else f"Name {n} animals that live in the sea." for n in range(6)
    ]
    expected = generate_answers(chat_decoder, prompts, max_new_tokens=4, batch_size=8)
    lengths = dict(zip(prompts, chat_decoder.token_lengths(prompts), strict=True))
    calls = []
    real = chat_decoder.generate

    def recording(chunk, max_new_tokens=32, **kwargs):
        calls.append([lengths[p] for p in chunk])
        return real(chunk, max_new_tokens=max_new_tokens, **kwargs)

    monkeypatch.setattr(chat_decoder, "generate", recording)
    budget = 2 * (max(lengths.values()) + 4)
    actual = generate_answers(
        chat_decoder, prompts, max_new_tokens=4, batch_size=8, max_tokens=budget
    )
    assert actual == expected
    assert sum(len(call) for call in calls) == len(prompts) and 1 < len(calls) < len(prompts)
    assert all(len(call) * (max(call) + 4) <= budget for call in calls)
