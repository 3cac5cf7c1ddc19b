"""Steering a plain transformers model by forward hooks (`SteeringVectors.apply`): the same
logits and tokens as the nnsight path, every generation mode, padding, and clean removal."""

import pytest
import torch

from expertsteer.errors import UnsupportedArchitectureError
from expertsteer.method.hooks import find_blocks, token_weights
from expertsteer.method.steer import Intervention, steered_generate_ids, steered_logits
from expertsteer.method.vectors import SteeringVectors
from expertsteer.models.causal_lm import CausalLM, block_hidden, left_pad_positions
from tests.tiny import byte_tokenizer, tiny_model

PROMPTS = ["The weather today is", "Hi", "A much longer prompt than the other two, padded less"]
ALPHA = 3.0


def _decoder(family: str, chat: bool = False) -> CausalLM:
    return CausalLM(tiny_model(family, seed=3), byte_tokenizer(chat=chat), name=family)


def _vectors(decoder: CausalLM, layers: list[int], seed: int = 0) -> SteeringVectors:
    generator = torch.Generator().manual_seed(seed)
    vectors = {}
    for layer in layers:
        v = torch.randn(decoder.hidden_size, generator=generator)
        vectors[layer] = v / v.norm()
    return SteeringVectors(vectors, dict.fromkeys(layers, 2.0), metadata={"method": "test"})


def _plain_log_probs(decoder: CausalLM, encoding: dict) -> torch.Tensor:
    mask = encoding["attention_mask"]
    with torch.inference_mode():
        logits = decoder.hf_model(**encoding, position_ids=left_pad_positions(mask)).logits
    return torch.log_softmax(logits.float(), dim=-1)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def decoder(request):
    return _decoder(request.param, chat=request.param == "qwen2")


@pytest.mark.parametrize("positions", ["all", "prompt", "last_prompt"])
def test_hooks_give_the_nnsight_paths_steered_logits(decoder, positions):
    steering = _vectors(decoder, [0, decoder.num_layers - 1])
    encoding = decoder.encode(PROMPTS)
    mask = encoding["attention_mask"].bool()
    intervention = Intervention.from_steering(steering, ALPHA, positions)
    reference = steered_logits(decoder, encoding, intervention)
    with steering.apply(decoder.hf_model, alpha=ALPHA, positions=positions):
        hooked = _plain_log_probs(decoder, encoding)
    unsteered = _plain_log_probs(decoder, encoding)
    torch.testing.assert_close(hooked[mask], reference[mask], atol=1e-5, rtol=1e-5)
    assert (hooked[mask] - unsteered[mask]).abs().max() > 1e-2, "the steering changed nothing"


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "last_prompt"])
def test_hooked_greedy_generation_equals_the_nnsight_generation(decoder, positions):
    steering = _vectors(decoder, [1])
    intervention = Intervention.from_steering(steering, ALPHA, positions)
    reference = steered_generate_ids(decoder, PROMPTS, intervention, max_new_tokens=6)
    encoding = decoder.encode(PROMPTS)
    width = encoding["input_ids"].shape[1]
    pad = decoder.tokenizer.pad_token_id
    with steering.apply(decoder.hf_model, alpha=ALPHA, positions=positions):
        ids = decoder.hf_model.generate(
            **encoding, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=pad
        )
    assert torch.equal(ids[:, width:], reference)


def test_hooks_are_removed_on_exit_and_after_an_exception(decoder):
    model = decoder.hf_model
    before = _hook_count(model)
    encoding = decoder.encode(PROMPTS)
    plain = _plain_log_probs(decoder, encoding)
    steering = _vectors(decoder, [0, 1])
    with steering.apply(model, alpha=ALPHA):
        assert _hook_count(model) == before + 3  # two blocks and the model's pre-hook
    assert _hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"), steering.apply(model, alpha=ALPHA):
        raise RuntimeError("boom")
    assert _hook_count(model) == before
    torch.testing.assert_close(_plain_log_probs(decoder, encoding), plain, atol=0, rtol=0)


def _reference_generate(decoder, encoding, added: dict[int, torch.Tensor], decode_only: bool, **kw):
    """generate with naive hooks written here: add to every token (pads included, which no real
    token attends to), or with `decode_only` only in one-token forwards."""

    def hook(vector):
        def add(module, args, output):
            hidden = block_hidden(output)
            if decode_only and hidden.shape[1] != 1:
                return output
            return hidden + vector

        return add

    blocks = decoder.hf_blocks()
    handles = [blocks[layer].register_forward_hook(hook(v)) for layer, v in added.items()]
    try:
        return decoder.hf_model.generate(
            **encoding, pad_token_id=decoder.tokenizer.pad_token_id, **kw
        )
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=3, num_return_sequences=2, do_sample=False),
        dict(do_sample=True, top_k=20, num_return_sequences=2),
    ],
    ids=["beams", "sampling"],
)
@pytest.mark.parametrize("positions", ["all", "generated"])
def test_beam_search_and_sampling_are_steered_per_returned_sequence(decoder, settings, positions):
    steering = _vectors(decoder, [1])
    encoding = decoder.encode(PROMPTS)
    added = steering.additions(ALPHA, [1], torch.float32, "cpu")
    kw = dict(max_new_tokens=5, min_new_tokens=5, **settings)
    torch.manual_seed(7)
    reference = _reference_generate(decoder, encoding, added, positions == "generated", **kw)
    torch.manual_seed(7)
    with steering.apply(decoder.hf_model, alpha=ALPHA, positions=positions):
        ids = decoder.hf_model.generate(
            **encoding, pad_token_id=decoder.tokenizer.pad_token_id, **kw
        )
    torch.manual_seed(7)
    plain = decoder.hf_model.generate(**encoding, pad_token_id=decoder.tokenizer.pad_token_id, **kw)
    assert ids.shape[0] == 2 * len(PROMPTS)
    assert torch.equal(ids, reference)
    assert not torch.equal(ids, plain), "the steering changed no token"


