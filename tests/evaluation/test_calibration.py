"""Calibration removes a per-option offset exactly; content-free prompts keep the instruction and
answer format and blank only the content."""

import pytest
import torch

from expertsteer.data.catalogue import BUILTIN
from expertsteer.data.prompts import render_prompt
from expertsteer.data.tasks import ROW_PARSERS, Example, TaskSpec, parse_row
from expertsteer.evaluation.calibration import (
    CONTENT_FREE_INPUTS,
    apply_calibration,
    content_free_bias,
    content_free_prompts,
    mean_bias,
)
from expertsteer.evaluation.evaluate import DEFAULT_MODE

COUNTING = Example("c2", "Which is a number?", ("seven", "cat", "tree"), 0, context="Count things.")
FIRE = Example("y0", "Is fire hot?", ("yes", "no"), 0)


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
    prompts = content_free_prompts("choice", COUNTING, "letter")
    assert len(prompts) == len(CONTENT_FREE_INPUTS)
    assert prompts[0] == "N/A\n\nN/A\nA. N/A\nB. N/A\nC. N/A\n" + (
        "Answer with the letter of the correct option."
    )
    labels = content_free_prompts("yesno", FIRE, "label", ["N/A"])
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
