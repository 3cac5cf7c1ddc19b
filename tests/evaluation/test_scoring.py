import math
import sys
import types

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from expertsteer.data.catalogue import BUILTIN
from expertsteer.data.prompts import render_prompt
from expertsteer.data.tasks import ROW_PARSERS, Example, TaskSpec, parse_row
from expertsteer.evaluation.scoring import (
    CONTENT_FREE_INPUTS,
    DEFAULT_MODE,
    _plan_rows,
    apply_calibration,
    content_free_bias,
    content_free_prompts,
    evaluate,
    extract_number,
    extract_option,
    habit_rate,
    mean_bias,
    numbers_match,
    option_logprobs,
    score_options,
)
from expertsteer.evaluation.stats import (
    _resampled_indices,
    accuracy,
    bootstrap_ci,
    bootstrap_means,
    gap_closed,
    habit_rate_ci,
    macro_f1,
    macro_f1_ci,
    paired_bootstrap_ci,
)
from expertsteer.models.causal_lm import CausalLM, left_pad_positions
from tests.tiny import SPECIALS, byte_tokenizer, tiny_model

TOL = 1e-4
PROMPTS = ["Which colour is the sky?", "2 + 2 =", "Is this review positive? Great film."]
OPTIONS = [["A", "B", "C"], ["four", "five"], ["positive", "negative", "neutral ok"]]

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


@pytest.fixture(scope="module")
def chat_decoder():
    return CausalLM(tiny_model("llama", seed=3), byte_tokenizer(chat=True))


@pytest.fixture(scope="module")
def plain_decoder():
    # gpt2: absolute positions, so left padding must not shift them; no chat template.
    return CausalLM(tiny_model("gpt2", seed=4), byte_tokenizer(chat=False))


def _reference(decoder, prompt, option):
    """Independent reference: one unpadded float64 forward per (prompt, option) text."""
    special = not decoder.use_chat_template
    head = decoder.tokenizer(decoder.format([prompt])[0], add_special_tokens=special)["input_ids"]
    full = decoder.tokenizer(decoder.format([prompt], [option])[0], add_special_tokens=special)[
        "input_ids"
    ]
    assert full[: len(head)] == head  # the byte tokenizer never merges across the boundary
    with torch.no_grad():
        logits = decoder.hf_model(torch.tensor([full])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[t - 1, full[t]].item() for t in range(len(head), len(full)))


def _reference_matrix(decoder, prompts, options):
    width = max(len(o) for o in options)
    out = torch.full((len(prompts), width), float("-inf"), dtype=torch.float64)
    for i, (prompt, item) in enumerate(zip(prompts, options, strict=True)):
        for k, option in enumerate(item):
            out[i, k] = _reference(decoder, prompt, option)
    return out


# -- option log-likelihood ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["chat_decoder", "plain_decoder"])
def test_option_logprobs_equal_unbatched_reference(which, request):
    decoder = request.getfixturevalue(which)
    expected = _reference_matrix(decoder, PROMPTS, OPTIONS)
    for batch_size in (1, 3, 16):
        for share in (True, False):
            actual = option_logprobs(
                decoder, PROMPTS, OPTIONS, batch_size=batch_size, share_prompt=share
            )
            assert actual.shape == (3, 3)
            assert torch.isneginf(actual[1, 2])  # item 1 has two options: padded
            torch.testing.assert_close(actual, expected, rtol=0, atol=TOL)


def test_mean_normalisation_divides_by_token_count(chat_decoder):
    scores = score_options(chat_decoder, PROMPTS, OPTIONS)
    lengths = torch.tensor([[1, 1, 1], [4, 4, 0], [8, 8, 10]])
    assert torch.equal(scores.n_tokens, lengths)  # byte tokenizer: one token per character
    mean = option_logprobs(chat_decoder, PROMPTS, OPTIONS, normalize="mean")
    valid = lengths > 0
    torch.testing.assert_close(mean[valid], scores.total[valid] / lengths[valid])
    assert torch.isneginf(mean[~valid]).all()


def test_shared_prompt_rows_only_for_single_token_options(chat_decoder):
    rows = _plan_rows(chat_decoder, PROMPTS, OPTIONS, share_prompt=True)
    shared = [r for r in rows if r.completion == ""]
    assert len(shared) == 1 and len(shared[0].targets) == 3  # the letters of item 0
    assert len(rows) == 1 + 2 + 3


