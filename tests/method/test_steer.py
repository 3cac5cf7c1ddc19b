import functools
import logging
import warnings

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from expertsteer.method.steer import (
    POSITIONS,
    DegenerateLogitsError,
    Intervention,
    mean_residual_norms,
    position_mask,
    prompt_lengths,
    steered_generate,
    steered_generate_ids,
    steered_logits,
)
from expertsteer.method.vectors import SteeringVectors
from expertsteer.models.causal_lm import CausalLM, block_hidden, left_pad_positions
from tests.tiny import byte_tokenizer, tiny_model

FAMILIES = ["llama", "qwen2", "gpt2", "gemma3_text"]
PROMPTS = ["The capital of France is", "2 + 2 =", "a", "Steering vectors move hidden states."]
ANSWERS = [" Paris.", " 4", "bc", " Yes, along v."]
NEW_TOKENS = 6
ATOL = 1e-5


@functools.cache
def _decoder(family: str, chat: bool = True) -> CausalLM:
    # Shared across tests: nothing here changes a model (hooks are always removed).
    return CausalLM(tiny_model(family), byte_tokenizer(chat=chat))


@functools.cache
def _scales(family: str) -> dict[int, float]:
    decoder = _decoder(family)
    return mean_residual_norms(decoder, PROMPTS, [0, decoder.num_layers - 1])


def _intervention(family: str, positions: str, alpha: float = 1.0) -> Intervention:
    """Random unit vectors at the first and last blocks (two layers: order matters)."""
    generator = torch.Generator().manual_seed(0)
    width = _decoder(family).hidden_size
    vectors = {
        layer: torch.nn.functional.normalize(torch.randn(width, generator=generator), dim=0)
        for layer in _scales(family)
    }
    return Intervention(vectors, _scales(family), alpha=alpha, positions=positions)


def _reference_mask(attention_mask, lengths, positions):
    """Independent of `position_mask`: pick real token columns row by row."""
    out = torch.zeros(attention_mask.shape, dtype=torch.bool)
    for row, mask_row in enumerate(attention_mask.tolist()):
        real = [column for column, on in enumerate(mask_row) if on]
        n = len(real) if lengths is None else int(lengths[row])
        chosen = {
            "all": real,
            "prompt": real[:n],
            "generated": real[n:],
            "last_prompt": real[n - 1 : n],
        }[positions]
        out[row, chosen] = True
    return out


def _add_hooks(decoder, intervention, weights_at):
    """Plain torch forward hooks adding alpha * s_j * v * weights_at(call, T) to block j."""
    handles = []
    for layer, vector in intervention.vectors.items():
        added = intervention.alpha * intervention.scales[layer] * vector
        calls = [0]

        def hook(_module, _inputs, output, added=added, calls=calls):
            hidden = block_hidden(output)
            weights = weights_at(calls[0], hidden.shape[1]).to(hidden.dtype).unsqueeze(-1)
            calls[0] += 1
            steered = hidden + weights * added
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        handles.append(decoder.hf_blocks()[layer].register_forward_hook(hook))
    return handles


def _hooked_log_probs(decoder, encoding, intervention, mask):
    handles = _add_hooks(decoder, intervention, lambda _call, _width: mask)
    attention = encoding["attention_mask"]
    try:
        with torch.no_grad():
            logits = decoder.hf_model(**encoding, position_ids=left_pad_positions(attention)).logits
    finally:
        for handle in handles:
            handle.remove()
    return torch.log_softmax(logits.float(), dim=-1)


def _hooked_generate(decoder, prompts, intervention):
    """HF generate (greedy, KV cache) with hooks: call 0 is the prompt pass, later calls one
    new token each."""
    encoding = decoder.encode(prompts)
    attention = encoding["attention_mask"]
    positions = intervention.positions

    def weights_at(call, width):
        if call == 0:
            if positions == "generated":
                return torch.zeros_like(attention, dtype=torch.bool)
            return _reference_mask(attention, None, positions)
        return torch.full((attention.shape[0], width), positions in ("all", "generated"))

    handles = _add_hooks(decoder, intervention, weights_at)
    try:
        with torch.no_grad():
            ids = decoder.hf_model.generate(
                **encoding,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=decoder.tokenizer.pad_token_id,
            )
    finally:
        for handle in handles:
            handle.remove()
    return ids[:, attention.shape[1] :]


def _real(log_probs, attention_mask):
    return log_probs[attention_mask.bool()]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", POSITIONS)
