import pytest
import torch

from expertsteer.errors import UnsupportedArchitectureError
from expertsteer.models.causal_lm import CausalLM, block_hidden, layer_path
from tests.tiny import FAMILIES, byte_tokenizer, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_supported_family_exposes_its_blocks(family):
    model = tiny_model(family)
    decoder = CausalLM(model, byte_tokenizer())
    expected = FAMILIES[family].get("num_hidden_layers", FAMILIES[family].get("n_layer"))
    assert decoder.num_layers == expected
    assert decoder.hidden_size == FAMILIES[family].get(
        "hidden_size", FAMILIES[family].get("n_embd")
    )
    assert len(decoder.hf_blocks()) == expected


def test_unknown_layout_is_a_clear_error():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(
        BertConfig(
            vocab_size=32,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            is_decoder=True,
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'bert'.*supported"):
        layer_path(model)


def test_block_hidden_never_indexes_a_plain_tensor():
    hidden = torch.randn(3, 5, 4)
    assert block_hidden(hidden) is hidden
    assert block_hidden((hidden, None)) is hidden


def test_wrapping_sets_left_padding_and_a_pad_token():
    tokenizer = byte_tokenizer()
    tokenizer.padding_side = "right"
    decoder = CausalLM(tiny_model("llama"), tokenizer)
    assert decoder.tokenizer.padding_side == "left"
    assert decoder.tokenizer.pad_token == "<|eos|>"
    batch = decoder.encode(["a", "abcd"])
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1], [1, 1, 1, 1]]


def test_chat_template_is_applied_when_present():
    with_chat = CausalLM(tiny_model("llama"), byte_tokenizer(chat=True))
    assert with_chat.use_chat_template
    assert with_chat.format(["hi"]) == ["<|bos|><|user|>hi<|eos|><|assistant|>"]
    plain = CausalLM(tiny_model("llama"), byte_tokenizer(chat=False))
    assert plain.format(["hi"]) == ["hi"]
    forced_off = CausalLM(tiny_model("llama"), byte_tokenizer(chat=True), chat_template=False)
    assert forced_off.format(["hi"]) == ["hi"]
    with pytest.raises(ValueError, match="no chat template"):
        CausalLM(tiny_model("llama"), byte_tokenizer(chat=False), chat_template=True)


def test_check_layers_resolves_negatives_and_names_bad_indices():
    decoder = CausalLM(tiny_model("qwen2"), byte_tokenizer())
    assert decoder.check_layers(None) == [0, 1, 2, 3]
    assert decoder.check_layers([-1, 1, 1]) == [1, 3]
    with pytest.raises(ValueError, match="layer 4 does not exist.*0..3"):
        decoder.check_layers([4])
    with pytest.raises(ValueError, match="empty layer list"):
        decoder.check_layers([])


def test_generate_matches_transformers_greedy():
    model = tiny_model("llama")
    decoder = CausalLM(model, byte_tokenizer(chat=True))
    prompts = ["short", "a longer prompt"]
    texts = decoder.generate(prompts, max_new_tokens=6)
    encoding = decoder.encode(prompts)
    reference = model.generate(
        **encoding, max_new_tokens=6, do_sample=False, pad_token_id=decoder.tokenizer.pad_token_id
    )
    width = encoding["input_ids"].shape[1]
    assert texts == decoder.tokenizer.batch_decode(reference[:, width:], skip_special_tokens=True)