def test_prompt_lengths_agree_with_the_steering_module(chat_decoder):
    steering = pytest.importorskip("expertsteer.method.steer")
    rows = _plan_rows(chat_decoder, PROMPTS, OPTIONS, share_prompt=False)
    expected = steering.prompt_lengths(
        chat_decoder, [r.prompt for r in rows], [r.completion for r in rows]
    )
    assert [r.prompt_length for r in rows] == expected.tolist()


def _merging_decoder():
    """Byte tokenizer plus one merge, "x" + newline, that crosses the prompt/option boundary."""
    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in SPECIALS:
        vocab[token] = len(vocab)
    vocab["xĊ"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("x", "Ċ")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>"
    )
    model = tiny_model("llama", seed=5)
    model.resize_token_embeddings(len(vocab))
    return CausalLM(model, tokenizer), vocab


def test_tokens_merged_across_the_boundary_are_scored():
    decoder, vocab = _merging_decoder()
    # Plain prompts are joined to options with a newline: "box" + "\n" + "A" merges "x\n".
    prompts, options = ["box", "cat"], [["A", "B"], ["A", "B"]]
    scores = score_options(decoder, prompts, options, batch_size=4)
    assert scores.n_tokens.tolist() == [[2, 2], [2, 2]]  # merged "x\n" + letter; "\n" + letter
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for k, option in enumerate(options[i]):
                ids = decoder.tokenizer(prompt + "\n" + option)["input_ids"]
                if i == 0:
                    assert vocab["xĊ"] in ids
                logprobs = torch.log_softmax(
                    decoder.hf_model(torch.tensor([ids])).logits[0].double(), -1
                )
                expected = sum(logprobs[t - 1, ids[t]].item() for t in (len(ids) - 2, len(ids) - 1))
                assert math.isclose(scores.total[i, k].item(), expected, abs_tol=TOL)


def test_option_errors_are_named(chat_decoder):
    with pytest.raises(ValueError, match="options count mismatch: 3 prompts but 2"):
        option_logprobs(chat_decoder, PROMPTS, OPTIONS[:2])
    with pytest.raises(ValueError, match="no prompts to score"):
        option_logprobs(chat_decoder, [], [])
    with pytest.raises(ValueError, match="item 1 has no options"):
        option_logprobs(chat_decoder, PROMPTS[:2], [["A"], []])
    with pytest.raises(ValueError, match="empty or non-text option"):
        option_logprobs(chat_decoder, PROMPTS[:1], [["A", ""]])
    with pytest.raises(ValueError, match="normalize must be one of"):
        option_logprobs(chat_decoder, PROMPTS, OPTIONS, normalize="max")


# -- calibration -------------------------------------------------------------------------------


def _content_and_offset(n=40, k=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    content = torch.randn(n, k, generator=generator, dtype=torch.float64)
    offset = 5.0 * torch.randn(k, generator=generator, dtype=torch.float64)
    return content, offset


def test_content_free_calibration_removes_a_per_option_offset_exactly():
    content, offset = _content_and_offset()
    scores = content + offset  # a model that prefers some options whatever the content
    row_constants = torch.tensor([[0.0], [3.0], [-7.0]], dtype=torch.float64)
    content_free = offset + row_constants  # the same preference seen on content-free prompts
    calibrated = apply_calibration(scores, content_free_bias(content_free))
    torch.testing.assert_close(calibrated, torch.log_softmax(content, -1), rtol=0, atol=1e-12)


def test_mean_calibration_removes_a_per_option_offset_exactly():
    content, offset = _content_and_offset()
    shifted = apply_calibration(content + offset, mean_bias(content + offset))
    plain = apply_calibration(content, mean_bias(content))
    torch.testing.assert_close(shifted, plain, rtol=0, atol=1e-12)


def test_calibration_recovers_answers_hidden_by_an_option_habit():
    gold = torch.arange(40) % 4
    content = torch.nn.functional.one_hot(gold, 4).double() * 2.0
    offset = torch.tensor([10.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    scores = content + offset
    assert (scores.argmax(1) == 0).all()  # raw: always the first option
    for bias in (content_free_bias(offset[None]), mean_bias(scores)):
        assert torch.equal(apply_calibration(scores, bias).argmax(1), gold)


def test_calibration_keeps_padding_and_never_makes_nan():
    scores = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -3.0, -1.0], [-2.0, -1.0, -4.0]])
    for bias in (mean_bias(scores), content_free_bias(scores[1:])):
        calibrated = apply_calibration(scores, bias)
        assert not torch.isnan(calibrated).any()
        assert torch.isneginf(calibrated[0, 2])
        torch.testing.assert_close(calibrated.exp().sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="more than one item"):
        mean_bias(scores[:1])


