"""Fixtures shared by the option-scoring and evaluation tests."""

import pytest

from expertsteer.models.causal_lm import CausalLM
from tests.tiny import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def chat_decoder():
    return CausalLM(tiny_model("llama", seed=3), byte_tokenizer(chat=True))
