"""Real packaged models: conversion, cached reload, chat answers, capture parity."""

import pytest
import torch

from expertsteer.models.capture import capture
from expertsteer.models.causal_lm import left_pad_positions
from expertsteer.models.zoo import PACKAGED, load_model

pytestmark = pytest.mark.slow

PROMPTS = ["The Eiffel Tower is in the city of", "def add(a, b):\n    return", "Hello"]


def _logits(model, tokenizer):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoding = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    positions = left_pad_positions(encoding["attention_mask"])
    with torch.no_grad():
        return model(**encoding, position_ids=positions).logits


def test_greedy_chat_answer_names_paris(packaged):
    answer = packaged.generate(["What is the capital of France?"], max_new_tokens=24)[0]
    assert "Paris" in answer, answer


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_cached_reload_equals_direct_gguf_load(name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = PACKAGED[name].locate(tmp_path)
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    expected = _logits(direct, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    del direct
    cached = load_model(name)
    assert cached.weights_sha256 == PACKAGED[name].gguf_sha256
    torch.testing.assert_close(_logits(cached.model, cached.tokenizer), expected)


def test_gguf_file_path_loads_like_the_packaged_name(tmp_path):
    spec = PACKAGED["smollm2-135m-instruct"]
    by_path = load_model(str(spec.locate(tmp_path)))
    by_name = load_model(spec.name)
    assert by_path.weights_sha256 == spec.gguf_sha256
    torch.testing.assert_close(
        _logits(by_path.model, by_path.tokenizer), _logits(by_name.model, by_name.tokenizer)
    )


def test_capture_matches_output_hidden_states(any_packaged):
    packaged = any_packaged
    states = capture(packaged, PROMPTS, position="last", batch_size=2)
    encoding = packaged.encode(PROMPTS)
    positions = left_pad_positions(encoding["attention_mask"])
    with torch.no_grad():
        hidden = packaged.hf_model(
            **encoding, position_ids=positions, output_hidden_states=True
        ).hidden_states
    for layer in range(packaged.num_layers - 1):
        expected = hidden[layer + 1][:, -1]
        torch.testing.assert_close(
            states[layer], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()
        )


def test_token_pairs_on_the_packaged_pair(decoders):
    """Qwen and SmolLM2 tokenize differently; pairs still cover most word ends, and the last
    token of a chat-formatted steering item (its RFM state) always pairs."""
    from expertsteer.data.token_pairs import PairText, pair_texts, tokenize_texts

    expert, target = decoders("qwen2.5-coder-0.5b-instruct"), decoders("smollm2-135m-instruct")
    texts = [
        PairText("raw", ("The quick brown fox jumps over the lazy dog near Zürich.",), False),
        PairText(
            "item", ("Is this review positive?\nA gripping, unhurried film.", "positive"), True
        ),
    ]
    tok_e, tok_t = tokenize_texts(expert, texts, 96), tokenize_texts(target, texts, 96)
    pairs = pair_texts(tok_e, tok_t, skip_first=1)
    words = len(texts[0].segments[0].split())
    assert len(pairs[0]) >= words - 2, pairs[0]
    assert pairs[1][-1] == (len(tok_e.input_ids[1]) - 1, len(tok_t.input_ids[1]) - 1)
    for k, (a, b) in enumerate(pairs[0]):
        assert tok_e.offsets[0][a][1] == tok_t.offsets[0][b][1], k