def test_left_padded_prompts_are_steered_at_their_real_tokens_only(decoder):
    """positions='prompt' on a left-padded batch: block j's output moves by exactly the
    addition at real tokens and not at all at pads, and each row's logits equal the row's own
    unpadded steered forward."""
    layer = 1
    steering = _vectors(decoder, [layer])
    encoding = decoder.encode(PROMPTS)
    mask = encoding["attention_mask"].bool()
    assert not mask.all(), "the batch must be padded"
    outputs = []

    def keep(module, args, output):
        outputs.append(block_hidden(output).detach().clone())

    block = decoder.hf_blocks()[layer]
    handle = block.register_forward_hook(keep)
    try:
        _plain_log_probs(decoder, encoding)
    finally:
        handle.remove()
    with steering.apply(decoder.hf_model, alpha=ALPHA, positions="prompt"):
        handle = block.register_forward_hook(keep)  # after the steering hook: sees its output
        try:
            steered = _plain_log_probs(decoder, encoding)
        finally:
            handle.remove()
    plain_states, steered_states = outputs
    added = steering.additions(ALPHA, [layer], torch.float32, "cpu")[layer]
    moved = steered_states - plain_states
    torch.testing.assert_close(moved[mask], added.expand(int(mask.sum()), -1), atol=1e-5, rtol=0)
    assert moved[~mask].abs().max() == 0
    for row, prompt in enumerate(PROMPTS):
        alone = decoder.encode([prompt])
        with steering.apply(decoder.hf_model, alpha=ALPHA, positions="prompt"):
            single = _plain_log_probs(decoder, alone)[0]
        torch.testing.assert_close(steered[row][mask[row]], single, atol=1e-4, rtol=1e-4)


def test_token_weights_per_forward():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert token_weights(mask, 2, 3, False, "all").tolist() == mask.bool().tolist()
    assert token_weights(mask, 2, 3, False, "last_prompt").tolist() == [
        [False, False, True],
        [False, False, True],
    ]
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert token_weights(right, 2, 3, False, "last_prompt").tolist() == [
        [False, True, False],
        [False, False, True],
    ]
    assert not token_weights(mask, 2, 3, False, "generated").any()
    grown = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # a decode step: one new column
    assert token_weights(grown, 2, 1, True, "generated").all()
    assert not token_weights(grown, 2, 1, True, "prompt").any()
    assert token_weights(None, 2, 1, True, "all").all()


def test_blocks_are_found_generically_and_errors_name_the_fix():
    model = tiny_model("llama")
    assert find_blocks(model) is model.model.layers
    model.config.model_type = "some_new_family"  # no table entry: found by its length
    assert find_blocks(model) is model.model.layers
    model.config.num_hidden_layers = 99
    with pytest.raises(UnsupportedArchitectureError, match="LAYER_PATHS"):
        find_blocks(model)


def test_apply_checks_width_layers_and_alpha():
    decoder = _decoder("llama")
    steering = _vectors(decoder, [1])
    with pytest.raises(ValueError, match="hidden size"):
        SteeringVectors({1: torch.ones(7)}, {1: 1.0}).apply(decoder.hf_model, alpha=1.0)
    too_deep = SteeringVectors({9: torch.ones(decoder.hidden_size)}, {9: 1.0})
    with pytest.raises(ValueError, match="decoder blocks"):
        too_deep.apply(decoder.hf_model, alpha=1.0)
    with pytest.raises(ValueError, match="finite"):
        steering.apply(decoder.hf_model, alpha=float("nan"))
    with pytest.raises(ValueError, match="positions"):
        steering.apply(decoder.hf_model, alpha=1.0, positions="middle")


def test_calling_the_base_model_directly_is_steered_by_its_own_mask(decoder):
    """The hooks read the mask where the blocks live, so `model.model(...)` (no LM head) is
    steered like the full model: every real token moves, no pad does."""
    steering = _vectors(decoder, [0])
    encoding = decoder.encode(PROMPTS)
    mask = encoding["attention_mask"].bool()
    base = next(m for m in decoder.hf_model.modules() if decoder.hf_blocks() in m.children())
    position_ids = left_pad_positions(encoding["attention_mask"])
    with torch.inference_mode():
        plain = base(**encoding, position_ids=position_ids).last_hidden_state
        with steering.apply(decoder.hf_model, alpha=ALPHA, positions="prompt"):
            steered = base(**encoding, position_ids=position_ids).last_hidden_state
    moved = (steered - plain).abs().amax(-1)
    assert (moved[mask] > 1e-3).all()
    assert moved[~mask].max() == 0