def test_steered_logits_equal_forward_hook(family, positions):
    decoder = _decoder(family)
    encoding = decoder.encode(PROMPTS, ANSWERS)
    lengths = prompt_lengths(decoder, PROMPTS, ANSWERS)
    intervention = _intervention(family, positions)
    mask = _reference_mask(encoding["attention_mask"], lengths, positions)
    steered = steered_logits(decoder, encoding, intervention, lengths)
    expected = _hooked_log_probs(decoder, encoding, intervention, mask)
    attention = encoding["attention_mask"]
    assert steered.shape == (*attention.shape, decoder.hf_model.config.vocab_size)
    torch.testing.assert_close(
        _real(steered, attention), _real(expected, attention), atol=ATOL, rtol=0
    )
    plain = steered_logits(decoder, encoding, None)
    # The steering must matter for the comparison to mean anything.
    assert (_real(steered, attention) - _real(plain, attention)).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", POSITIONS)
def test_steered_generate_equals_hf_generate_with_hook(family, positions):
    decoder = _decoder(family)
    intervention = _intervention(family, positions, alpha=2.0)
    ids = steered_generate_ids(decoder, PROMPTS, intervention, max_new_tokens=NEW_TOKENS)
    expected = _hooked_generate(decoder, PROMPTS, intervention)
    assert torch.equal(ids, expected)
    texts = steered_generate(decoder, PROMPTS, intervention, max_new_tokens=NEW_TOKENS)
    assert texts == decoder.tokenizer.batch_decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_modes_steer_different_tokens(family):
    decoder = _decoder(family)
    plain = steered_generate_ids(decoder, PROMPTS, None, max_new_tokens=NEW_TOKENS)
    outputs = {
        positions: steered_generate_ids(
            decoder,
            PROMPTS,
            _intervention(family, positions, alpha=2.0),
            max_new_tokens=NEW_TOKENS,
        )
        for positions in POSITIONS
    }
    for positions, ids in outputs.items():
        assert not torch.equal(ids, plain), positions
    # The first new token comes from the prompt pass, which `generated` leaves alone.
    torch.testing.assert_close(outputs["generated"][:, 0], plain[:, 0])
    assert not torch.equal(outputs["generated"], outputs["all"])


def test_uncached_generation_steers_the_recomputed_prompt():
    decoder = _decoder("llama")
    for positions in ("prompt", "generated"):
        intervention = _intervention("llama", positions, alpha=2.0)
        cached = steered_generate_ids(decoder, PROMPTS, intervention, NEW_TOKENS)
        uncached = steered_generate_ids(decoder, PROMPTS, intervention, NEW_TOKENS, use_cache=False)
        assert torch.equal(cached, uncached), positions


def test_generation_stopped_early_by_eos_returns_without_warnings():
    decoder = _decoder("qwen2")
    intervention = _intervention("qwen2", "all", alpha=2.0)
    first = steered_generate_ids(decoder, PROMPTS, intervention, NEW_TOKENS)[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = steered_generate_ids(
            decoder, PROMPTS, intervention, NEW_TOKENS, eos_token_id=sorted(set(first.tolist()))
        )
    # Every row stops at its first token, long before the steering loop's bound.
    assert ids.shape == (len(PROMPTS), 1)
    assert torch.equal(ids[:, 0], first)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_alpha_zero_is_the_unsteered_model(family):
    decoder = _decoder(family)
    encoding = decoder.encode(PROMPTS, ANSWERS)
    plain = steered_logits(decoder, encoding, None)
    attention = encoding["attention_mask"]
    with torch.no_grad():
        logits = decoder.hf_model(**encoding, position_ids=left_pad_positions(attention)).logits
    torch.testing.assert_close(
        _real(plain, attention), _real(torch.log_softmax(logits, -1), attention), atol=ATOL, rtol=0
    )
    zero = _intervention(family, "all", alpha=0.0)
    assert torch.equal(steered_logits(decoder, encoding, zero), plain)
    texts = decoder.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert steered_generate(decoder, PROMPTS, zero, max_new_tokens=NEW_TOKENS) == texts
    steered = _intervention(family, "all", alpha=0.5)
    assert not torch.equal(steered_logits(decoder, encoding, steered), plain)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_generated_positions_leave_prompt_logits_alone(family):
    decoder = _decoder(family)
    encoding = decoder.encode(PROMPTS, ANSWERS)
    lengths = prompt_lengths(decoder, PROMPTS, ANSWERS)
    plain = steered_logits(decoder, encoding, None)
    prompt = _reference_mask(encoding["attention_mask"], lengths, "prompt")
    completion = _reference_mask(encoding["attention_mask"], lengths, "generated")
    generated = steered_logits(decoder, encoding, _intervention(family, "generated"), lengths)
    # Causal attention: steering completion tokens cannot reach the prompt positions.
    assert torch.equal(generated[prompt], plain[prompt])
    assert ((generated - plain).abs().amax(-1)[completion] > 1e-3).all()
    steered_prompt = steered_logits(decoder, encoding, _intervention(family, "prompt"), lengths)
    assert ((steered_prompt - plain).abs().amax(-1)[prompt] > 1e-3).all()
    last = steered_logits(decoder, encoding, _intervention(family, "last_prompt"), lengths)
    before_last = prompt & ~_reference_mask(encoding["attention_mask"], lengths, "last_prompt")
    assert torch.equal(last[before_last], plain[before_last])
    assert not torch.equal(last[completion], plain[completion])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("positions", POSITIONS)
def test_padded_rows_match_single_prompt_runs(family, positions):
    # gpt2 has absolute positions: left padding must shift neither them nor the mask.
    decoder = _decoder(family)
    intervention = _intervention(family, positions)
    encoding = decoder.encode(PROMPTS, ANSWERS)
    lengths = prompt_lengths(decoder, PROMPTS, ANSWERS)
    batched = steered_logits(decoder, encoding, intervention, lengths)
    attention = encoding["attention_mask"]
    for row, (question, answer) in enumerate(zip(PROMPTS, ANSWERS, strict=True)):
        alone = decoder.encode([question], [answer])
        single = steered_logits(decoder, alone, intervention, lengths[row : row + 1])
        width = int(attention[row].sum())
        assert single.shape[1] == width
        torch.testing.assert_close(batched[row, -width:], single[0], atol=ATOL, rtol=0)


def test_position_mask_on_a_hand_worked_batch():
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    lengths = torch.tensor([2, 3, 1])
    expected = {
        "all": attention.bool(),
        "prompt": torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]]).bool(),
        "generated": torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]).bool(),
        "last_prompt": torch.tensor([[0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1]]).bool(),
    }
    for positions, mask in expected.items():
        assert torch.equal(position_mask(attention, lengths, positions), mask), positions
    whole = position_mask(attention, None, "last_prompt")
    assert whole[:, -1].all() and whole.sum() == 3
    assert not position_mask(attention, None, "generated").any()


