import pytest
import torch

from expertsteer.models.capture import capture, pool
from expertsteer.models.causal_lm import CausalLM, left_pad_positions
from tests.tiny import FAMILIES, byte_tokenizer, tiny_model

PROMPTS = ["The capital of France is", "2 + 2 =", "a", "Steering vectors move hidden states."]
RTOL = 1e-4


def _hooked_states(decoder, prompts):
    """Independent reference: plain torch forward hooks on every block, one forward."""
    captured = {}
    hooks = [
        block.register_forward_hook(
            lambda _m, _i, out, index=index: captured.__setitem__(
                index, out[0] if isinstance(out, tuple) else out
            )
        )
        for index, block in enumerate(decoder.hf_blocks())
    ]
    encoding = decoder.encode(prompts)
    # Each left-padded row counts positions from its first real token.
    positions = left_pad_positions(encoding["attention_mask"])
    try:
        with torch.no_grad():
            outputs = decoder.hf_model(
                **encoding, position_ids=positions, output_hidden_states=True
            )
    finally:
        for hook in hooks:
            hook.remove()
    return captured, outputs.hidden_states, encoding["attention_mask"]


def _assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_last_token_capture_equals_transformers_hidden_states(family):
    decoder = CausalLM(tiny_model(family), byte_tokenizer(chat=True))
    states = capture(decoder, PROMPTS, position="last", batch_size=len(PROMPTS))
    hooked, hidden_states, _ = _hooked_states(decoder, PROMPTS)
    assert sorted(states) == list(range(decoder.num_layers))
    for layer, tensor in states.items():
        assert tensor.shape == (len(PROMPTS), decoder.hidden_size)
        _assert_close(tensor, hooked[layer][:, -1])
        if layer < decoder.num_layers - 1:
            # hidden_states[-1] is after the final norm; block outputs before it.
            _assert_close(tensor, hidden_states[layer + 1][:, -1])


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_mean_capture_averages_real_tokens_only(family):
    decoder = CausalLM(tiny_model(family), byte_tokenizer())
    states = capture(decoder, PROMPTS, layers=[0, 1], position="mean", batch_size=4)
    hooked, _, mask = _hooked_states(decoder, PROMPTS)
    for layer in (0, 1):
        weights = mask.unsqueeze(-1).float()
        expected = (hooked[layer] * weights).sum(1) / weights.sum(1)
        _assert_close(states[layer], expected)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
@pytest.mark.parametrize("position", ["last", "mean"])
def test_padded_batch_equals_one_prompt_runs(family, position):
    # gpt2 has absolute positions: left padding must not shift them.
    decoder = CausalLM(tiny_model(family), byte_tokenizer(chat=True))
    batched = capture(decoder, PROMPTS, position=position, batch_size=len(PROMPTS))
    single = capture(decoder, PROMPTS, position=position, batch_size=1)
    for layer in batched:
        torch.testing.assert_close(batched[layer], single[layer], rtol=1e-5, atol=1e-5)


def test_capture_works_under_inference_mode_and_selected_layers():
    decoder = CausalLM(tiny_model("qwen2"), byte_tokenizer())
    with torch.inference_mode():
        states = capture(decoder, PROMPTS, layers=[-1, 1], batch_size=3)
    assert sorted(states) == [1, 3]
    full = capture(decoder, PROMPTS, batch_size=2)
    torch.testing.assert_close(states[3], full[3])


def test_storage_dtype_is_applied():
    decoder = CausalLM(tiny_model("llama"), byte_tokenizer())
    states = capture(decoder, PROMPTS, layers=[0], dtype=torch.bfloat16)
    assert states[0].dtype == torch.bfloat16


def test_nan_activations_are_refused():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    decoder = CausalLM(model, byte_tokenizer())
    with pytest.raises(FloatingPointError, match="non-finite activations at layer 0"):
        capture(decoder, PROMPTS, layers=[0, 1])


def test_bad_arguments_are_named():
    decoder = CausalLM(tiny_model("llama"), byte_tokenizer())
    with pytest.raises(ValueError, match="position must be one of"):
        capture(decoder, PROMPTS, position="first")
    with pytest.raises(ValueError, match="at least one prompt"):
        capture(decoder, [])
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        capture(decoder, PROMPTS, layers=[7])


def test_pool_last_takes_the_right_edge():
    hidden = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert pool(hidden, mask, "last").flatten().tolist() == [2.0, 5.0]
    assert pool(hidden, mask, "mean").flatten().tolist() == [1.5, 4.0]


def test_completions_are_part_of_the_captured_text():
    decoder = CausalLM(tiny_model("llama"), byte_tokenizer(chat=False), chat_template=False)
    prompts = ["Q: 2 + 3 =", "Q: 2 + 3 =", "Q: 7 - 1 =", "Q: 7 - 1 ="]
    answers = ["The answer is 5.", "The answer is 6.", "The answer is 6.", "The answer is 4."]
    states = capture(decoder, prompts, completions=answers, batch_size=3)
    joined = capture(
        decoder, [p + "\n" + a for p, a in zip(prompts, answers, strict=True)], batch_size=4
    )
    for layer, tensor in states.items():
        _assert_close(tensor, joined[layer])
        # Same prompt, different answers: the last-token states must differ.
        assert (tensor[0] - tensor[1]).abs().max() > 1e-4