def test_content_free_prompts_blank_the_content():
    prompts = content_free_prompts("choice", CHOICE[2], "letter")
    assert len(prompts) == len(CONTENT_FREE_INPUTS)
    assert prompts[0] == "N/A\n\nN/A\nA. N/A\nB. N/A\nC. N/A\n" + (
        "Answer with the letter of the correct option."
    )
    labels = content_free_prompts("yesno", YESNO[0], "label", ["N/A"])
    assert labels == ["N/A\nAnswer with one of: yes, no."]
    assert all("seven" not in p and "Count" not in p for p in prompts)


SST2_INSTRUCTION = "What is the sentiment of this movie review?"


def _builtin_example(task: str, row: dict):
    spec = BUILTIN[task]
    return ROW_PARSERS[spec.row_parser](row, 0, spec)


@pytest.mark.parametrize(
    ("task", "row", "content", "kept"),
    [
        ("sst2", {"text": "1 a gripping , funny film"}, "gripping", [SST2_INSTRUCTION]),
        (
            "financial_phrasebank",
            {"text": "Profit fell sharply .", "label": "negative"},
            "Profit",
            ["What is the sentiment of this text?", "negative, neutral, positive"],
        ),
        (
            "headline_price_up",
            {"News": "gold climbs to record", "Price Direction Up": "1"},
            "climbs",
            ["Does this news headline talk about the price going up?", "one of: no, yes"],
        ),
        (
            "boolq",
            {
                "instruction": "Please answer the following question with true or false, "
                "question: is the sky green?\n\nAnswer format: true/false",
                "answer": "false",
            },
            "sky",
            ["Answer with one of: false, true."],
        ),
        (
            "winogrande",
            {
                "instruction": "Please choose the correct answer to fill in the blank to "
                "complete the given sentence: Ann gave Sue a book because _ was kind.\n\n"
                "Option1: Ann Option2: Sue Answer format: option1/option2",
                "answer": "option1",
            },
            "kind",
            ["Fill in the blank:", "Answer with the letter of the correct option."],
        ),
        (
            "arc_easy",
            {
                "instruction": "Please choose the correct answer to the question: Which is a "
                "metal?\n\nAnswer1: iron Answer2: wood\n\nAnswer format: answer1/answer2",
                "answer": "answer1",
            },
            "metal",
            ["Answer with the letter of the correct option."],
        ),
    ],
)
def test_calibration_prompts_keep_the_instruction_and_answer_format(task, row, content, kept):
    example = _builtin_example(task, row)
    task_type = BUILTIN[task].type
    prompts = content_free_prompts(task_type, example, DEFAULT_MODE[task_type])
    assert len(prompts) == len(CONTENT_FREE_INPUTS)
    item_prompt = render_prompt(task_type, example)
    for prompt, blank in zip(prompts, CONTENT_FREE_INPUTS, strict=True):
        assert content in item_prompt and content not in prompt
        assert all(text in item_prompt and text in prompt for text in kept)
        if task_type != "choice":  # letter mode blanks the option texts too
            # Only the content differs: the item's prompt with its content replaced.
            assert prompt == item_prompt.replace(example.question, blank)


def test_sst2_calibration_prompt_is_the_item_template_with_na_content():
    example = _builtin_example("sst2", {"text": "0 a dull , lifeless film"})
    # The rendered item prompt is what it was before the instruction was a field of its own.
    assert render_prompt("classification", example) == (
        f"{SST2_INSTRUCTION}\na dull , lifeless film\nAnswer with one of: negative, positive."
    )
    (prompt,) = content_free_prompts("classification", example, "label", ["N/A"])
    assert prompt == f"{SST2_INSTRUCTION}\nN/A\nAnswer with one of: negative, positive."