def test_prompt_lengths_count_the_formatted_prompt():
    for chat in (True, False):
        decoder = _decoder("llama", chat=chat)
        lengths = prompt_lengths(decoder, PROMPTS, ANSWERS)
        alone = decoder.encode(PROMPTS)["attention_mask"].sum(-1)
        assert lengths.tolist() == alone.tolist()
        joined = decoder.encode(PROMPTS, ANSWERS)["attention_mask"].sum(-1)
        # Bytes are tokens; the plain format joins prompt and answer with a newline.
        extra = [len(answer.encode()) + (0 if chat else 1) for answer in ANSWERS]
        assert (joined - lengths).tolist() == extra


def _merging_tokenizer() -> PreTrainedTokenizerFast:
    """Byte tokens plus one merge, 'a' + newline, that straddles the prompt/answer boundary."""
    base = byte_tokenizer()
    vocab = dict(base.get_vocab())
    vocab["aĊ"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "Ċ")]))
    # No word splitting, so the merge can cross the whitespace between prompt and answer.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>"
    )


def test_prompt_lengths_fall_back_where_tokens_merge_across_the_boundary(caplog):
    decoder = CausalLM(tiny_model("llama"), _merging_tokenizer(), chat_template=False)
    prompts, answers = ["say a", "say b"], ["yes", "no"]
    with caplog.at_level(logging.WARNING, logger="expertsteer.method.steer"):
        lengths = prompt_lengths(decoder, prompts, answers)
    alone = [len(decoder.tokenizer(p)["input_ids"]) for p in prompts]
    assert lengths.tolist() == [alone[0] - 1, alone[1]]
    assert "row 0" in caplog.text and "merges across the boundary" in caplog.text
    with pytest.raises(ValueError, match="not a prefix"):
        prompt_lengths(decoder, prompts, answers, strict=True)


def test_mean_residual_norms_match_hooked_norms():
    decoder = _decoder("qwen2")
    norms = mean_residual_norms(decoder, PROMPTS, [1, -1], batch_size=3)
    skipped = mean_residual_norms(decoder, PROMPTS, [1, -1], batch_size=3, skip_first=2)
    captured = {}
    handles = [
        decoder.hf_blocks()[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: captured.__setitem__(layer, block_hidden(out))
        )
        for layer in (1, 3)
    ]
    encoding = decoder.encode(PROMPTS)
    attention = encoding["attention_mask"]
    try:
        with torch.no_grad():
            decoder.hf_model(**encoding, position_ids=left_pad_positions(attention))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(norms) == [1, 3] and sorted(skipped) == [1, 3]
    for layer, value in norms.items():
        per_token = captured[layer].double().norm(dim=-1)
        real = [row[mask.bool()] for row, mask in zip(per_token, attention, strict=True)]
        assert value == pytest.approx(torch.cat(real).mean().item(), rel=1e-5)
        later = torch.cat([row[2:] for row in real])
        assert skipped[layer] == pytest.approx(later.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="no tokens left"):
        mean_residual_norms(decoder, ["a"], [0], skip_first=50)


