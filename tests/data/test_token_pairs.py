"""Token-level pairing across two different tokenizers, and the paired-state capture."""

from __future__ import annotations

import pytest
import torch

from expertsteer.data.activations import CacheMismatchError, ModelKey
from expertsteer.data.token_pairs import (
    CorpusConfig,
    PairText,
    TokenPairError,
    capture_positions,
    ensure_token_pairs,
    heldout_texts,
    load_token_pairs,
    pair_texts,
    paired_positions,
    read_token_meta,
    segment_spans,
    tokenize_texts,
)
from expertsteer.models.causal_lm import CausalLM
from tests.tiny import byte_tokenizer, tiny_model

# "the" is one token for the merged tokenizer, three for the byte tokenizer; " weather" is
# split as " w" + "e" + "a" + "th" + "e" + "r" by the merged one.
MERGES = [("t", "h"), ("th", "e"), ("Ġ", "w")]


def _decoder(family: str, chat: bool, merges=None, seed: int = 0) -> CausalLM:
    tokenizer = byte_tokenizer(chat, merges)
    tokenizer.pad_token = "<|pad|>"
    model = tiny_model(family, seed)
    model.resize_token_embeddings(len(tokenizer))  # room for the merged tokens
    return CausalLM(model, tokenizer, chat_template=chat, name=family)


def _ends(tokenizer, text: str) -> list[int]:
    return [end for _, end in tokenizer(text, return_offsets_mapping=True)["offset_mapping"]]


def test_positions_pair_where_token_ends_coincide():
    text = "the weather"
    merged, plain = byte_tokenizer(merges=MERGES), byte_tokenizer()
    offsets_a = merged(text, return_offsets_mapping=True)["offset_mapping"]
    offsets_b = plain(text, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets_a) < len(offsets_b)  # the tokenizations really differ
    pairs = paired_positions(offsets_a, [(0, len(text))], offsets_b, [(0, len(text))])
    ends_a, ends_b = _ends(merged, text), _ends(plain, text)
    # Every merged token ends at a byte boundary, so each pairs with exactly one byte token.
    assert [ends_a[a] for a, _ in pairs] == [ends_b[b] for _, b in pairs]
    assert [ends_a[a] for a, _ in pairs] == sorted(set(ends_a))
    # "the" (merged) ends at 3, where the byte tokenizer's "e" ends; " w" ends at 5.
    assert (0, 2) in pairs and (1, 4) in pairs
    # byte positions inside a merged token ("t", "h" of "the") have no partner
    assert {b for _, b in pairs}.isdisjoint({0, 1, 3})


def test_first_positions_can_be_skipped():
    plain = byte_tokenizer()
    texts = [PairText("a", ("the weather",), False)]
    decoder = _decoder("llama", chat=False)
    tokenized = tokenize_texts(decoder, texts, 64)
    assert pair_texts(tokenized, tokenized)[0][0] == (0, 0)
    assert pair_texts(tokenized, tokenized, skip_first=1)[0][0] == (1, 1)
    assert len(_ends(plain, "the weather")) == len(pair_texts(tokenized, tokenized)[0])


def test_segments_pair_relative_to_their_start_in_each_template():
    prompt, completion = "the weather", "sunny"
    formatted_a = f"<x>{prompt}<y>{completion}"
    formatted_b = f"[user] {prompt} [bot]{completion}"
    spans_a = segment_spans(formatted_a, (prompt, completion))
    spans_b = segment_spans(formatted_b, (prompt, completion))
    assert spans_a == [(3, 14), (17, 22)] and spans_b == [(7, 18), (24, 29)]
    char = [(k, k + 1) for k in range(len(formatted_a))]
    char_b = [(k, k + 1) for k in range(len(formatted_b))]
    pairs = paired_positions(char, spans_a, char_b, spans_b)
    assert len(pairs) == len(prompt) + len(completion)
    assert all(formatted_a[a] == formatted_b[b] for a, b in pairs)
    assert segment_spans("rewritten", (prompt,)) is None


def test_zero_width_tokens_never_pair():
    offsets = [(0, 0), (0, 1), (1, 2), (2, 2)]
    assert paired_positions(offsets, [(0, 2)], offsets, [(0, 2)]) == [(1, 1), (2, 2)]


def test_tokenize_and_pair_steer_items_across_chat_templates():
    expert = _decoder("qwen2", chat=True, merges=MERGES)
    target = _decoder("llama", chat=False)
    texts = [
        PairText("a", ("the weather today",), formatted=False),
        PairText("s", ("is the weather nice?", "yes"), formatted=True),
        PairText("c", ("a prompt-only concept text",), formatted=True),
    ]
    tok_e, tok_t = tokenize_texts(expert, texts, 64), tokenize_texts(target, texts, 64)
    pairs = pair_texts(tok_e, tok_t)
    for k, text in enumerate(texts):
        strings = (
            [
                decoder.format([text.segments[0]], list(text.segments[1:]) or None)[0]
                for decoder in (expert, target)
            ]
            if text.formatted
            else [text.segments[0]] * 2
        )
        for a, b in pairs[k]:
            end_a, end_b = tok_e.offsets[k][a][1], tok_t.offsets[k][b][1]
            (lo_a, _), (lo_b, _) = (
                next(span for span in spans if span[0] < end <= span[1])
                for spans, end in ((tok_e.spans[k], end_a), (tok_t.spans[k], end_b))
            )
            # the same text of the same shared segment lies before both tokens' ends
            assert strings[0][lo_a:end_a] == strings[1][lo_b:end_b]
        # the byte-level side ends a token at every character, so every expert token that
        # ends inside a shared segment finds its partner
        inside = [
            (start, end)
            for start, end in tok_e.offsets[k]
            if end > start and any(lo < end <= hi for lo, hi in tok_e.spans[k])
        ]
        assert len(pairs[k]) == len(inside) > 0

    # the last token of the completion (the steering state) pairs
    assert pairs[1][-1] == (len(tok_e.input_ids[1]) - 1, len(tok_t.input_ids[1]) - 1)
    assert len(pairs[2]) > 10  # a prompt-only item pairs inside its prompt