def test_task_spec_instruction_is_kept_by_calibration():
    spec = TaskSpec(
        name="reviews",
        type="classification",
        labels=["bad", "good"],
        instruction="Rate this product review.",
        files={"test": "x.jsonl"},
        fields={"question": "text", "answer": "label"},
    )
    example = parse_row({"text": "Broke in a day.", "label": 0}, 0, spec)
    assert render_prompt("classification", example).startswith(
        "Rate this product review.\nBroke in a day.\n"
    )
    (prompt,) = content_free_prompts("classification", example, "label", ["N/A"])
    assert prompt == "Rate this product review.\nN/A\nAnswer with one of: bad, good."


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


def test_real_steering_at_alpha_zero_equals_no_steering(chat_decoder):
    steering = pytest.importorskip("expertsteer.method.steer")
    vector = torch.nn.functional.normalize(torch.randn(chat_decoder.hidden_size), dim=0)
    off = steering.Intervention(vectors={1: vector}, scales={1: 1.0}, alpha=0.0)
    plain = option_logprobs(chat_decoder, PROMPTS, OPTIONS)
    torch.testing.assert_close(
        option_logprobs(chat_decoder, PROMPTS, OPTIONS, intervention=off), plain, atol=TOL, rtol=0
    )
    on = steering.Intervention(vectors={1: vector}, scales={1: 1.0}, alpha=4.0)
    moved = option_logprobs(chat_decoder, PROMPTS, OPTIONS, intervention=on)
    assert (moved - plain)[torch.isfinite(plain)].abs().max() > 1e-3
    # Steering only the completion's tokens cannot change a one-token option's score: it is
    # predicted from the last prompt position, whether scored from a shared prompt row or not.
    late = steering.Intervention(
        vectors={1: vector}, scales={1: 1.0}, alpha=4.0, positions="generated"
    )
    for share in (True, False):
        letters = option_logprobs(
            chat_decoder, PROMPTS[:1], OPTIONS[:1], intervention=late, share_prompt=share
        )
        torch.testing.assert_close(letters, plain[:1], atol=TOL, rtol=0)
    words = option_logprobs(chat_decoder, PROMPTS[1:], OPTIONS[1:], intervention=late)
    assert (words - plain[1:])[:, :2].abs().max() > 1e-3  # later tokens of words do change


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


# -- answer extraction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", 42.0),
        ("42", 42.0),
        ("It costs $1,234.50 in total", 1234.5),
        ("12,345,678 people", 12345678.0),
        ("She lost -$5 and then $-7", -7.0),
        ("x = -3.5", -3.5),
        ("−8 degrees", -8.0),
        ("10 - 5 = 5", 5.0),
        ("first 3, then 4, finally 9", 9.0),
        ("1,2,3", 3.0),
        ("about .5 of it", 0.5),
        ("#### 72", 72.0),
        ("**18**\n", 18.0),
        ("answer: 7 apples.", 7.0),
        ("0.25.", 0.25),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numbers_match():
    assert numbers_match(5.0, 5)
    assert numbers_match(1234.0000001, 1234.0)
    assert not numbers_match(5.01, 5.0)
    assert not numbers_match(None, 5.0)
    assert not numbers_match(float("nan"), 5.0)
    assert numbers_match(0.1 + 0.2, 0.3)


@pytest.mark.parametrize(
    ("text", "letters", "expected"),
    [
        ("B", True, 1),
        ("(C) tree", True, 2),
        ("A. red", True, 0),
        ("The answer is B.", True, 1),
        ("I think the apple.", True, 1),
        ("A cat sat on a stone", True, 0),  # no letter answer: the option text "stone"
        ("E", True, None),  # not one of the three options
        ("Negative, clearly.", False, 1),
        ("It is not positive; it is negative", False, 0),
        ("unsure", False, None),
    ],
)
def test_extract_option(text, letters, expected):
    choices = ("stone", "apple", "tree") if letters else ("positive", "negative")
    assert extract_option(text, choices, letters) == expected


def test_habit_rate():
    assert habit_rate([0, 0, 1, 0]) == 0.75
    assert habit_rate([None, None, 1, 2]) == 0.25
    assert habit_rate([None]) == 0.0


# -- metrics -----------------------------------------------------------------------------------


def test_macro_f1_and_accuracy_against_hand_counts():
    preds = torch.tensor([0, 0, 1, -1])
    target = torch.tensor([0, 1, 1, 1])
    assert accuracy(preds, target, 2) == 0.5
    # class 0: P 1/2, R 1 -> 2/3; class 1: P 1, R 1/3 -> 1/2; the absent class 2 is left out.
    for classes in (2, 3):
        assert math.isclose(macro_f1(preds, target, classes), (2 / 3 + 1 / 2) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="target labels must lie in 0..1"):
        accuracy(preds, torch.tensor([0, 1, 2, 0]), 2)