def test_from_steering_takes_vectors_and_norm_scales():
    vectors = {0: torch.tensor([1.0, 0.0]), 2: torch.tensor([0.0, 1.0])}
    steering = SteeringVectors(vectors=vectors, norm_scale={0: 3.0, 2: 5.0})
    intervention = Intervention.from_steering(steering, alpha=0.5, positions="prompt", layers=[2])
    assert list(intervention.vectors) == [2] and intervention.scales == {2: 5.0}
    assert intervention.alpha == 0.5 and intervention.positions == "prompt"
    assert sorted(Intervention.from_steering(steering, 0.1).vectors) == [0, 2]
    with pytest.raises(ValueError, match=r"layers \[1\] have no steering vector"):
        Intervention.from_steering(steering, 0.5, layers=[1])


def test_bad_interventions_are_named():
    decoder = _decoder("llama")
    unit = torch.nn.functional.normalize(torch.ones(decoder.hidden_size), dim=0)
    encoding = decoder.encode(PROMPTS)
    with pytest.raises(ValueError, match="positions must be one of"):
        Intervention({0: unit}, {0: 1.0}, alpha=1.0, positions="first")
    with pytest.raises(ValueError, match="positions must be one of"):
        position_mask(encoding["attention_mask"], None, "first")
    with pytest.raises(ValueError, match="NaN or inf"):
        Intervention({0: torch.full((decoder.hidden_size,), float("nan"))}, {0: 1.0}, 1.0)
    with pytest.raises(ValueError, match="scales for"):
        Intervention({0: unit}, {1: 1.0}, 1.0)
    with pytest.raises(ValueError, match="positive finite"):
        Intervention({0: unit}, {0: float("nan")}, 1.0)
    with pytest.raises(ValueError, match="alpha must be a finite"):
        Intervention({0: unit}, {0: 1.0}, float("inf"))
    out_of_range = Intervention({7: unit}, {7: 1.0}, alpha=1.0)
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        steered_logits(decoder, encoding, out_of_range)
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        steered_generate(decoder, PROMPTS, out_of_range, max_new_tokens=2)
    narrow = Intervention({0: torch.ones(decoder.hidden_size + 1)}, {0: 1.0}, alpha=0.0)
    with pytest.raises(ValueError, match="width 49 but .* hidden size 48"):
        steered_logits(decoder, encoding, narrow)
    with pytest.raises(ValueError, match="num_beams=2 is not supported"):
        steered_generate(decoder, PROMPTS, out_of_range, num_beams=2)
    with pytest.raises(ValueError, match="between 0 and each row"):
        steered_logits(
            decoder,
            encoding,
            Intervention({0: unit}, {0: 1.0}, 1.0, "prompt"),
            torch.full((4,), 99),
        )


def test_generation_and_scoring_agree_on_positions():
    # A forward over prompt + generated ids, steered at the same positions, must predict the
    # tokens the steered generation chose: both views steer the same tokens.
    decoder = _decoder("llama")
    encoding = decoder.encode(PROMPTS)
    width = encoding["input_ids"].shape[1]
    for positions in POSITIONS:
        intervention = _intervention("llama", positions, alpha=2.0)
        ids = steered_generate_ids(decoder, PROMPTS, intervention, NEW_TOKENS)
        assert ids.shape[1] == NEW_TOKENS
        joined = {
            "input_ids": torch.cat([encoding["input_ids"], ids], dim=1),
            "attention_mask": torch.cat([encoding["attention_mask"], torch.ones_like(ids)], 1),
        }
        lengths = encoding["attention_mask"].sum(-1)
        log_probs = steered_logits(decoder, joined, intervention, lengths)
        predicted = log_probs[:, width - 1 : -1].argmax(-1)
        assert torch.equal(predicted, ids), positions


def test_degenerate_logits_under_extreme_steering_raise_instead_of_token_zero():
    # At alpha 1e38 the residual overflows (NaN logits in a real model; here the norm turns the
    # state to zero and every token scores the same): greedy argmax returns token 0 for every
    # row, which a numeric task would score as a wrong answer, not as a broken run.
    decoder = _decoder("llama")
    intervention = _intervention("llama", "all", alpha=1e38)
    with pytest.raises(DegenerateLogitsError, match="alpha 1e"):
        steered_generate_ids(decoder, PROMPTS, intervention, NEW_TOKENS)
    # Ordinary strengths generate as before.
    ids = steered_generate_ids(decoder, PROMPTS, _intervention("llama", "all"), NEW_TOKENS)
    assert ids.shape[0] == len(PROMPTS)
