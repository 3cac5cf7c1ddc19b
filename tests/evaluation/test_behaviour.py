"""Behaviour continuations on a tiny random target: alpha 0 is the unsteered continuation token
for token, a push changes it, the same seed gives the same samples whatever the batch holds,
the block scale matches a float64 reference, fluency measures and the dev rule."""

import pytest
import torch

from expertsteer.evaluation.behaviour import (
    DevPoint,
    Row,
    choose,
    continue_prompts,
    degenerate,
    distinct2,
    median_token_norms,
)
from expertsteer.method.vectors import SteeringVectors
from expertsteer.models.causal_lm import CausalLM
from lightning_modules.steer import null_steering
from tests.tiny import byte_tokenizer, tiny_model

PROMPTS = ["The river", "A small house stood", "Numbers", "We walked to the old mill and"]


@pytest.fixture(scope="module")
def decoder():
    return CausalLM(tiny_model("llama", seed=5), byte_tokenizer(), chat_template=False)


def _direction(width: int, seed: int = 0) -> torch.Tensor:
    vector = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm()


def test_alpha_zero_is_the_unsteered_continuation_token_for_token(decoder):
    plain = [Row(str(k), text) for k, text in enumerate(PROMPTS)]
    zero = [Row(str(k), text, {1: torch.zeros(48)}) for k, text in enumerate(PROMPTS)]
    unsteered = continue_prompts(decoder, plain, max_new_tokens=8)
    at_zero = continue_prompts(decoder, zero, max_new_tokens=8)
    assert [c.text for c in at_zero] == [c.text for c in unsteered]
    # The same as transformers' own greedy generate, one prompt at a time.
    model, tokenizer = decoder.hf_model, decoder.tokenizer
    for prompt, continuation in zip(PROMPTS, unsteered, strict=True):
        encoding = tokenizer([prompt], return_tensors="pt")
        ids = model.generate(**encoding, max_new_tokens=8, do_sample=False)
        width = encoding["input_ids"].shape[1]
        assert tokenizer.decode(ids[0, width:], skip_special_tokens=True) == continuation.text
    pushed = [Row(str(k), text, {1: 40.0 * _direction(48)}) for k, text in enumerate(PROMPTS)]
    assert [c.text for c in continue_prompts(decoder, pushed, 8)] != [c.text for c in unsteered]


def test_rows_of_one_batch_carry_their_own_steering(decoder):
    vector = 40.0 * _direction(48, seed=1)
    mixed = [Row("a", PROMPTS[1], {1: vector}), Row("b", PROMPTS[1])]
    alone_steered = continue_prompts(decoder, [mixed[0]], 8)[0].text
    alone_plain = continue_prompts(decoder, [mixed[1]], 8)[0].text
    together = continue_prompts(decoder, mixed, 8)
    assert [c.text for c in together] == [alone_steered, alone_plain]
    assert alone_steered != alone_plain


def test_the_same_seed_gives_the_same_samples_whatever_the_batch(decoder):
    rows = [Row(str(k), text, None, sample) for k, text in enumerate(PROMPTS) for sample in (0, 1)]
    first = continue_prompts(decoder, rows, 10, seed=7, batch_size=8)
    again = continue_prompts(decoder, rows[::-1], 10, seed=7, batch_size=3)[::-1]
    assert [c.text for c in first] == [c.text for c in again]
    # Sampling: the two samples of a prompt differ somewhere, and another seed differs.
    assert any(first[2 * k].text != first[2 * k + 1].text for k in range(len(PROMPTS)))
    other = continue_prompts(decoder, rows, 10, seed=8, batch_size=8)
    assert [c.text for c in other] != [c.text for c in first]


def test_perplexity_is_that_of_the_new_tokens_under_the_unsteered_model(decoder):
    (continuation,) = continue_prompts(decoder, [Row("0", PROMPTS[0])], 6)
    # Reference: transformers' greedy ids (the byte tokenizer's decoded text need not
    # re-tokenize to them), scored by one float64 forward over prompt + new tokens.
    model, tokenizer = decoder.hf_model, decoder.tokenizer
    encoding = tokenizer([PROMPTS[0]], return_tensors="pt")
    ids = model.generate(**encoding, max_new_tokens=6, do_sample=False)
    width = encoding["input_ids"].shape[1]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
    nll = [-logp[width + k - 1, ids[0, width + k]] for k in range(ids.shape[1] - width)]
    assert continuation.perplexity == pytest.approx(float(torch.stack(nll).mean().exp()), rel=1e-4)


def test_median_token_norms_leave_the_first_position_out(decoder):
    norms = median_token_norms(decoder, PROMPTS, [1])
    states = []
    for prompt in PROMPTS:
        ids = decoder.tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            hidden = decoder.hf_model(**ids, output_hidden_states=True).hidden_states[2][0]
        states.append(hidden[1:].double().norm(dim=-1))
    assert norms[1] == pytest.approx(float(torch.cat(states).median()), rel=1e-4)


def test_fluency_measures():
    assert distinct2(["a b c", "a b d"]) == pytest.approx(3 / 4)
    assert distinct2([""]) == 0.0
    assert degenerate("   ")
    assert degenerate("the cat the cat the cat sat")
    assert degenerate("no no no")
    assert not degenerate("the cat sat on the mat and the dog sat too")


NONE = DevPoint(concept=0.1, share=0.4, perplexity=3.0)


def test_dev_rule_takes_the_best_concept_within_the_perplexity_cap():
    points = {
        ((10,), 0.25): DevPoint(0.3, 0.6, 4.0),
        ((10,), 0.5): DevPoint(0.6, 0.9, 7.0),  # over 2 x 3.0: excluded
        ((10,), -0.25): DevPoint(-0.2, 0.1, 3.5),
    }
    assert choose(points, NONE, "perplexity_cap", 2.0) == ((10,), 0.25)
    assert choose(points, NONE, "perplexity_cap", 3.0) == ((10,), 0.5)
    # Nothing within the cap: the least perplexing setting.
    assert choose(points, NONE, "perplexity_cap", 1.0) == ((10,), -0.25)
    # Harmonic mean of share and fluency: 0.5 x 3/7 loses to 0.6 x 3/4.
    assert choose(points, NONE, "harmonic") == ((10,), 0.25)


def test_dev_rule_ties_go_to_the_smaller_alpha_then_the_positive_sign():
    same = DevPoint(0.3, 0.5, 3.0)
    points = {((10,), 0.5): same, ((10,), -0.25): same, ((10,), 0.25): same}
    assert choose(points, NONE) == ((10,), 0.25)


def test_null_directions_do_not_depend_on_the_labels():
    vector = _direction(48, seed=3)
    fitted = SteeringVectors({1: vector}, {1: 5.0})
    flipped = SteeringVectors({1: -vector}, {1: 5.0})  # the same data with the labels swapped
    draws = null_steering(fitted, 4, seed=11)
    again = null_steering(flipped, 4, seed=11)
    for a, b in zip(draws, again, strict=True):
        assert torch.equal(a.vectors[1], b.vectors[1])
    assert not torch.equal(draws[0].vectors[1], null_steering(fitted, 4, seed=12)[0].vectors[1])