def test_macro_f1_and_habit_intervals_resample_like_the_plain_figures():
    rng = np.random.default_rng(0)
    target = torch.tensor(rng.integers(0, 3, 60))
    preds = torch.where(
        torch.tensor(rng.random(60) < 0.6), target, torch.tensor(rng.integers(-1, 3, 60))
    )
    f1, low, high = macro_f1_ci(preds, target, 3, n_boot=50, seed=4)
    assert f1 == macro_f1(preds, target, 3) and low < f1 < high
    # The vectorised resamples equal the plain figures computed on each resampled item set.
    index_rows = next(_resampled_indices(60, 50, 4))
    plain = torch.tensor([macro_f1(preds[idx], target[idx], 3) for idx in index_rows])
    assert (low, high) == pytest.approx(
        torch.quantile(plain.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    )
    answers = [None if p < 0 else int(p) for p in preds]
    rate, low, high = habit_rate_ci(preds, n_boot=50, seed=4)
    assert rate == habit_rate(answers) and low <= rate <= high
    plain = torch.tensor([habit_rate([answers[i] for i in idx]) for idx in index_rows.tolist()])
    assert (low, high) == pytest.approx(
        torch.quantile(plain.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    )
    assert habit_rate_ci(torch.full((5,), -1), n_boot=10)[0] == 0.0
    with pytest.raises(ValueError, match="codes must be >= 0"):
        habit_rate_ci(torch.tensor([0, -2]))


def test_bootstrap_ci_sanity():
    rng = np.random.default_rng(0)
    correct = torch.tensor(rng.random(300) < 0.6)
    mean, low, high = bootstrap_ci(correct)
    assert mean == correct.double().mean().item() and low < mean < high
    assert bootstrap_ci(correct, seed=0) == (mean, low, high)
    assert bootstrap_ci(correct, seed=1) != (mean, low, high)
    # Width of a proportion's 95% interval: about 2 * 1.96 * sqrt(p (1 - p) / n).
    widths = {}
    for n in (100, 1600):
        half = torch.arange(n) % 2 == 0
        _, low, high = bootstrap_ci(half)
        widths[n] = high - low
        assert abs(widths[n] - 2 * 1.96 * math.sqrt(0.25 / n)) < 0.15 * widths[n]
    assert 3.3 < widths[100] / widths[1600] < 4.7
    assert bootstrap_ci(torch.ones(50, dtype=torch.bool)) == (1.0, 1.0, 1.0)
    assert bootstrap_ci(torch.zeros(50)) == (0.0, 0.0, 0.0)


def test_bootstrap_means_are_chunk_independent_in_shape_and_seeded():
    values = torch.rand(10)
    means = bootstrap_means(values, n_boot=37, seed=3)
    assert means.shape == (37,)
    assert torch.equal(means, bootstrap_means(values, n_boot=37, seed=3))
    assert values.min() <= means.min() and means.max() <= values.max()


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    a = torch.tensor(rng.random(400) < 0.5)
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0, 0.0)
    b = a.clone()
    flip = torch.tensor(rng.choice(400, size=40, replace=False))
    b[flip] = ~b[flip]  # b agrees with a on 90% of the items: strongly correlated
    diff, low, high = paired_bootstrap_ci(a, b)
    assert math.isclose(diff, a.double().mean().item() - b.double().mean().item(), abs_tol=1e-12)
    assert low <= diff <= high
    # Unpaired: independent resamples of the two vectors.
    unpaired = bootstrap_means(a, seed=10) - bootstrap_means(b, seed=11)
    u_low, u_high = torch.quantile(unpaired, torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert high - low < 0.5 * float(u_high - u_low)
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_ci(a, b[:10])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        bootstrap_ci(torch.tensor([]))
    with pytest.raises(ValueError, match="level must lie strictly between"):
        bootstrap_ci(a, level=1.0)


def test_gap_closed():
    assert math.isclose(gap_closed(0.6, 0.5, 0.7), 0.5)
    assert math.isclose(gap_closed(0.45, 0.5, 0.7), -0.25)
    assert gap_closed(0.6, 0.5, 0.5) is None  # no gap to close
    assert gap_closed(0.6, 0.5, 0.4) is None  # the expert is worse: nothing to transfer
