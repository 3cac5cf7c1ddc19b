"""Grid scoring from shared forwards equals one nnsight-steered forward per configuration.

The reference is the evaluation path as it was before sharing: `evaluate.evaluate` per
intervention, which scores through `steering.steered_logits` (nnsight). The shared path
(`evaluate.evaluate_grid` over `branching.grid_log_probs`: prefix keys / values, an unsteered
trunk, branches run by plain forward hooks) must give the same option scores, calibration
biases and calibrated scores to 1e-5 in float32, in every positions mode and score mode.
"""

import pytest
import torch

from expertsteer.data.tasks import Example
from expertsteer.evaluation.branching import PrefixStore, grid_log_probs
from expertsteer.evaluation.evaluate import evaluate, evaluate_grid
from expertsteer.method.steer import POSITIONS, Intervention, steered_logits
from expertsteer.models.causal_lm import CausalLM
from tests.tiny import byte_tokenizer, tiny_model

TOL = 1e-5
INSTRUCTION = "Read the item and answer it."
CHOICE = [
    Example("c0", "Which is a fruit?", ("stone", "apple", "chair"), 1, instruction=INSTRUCTION),
    Example("c1", "Which is a colour?", ("red", "dog", "run", "sky"), 0, instruction=INSTRUCTION),
    Example("c2", "Pick a number.", ("seven", "cat", "tree"), 0, "Count.", INSTRUCTION),
    Example("c3", "Which one swims?", ("fish", "rock"), 0, instruction=INSTRUCTION),
]
LABELS = [
    Example("l0", "Great film.", ("positive", "negative"), 0, instruction=INSTRUCTION),
    Example("l1", "Dull and long.", ("positive", "negative"), 1, instruction=INSTRUCTION),
    Example("l2", "A fine cast.", ("positive", "negative"), 0, instruction=INSTRUCTION),
]
CASES = [
    ("choice", "letter", CHOICE),
    ("choice", "text", CHOICE),
    ("classification", "label", LABELS),
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def decoder(request):
    # gpt2: absolute positions and no chat template.
    chat = request.param != "gpt2"
    return CausalLM(tiny_model(request.param, seed=5), byte_tokenizer(chat=chat))


def _interventions(decoder: CausalLM, positions: str) -> dict:
    """None, then configurations branching at the first, a middle and the last block, one of
    them steering two blocks, one at a negative alpha."""
    generator = torch.Generator().manual_seed(0)
    last = decoder.num_layers - 1
    grid = [((0,), -2.0), ((0,), 0.7), ((last // 2,), 0.7), ((1, last), 0.7), ((last,), -2.0)]
    out: dict = {"none": None}
    for layers, alpha in grid:
        vectors = {layer: torch.randn(decoder.hidden_size, generator=generator) for layer in layers}
        out[(layers, alpha)] = Intervention(vectors, dict.fromkeys(layers, 4.0), alpha, positions)
    return out


def _assert_same(reference, result) -> float:
    worst = 0.0
    for name in ("scores", "bias", "calibrated"):
        expected, actual = getattr(reference, name), getattr(result, name)
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(actual))
        torch.testing.assert_close(actual[finite], expected[finite], rtol=0, atol=TOL)
        worst = max(worst, float((actual[finite] - expected[finite]).abs().max()))
    assert reference.predictions == result.predictions
    return worst


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize(("task_type", "mode", "examples"), CASES)
def test_grid_scores_equal_one_steered_forward_per_configuration(
    decoder, positions, task_type, mode, examples
):
    interventions = _interventions(decoder, positions)
    reference = {
        name: evaluate(decoder, task_type, examples, intervention, mode=mode, batch_size=3)
        for name, intervention in interventions.items()
    }
    steered = reference[((0,), -2.0)].scores
    moved = (steered - reference["none"].scores)[torch.isfinite(steered)]
    if mode == "letter" and positions == "generated" and decoder.use_chat_template:
        # A letter right after the chat template's assistant turn is predicted from the
        # prompt's last position: no generated token to steer (gpt2 joins with a newline).
        assert moved.abs().max() < TOL
    else:
        assert moved.abs().max() > 10 * TOL  # far above the tolerance: the equality means something
    for store, config_batch in ((None, 1), (PrefixStore(), 1), (PrefixStore(), 4)):
        caches: dict = {}
        # Two calls on halves of the items: the second reuses prefixes and calibration biases.
        halves = (examples[:2], examples[2:])
        results = [
            evaluate_grid(
                decoder,
                task_type,
                part,
                interventions,
                mode=mode,
                batch_size=3,
                calibration_caches=caches,
                store=store,
                config_batch=config_batch,
            )
            for part in halves
        ]
        for name, expected in reference.items():
            parts = [result[name] for result in results]
            assert [i for p in parts for i in p.ids] == expected.ids
            for part, start in zip(parts, (0, 2), strict=True):
                rows = slice(start, start + part.n)
                width = part.scores.shape[1]
                sliced = type(expected)(
                    expected.task_type,
                    expected.mode,
                    expected.calibration,
                    expected.normalize,
                    part.ids,
                    part.gold,
                    expected.correct[rows],
                    expected.predictions[rows],
                    scores=expected.scores[rows, :width],
                    calibrated=expected.calibrated[rows, :width],
                    bias=expected.bias[rows, :width],
                )
                _assert_same(sliced, part)
        if store is not None:
            # The chat template and instruction were forwarded as a shared prefix (items with a
            # passage share the chat template only).
            assert store.prefixes and max(len(p) for p in store.prefixes) >= len(INSTRUCTION)


def test_blocks_below_the_branch_run_once_per_batch():
    decoder = CausalLM(tiny_model("qwen2", seed=2), byte_tokenizer(chat=True))
    prompts = ["Say yes: ok", "Say yes: fine"]
    encoding = decoder.encode(prompts, ["yes", "no"])
    rows = [
        ids[mask.bool()].tolist()
        for ids, mask in zip(encoding["input_ids"], encoding["attention_mask"], strict=True)
    ]
    lengths = decoder.encode(prompts)["attention_mask"].sum(-1)
    interventions = [
        Intervention({2: torch.ones(decoder.hidden_size)}, {2: 1.0}, alpha, "all")
        for alpha in (0.1, 0.2, 0.3, -0.5, 1.0)
    ]
    calls = {index: 0 for index in range(decoder.num_layers)}
    handles = [
        block.self_attn.register_forward_hook(
            lambda *_, i=index: calls.__setitem__(i, calls[i] + 1)
        )
        for index, block in enumerate(decoder.hf_blocks())
    ]
    forward_before = decoder.hf_blocks()[0].__dict__.get("forward")
    try:
        got = grid_log_probs(decoder, rows, lengths.tolist(), interventions, keep=3)
    finally:
        for handle in handles:
            handle.remove()
    # Attention runs in blocks 0-2 for the trunk alone (the branches skip them), in block 3
    # once per configuration.
    assert calls == {0: 1, 1: 1, 2: 1, 3: 5}
    # The blocks' own forwards (nnsight's) are back, and an nnsight trace still steers.
    assert decoder.hf_blocks()[0].__dict__.get("forward") is forward_before
    for intervention, log_probs in zip(interventions, got, strict=True):
        expected = steered_logits(decoder, encoding, intervention, lengths)[:, -3:]
        torch.testing.assert_close(log_probs, expected, rtol=0, atol=TOL)


def test_grid_rejects_rows_without_prompt():
    decoder = CausalLM(tiny_model("llama", seed=2), byte_tokenizer(chat=True))
    with pytest.raises(ValueError, match="prompt of at least one token"):
        grid_log_probs(decoder, [[1, 2, 3]], [0], [None], keep=1)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "phi", "gemma2", "gemma3_text"])
def test_grid_log_probs_equal_nnsight_in_every_family(family):
    """Other block layouts (gemma: scaled embeddings, sliding / global layers), every
    positions mode, with and without the prefix, one and several configurations per forward."""
    decoder = CausalLM(tiny_model(family, seed=1), byte_tokenizer(chat=True))
    prompts = ["Answer: is the sky blue today?", "Answer: what is two?", "Answer: hi"]
    encoding = decoder.encode(prompts, ["yes", "no thanks", "B"])
    lengths = decoder.encode(prompts)["attention_mask"].sum(-1)
    rows = [
        ids[mask.bool()].tolist()
        for ids, mask in zip(encoding["input_ids"], encoding["attention_mask"], strict=True)
    ]
    for positions in POSITIONS:
        interventions = [None, *_interventions(decoder, positions).values()]
        expected = [
            steered_logits(decoder, encoding, intervention, lengths)[:, -4:]
            for intervention in interventions
        ]
        for store, config_batch in ((None, 1), (PrefixStore(), 3)):
            got = grid_log_probs(
                decoder, rows, lengths.tolist(), interventions, 4, store, config_batch
            )
            for actual, reference in zip(got, expected, strict=True):
                torch.testing.assert_close(actual, reference, rtol=0, atol=TOL)


def test_a_new_prefix_is_common_to_every_row_and_known_ones_are_reused():
    store = PrefixStore()
    rows = [[1, 2, 3, 4, 5], [1, 2, 9, 9, 9], [1, 2, 3, 4, 7]]
    assert store.choose_prefix(rows, limit=4) == (1, 2)  # row 1 parts at 2, row 2 only at 4
    assert store.choose_prefix([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]], limit=3) == (1, 2)
    assert store.choose_prefix([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]], limit=4) == (1, 2)
    assert store.choose_prefix([[5, 6, 7], [5, 6, 8]], limit=2) == (5, 6)
    assert store.prefixes == [(1, 2), (5, 6)]
    assert store.choose_prefix([[1, 2]], limit=1) == (1,)


