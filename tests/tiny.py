"""Tiny random causal LMs built from configs, and an in-process byte-level tokenizer.

Nothing here touches the network: the tokenizer's vocabulary is the 256 byte symbols plus a
few special tokens, and models are built with `AutoModelForCausalLM.from_config`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB_SIZE = 256 + len(SPECIALS)

# Two families per default-tier test run with different hidden sizes (expert wider than target).
FAMILIES: dict[str, dict] = {
    "llama": dict(
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
    ),
    "qwen2": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    ),
    "qwen3": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        head_dim=8,
    ),
    "mistral": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
    ),
    "phi": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "gemma2": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        head_dim=8,
    ),
    "gemma3_text": dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        head_dim=8,
    ),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4),
}


def byte_tokenizer(
    chat: bool = False, merges: list[tuple[str, str]] | None = None
) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer: every UTF-8 byte is one token, unless `merges` (pairs of
    byte-level symbols, e.g. ("t", "h"), then ("th", "e")) join some into longer tokens."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in SPECIALS:
        vocab[token] = len(vocab)
    for left, right in merges or []:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges or [])))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    backend.post_processor = None
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A random causal LM of `family` with the byte tokenizer's vocabulary."""
    size = dict(FAMILIES[family])
    ids = dict(bos_token_id=VOCAB_SIZE - 4, eos_token_id=VOCAB_SIZE - 3, pad_token_id=None)
    if family == "gpt2":
        config = AutoConfig.for_model(family, vocab_size=VOCAB_SIZE, n_positions=256, **size, **ids)
    else:
        config = AutoConfig.for_model(
            family, vocab_size=VOCAB_SIZE, max_position_embeddings=256, **size, **ids
        )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save_tiny(
    directory: Path,
    family: str,
    chat: bool = True,
    seed: int = 0,
    model: torch.nn.Module | None = None,
) -> Path:
    """Save a tiny model (or `model`) + tokenizer as a local model directory; return it."""
    (model or tiny_model(family, seed)).save_pretrained(directory)
    tokenizer = byte_tokenizer(chat)
    # An explicit pad token: otherwise AutoTokenizer may pick the family's default class,
    # whose default pad token is not in this vocabulary.
    tokenizer.pad_token = "<|pad|>"
    tokenizer.save_pretrained(directory)
    return directory


def tiny_pair(root: Path) -> dict[str, Path]:
    """An expert (qwen2, 64-d x 4 blocks, chat template) and a target (llama, 48-d x 3 blocks,
    no template) saved under `root`: different families, widths and depths."""
    return {
        "expert": save_tiny(root / "expert", "qwen2", chat=True, seed=1),
        "target": save_tiny(root / "target", "llama", chat=False, seed=2),
    }