def test_capture_positions_equals_unpadded_forward():
    decoder = _decoder("llama", chat=False)
    ids = [[5, 6, 7, 8, 9], [10, 11, 12]]
    positions = [[1, 4], [0, 2]]
    states = capture_positions(decoder, ids, positions, [0, 1])
    assert states.shape == (4, 2, decoder.hidden_size)
    row = 0
    for seq, wanted in zip(ids, positions, strict=True):
        with torch.no_grad():
            out = decoder.hf_model(torch.tensor([seq]), output_hidden_states=True)
        for q in wanted:
            for k, layer in enumerate([0, 1]):  # hidden_states of the last block is after the norm
                torch.testing.assert_close(
                    states[row, k], out.hidden_states[layer + 1][0, q], atol=1e-4, rtol=1e-4
                )
            row += 1


def _pair_models():
    """A tiny expert / target pair with different tokenizers, and their cache keys."""
    decoders = {
        "expert": _decoder("qwen2", chat=True, merges=MERGES, seed=1),
        "target": _decoder("llama", chat=False, seed=2),
    }
    keys = {
        side: ModelKey(side, "sha", tuple(range(decoders[side].num_layers)), None)
        for side in decoders
    }
    return decoders, keys


def test_capture_is_cached_resumable_and_sourced(tmp_path):
    decoders, keys = _pair_models()
    texts = [PairText(f"t{k}", (f"the weather on day {k}",), False) for k in range(5)]
    texts.append(PairText("s", ("is the weather nice?", "yes"), True))
    config = CorpusConfig(size=5, shard_texts=2)
    calls = []

    def load():
        calls.append(1)
        return decoders

    directory = ensure_token_pairs(tmp_path, keys, texts, config, "float32", load)
    meta = read_token_meta(directory)
    data = load_token_pairs(directory, meta)
    assert data["expert"].shape[0] == data["target"].shape[0] == meta["positions"] > 0
    assert data["source"][-1] == 1 and data["source"][0] == 0
    assert data["text"].tolist() == sorted(data["text"].tolist())
    # a lost shard is captured again, the rest is reused
    (directory / "meta.json").unlink()
    (directory / "pairs-00001.safetensors").unlink()
    ensure_token_pairs(tmp_path, keys, texts, config, "float32", load)
    again = load_token_pairs(directory, read_token_meta(directory))
    assert torch.equal(again["expert"], data["expert"])
    assert len(calls) == 2
    ensure_token_pairs(tmp_path, keys, texts, config, "float32", load)
    assert len(calls) == 2
    # same-size corruption of a shard is caught by its checksum
    shard = directory / "pairs-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheMismatchError, match="sha256"):
        load_token_pairs(directory, read_token_meta(directory))


def test_heldout_whole_texts_and_config_errors():
    ids = [f"c:{k}" for k in range(10)]
    mask = heldout_texts(ids, 0.2, seed=3)
    assert mask.sum() == 2 and torch.equal(mask, heldout_texts(ids, 0.2, seed=3))
    steer = [f"steer:{k}{sign}" for k in range(6) for sign in "+-"]
    mask = heldout_texts(steer, 0.5)
    assert mask.sum() == 6 and torch.equal(mask[0::2], mask[1::2])  # twins held out together
    with pytest.raises(TokenPairError, match="nothing to fit"):
        heldout_texts(["a"], 0.5)
    with pytest.raises(ValueError, match="corpus.heldout"):
        CorpusConfig(heldout=1.0)
    with pytest.raises(ValueError, match="corpus is empty"):
        CorpusConfig(size=0, steer_items=False)


def test_length_sorted_batches_keep_text_order(tmp_path):
    decoders, keys = _pair_models()
    texts = [PairText(f"t{k}", ("the weather " * (1 + (7 * k) % 5),), False) for k in range(7)]
    config = CorpusConfig(size=7, shard_texts=7)
    one = ensure_token_pairs(tmp_path / "a", keys, texts, config, "float32", lambda: decoders, 1)
    many = ensure_token_pairs(tmp_path / "b", keys, texts, config, "float32", lambda: decoders, 3)
    a = load_token_pairs(one, read_token_meta(one))
    b = load_token_pairs(many, read_token_meta(many))
    assert torch.equal(a["text"], b["text"])
    torch.testing.assert_close(a["expert"], b["expert"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a["target"], b["target"], atol=1e-4, rtol=1e-4)
