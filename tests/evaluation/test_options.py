"""Option log-likelihoods against an unbatched float64 reference, shared prompt rows, tokens
merged across the prompt/option boundary, and steering through `steered_logits`."""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from expertsteer.evaluation.options import _plan_rows, option_logprobs, score_options
from expertsteer.models.causal_lm import CausalLM
from tests.tiny import SPECIALS, byte_tokenizer, tiny_model

TOL = 1e-4
PROMPTS = ["Which colour is the sky?", "2 + 2 =", "Is this review positive? Great film."]
OPTIONS = [["A", "B", "C"], ["four", "five"], ["positive", "negative", "neutral ok"]]


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


def _recorded_forwards(monkeypatch) -> list[tuple[int, int]]:
    """(rows, padded length) of every scoring forward from now on."""
    from expertsteer.evaluation import options

    shapes = []
    real = options._forward_logits

    def recording(decoder, encoding, *args, **kwargs):
        shapes.append(tuple(encoding["input_ids"].shape))
        return real(decoder, encoding, *args, **kwargs)

    monkeypatch.setattr(options, "_forward_logits", recording)
    return shapes


@pytest.mark.parametrize("budget", [1, 100, 150])
def test_a_token_budget_keeps_every_forward_within_it_and_the_scores(
    chat_decoder, monkeypatch, budget
):
    expected = score_options(chat_decoder, PROMPTS, OPTIONS, batch_size=16, share_prompt=False)
    shapes = _recorded_forwards(monkeypatch)
    actual = score_options(
        chat_decoder, PROMPTS, OPTIONS, batch_size=16, share_prompt=False, max_tokens=budget
    )
    torch.testing.assert_close(actual.total, expected.total, rtol=0, atol=TOL)
    assert torch.equal(actual.n_tokens, expected.n_tokens)
    assert sum(rows for rows, _ in shapes) == 8, "every (item, option) row scored once"
    assert all(rows * length <= budget or rows == 1 for rows, length in shapes)
    longest = max(length for _, length in shapes)
    # 8 rows of 15-50 tokens: without a budget they share one forward (batch_size 16).
    assert 1 < len(shapes) < 8 if budget >= 2 * longest else len(shapes) == 8


def test_a_token_budget_must_be_a_positive_number_of_tokens(chat_decoder):
    with pytest.raises(ValueError, match="max_tokens must be a positive number of tokens"):
        score_options(chat_decoder, PROMPTS, OPTIONS, max_tokens=0)