@pytest.mark.parametrize("config_batch", [1, 3])
def test_a_token_budget_bounds_every_shared_forward_and_keeps_the_scores(
    decoder, monkeypatch, config_batch
):
    """rows x longest row x stacked configurations <= the budget (or one row alone)."""
    from expertsteer.evaluation import branching

    interventions = _interventions(decoder, "all")
    settings = dict(mode="text", calibration="none", batch_size=16, config_batch=config_batch)
    reference = evaluate_grid(decoder, "choice", CHOICE, interventions, **settings)
    calls = []
    real = branching.grid_log_probs

    def recording(decoder, rows, *args, **kwargs):
        calls.append((len(rows), max(len(r) for r in rows)))
        return real(decoder, rows, *args, **kwargs)

    monkeypatch.setattr(branching, "grid_log_probs", recording)
    budget = 2 * config_batch * 140  # rows of 115-133 tokens: two per forward
    budgeted = evaluate_grid(
        decoder, "choice", CHOICE, interventions, max_tokens=budget, **settings
    )
    for name, expected in reference.items():
        _assert_same(expected, budgeted[name])
    assert sum(rows for rows, _ in calls) == 12, "every (item, option) row scored once"
    assert len(calls) > 1, "without the budget the 12 rows share one forward"
    assert max(rows for rows, _ in calls) > 1, "rows still share forwards within the budget"
    assert all(rows * length * config_batch <= budget or rows == 1 for rows, length in calls)
