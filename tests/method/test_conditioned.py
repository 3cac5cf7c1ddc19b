"""Input-dependent steering: the reading's coefficients against a float64 reference, the
shuffled control's permutations, and per-row interventions against the fixed-vector path."""

import pytest
import torch

from expertsteer.data.tasks import Example
from expertsteer.evaluation.evaluate import evaluate, evaluate_grid
from expertsteer.evaluation.options import score_options
from expertsteer.method.conditioned import (
    Reading,
    best_block,
    fit_reading,
    load_reading,
    reader_block_accuracies,
    save_reading,
    shuffled_orders,
    stratified_folds,
)
from expertsteer.method.steer import Intervention, steered_generate, steered_logits
from expertsteer.models.causal_lm import CausalLM
from tests.tiny import byte_tokenizer, tiny_model

ATOL = 1e-5


def _two_classes(n: int = 200, d: int = 6, seed: int = 0):
    """States whose class-1 mean sits at +3 and class-0 mean at -1 along a known unit
    direction u (so m = 1, s = 2), with noise orthogonal to u."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.zeros(d, dtype=torch.float64)
    u[2] = 1.0
    y = torch.arange(n) % 2
    noise = torch.randn(n, d, generator=generator, dtype=torch.float64)
    noise[:, 2] = 0.0
    x = noise + torch.where(y == 1, 3.0, -1.0)[:, None] * u
    return x, y, u


def test_two_class_coefficients_follow_the_known_direction_midpoint_and_clip():
    x, y, u = _two_classes()
    reading = fit_reading(x, y, classes=2)
    # Mean difference of noise that sums to ~0 along u: the read-out is u itself.
    direction = reading.weight[0] / reading.weight[0].norm()
    assert float(direction @ u) > 0.95
    projections = x @ reading.weight[0]
    high, low = projections[y == 1].mean(), projections[y == 0].mean()
    assert reading.midpoint == pytest.approx(float(high + low) / 2)
    assert reading.half == pytest.approx(float(high - low) / 2)
    # New inputs at known positions along u (the reference: float64 arithmetic by hand).
    along = torch.tensor([-5.0, -1.0, 1.0, 2.0, 3.0, 9.0], dtype=torch.float64)
    states = along[:, None] * u
    scale = float(reading.weight[0] @ u)
    expected = ((along * scale - reading.midpoint) / reading.half).clamp(-1.5, 1.5)
    got = reading.coefficients(reading.scores(states), c_max=1.5)
    torch.testing.assert_close(got[:, 0], expected)
    assert got.abs().max() == pytest.approx(1.5)  # clipped at c_max on both sides
    assert reading.predict(reading.scores(states)).tolist() == [0, 0, 0, 1, 1, 1]
    # The class means read as -1 and +1 (before the clip).
    means = reading.coefficients(torch.stack([high, low])[:, None], c_max=10.0)[:, 0]
    torch.testing.assert_close(means, torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="c_max"):
        reading.coefficients(reading.scores(states), c_max=0.0)


def test_many_classes_read_by_a_probe_whose_push_has_zero_steer_mean(tmp_path):
    generator = torch.Generator().manual_seed(1)
    centres = 4.0 * torch.eye(3, 5, dtype=torch.float64)
    y = torch.arange(150) % 3
    x = centres[y] + 0.5 * torch.randn(150, 5, generator=generator, dtype=torch.float64)
    reading = fit_reading(x, y, classes=3)
    assert reading.classes == 3
    assert float((reading.predict(reading.scores(x)) == y).double().mean()) > 0.95
    coefficients = reading.coefficients(reading.steer_scores, c_max=1.0)
    # Probability-weighted push minus its steer-split mean: zero on average, zero reference.
    torch.testing.assert_close(coefficients.mean(0), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(reading.reference(1.0), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(coefficients.sum(-1), torch.zeros(150, dtype=torch.float64), atol=1e-9)
    saved = load_reading(save_reading(tmp_path / "reader.safetensors", reading))
    torch.testing.assert_close(saved.scores(x), reading.scores(x))
    # Coefficients lie in [-1, 1]: every clip bound >= 1 gives the same push, so the dev grid
    # scores one of them; a bound below 1 does clip.
    scores = reading.scores(x)
    torch.testing.assert_close(reading.coefficients(scores, 1.0), reading.coefficients(scores, 5.0))
    assert reading.coefficients(scores, 0.25).abs().max() == pytest.approx(0.25)
    assert reading.distinct_bounds([2.0, 0.5, 1.0]) == [0.5, 1.0]
    assert reading.distinct_bounds([2.0, 3.0]) == [2.0]
    two = fit_reading(*_two_classes()[:2], classes=2)
    assert two.distinct_bounds([2.0, 1.0]) == [2.0, 1.0]
    with pytest.raises(ValueError, match="class"):
        fit_reading(x[y != 2], y[y != 2], classes=3)


def test_shuffling_keeps_the_coefficients_and_breaks_their_link_to_the_input():
    x, y, _ = _two_classes(n=60)
    x = x + 0.3 * torch.randn(60, 6, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
    reading = fit_reading(x, y, classes=2)
    coefficients = reading.coefficients(reading.scores(x), c_max=2.0)[:, 0]
    orders = shuffled_orders(60, 5, seed=3)
    again = shuffled_orders(60, 5, seed=3)  # seeded alone: the same on every rank
    assert all(torch.equal(a, b) for a, b in zip(orders, again, strict=True))
    for order in orders:
        shuffled = coefficients[order]
        assert torch.equal(shuffled.sort().values, coefficients.sort().values)
        assert not torch.equal(shuffled, coefficients)
    assert len({tuple(order.tolist()) for order in orders}) == 5


def _decoder() -> CausalLM:
    return CausalLM(tiny_model("llama", seed=3), byte_tokenizer(chat=True))


def _fixed(vector: torch.Tensor, alpha: float) -> Intervention:
    return Intervention({1: vector}, {1: 2.0}, alpha=alpha, positions="all")


def _conditioned(vector, alpha, coefficients, reference=None) -> Intervention:
    return Intervention(
        {1: vector[None]},
        {1: 2.0},
        alpha=alpha,
        positions="all",
        coefficients=coefficients,
        reference=reference,
    )


def test_per_row_coefficients_steer_each_row_like_its_own_fixed_vector():
    decoder = _decoder()
    vector = torch.nn.functional.normalize(
        torch.randn(48, generator=torch.Generator().manual_seed(0)), dim=0
    )
    prompts = ["good film", "a rather dull and slow film", "ok"]
    coefficients = torch.tensor([[1.5], [-0.5], [0.0]], dtype=torch.float64)
    encoding = decoder.encode(prompts)
    together = steered_logits(decoder, encoding, _conditioned(vector, 0.7, coefficients))
    for row, prompt in enumerate(prompts):
        alone = decoder.encode([prompt])
        fixed = steered_logits(decoder, alone, _fixed(vector, 0.7 * float(coefficients[row, 0])))
        torch.testing.assert_close(together[row, -1], fixed[0, -1], atol=ATOL, rtol=0)
    # Generation steers each row by its own coefficient too.
    texts = steered_generate(decoder, prompts, _conditioned(vector, 3.0, coefficients), 4)
    for row, prompt in enumerate(prompts):
        fixed = _fixed(vector, 3.0 * float(coefficients[row, 0]))
        assert texts[row] == steered_generate(decoder, [prompt], fixed, 4)[0]
    with pytest.raises(ValueError, match="for_rows"):
        steered_logits(decoder, encoding, _conditioned(vector, 0.7, coefficients[:2]))


def _examples() -> list[Example]:
    texts = ["good film", "dull plot", "warm and witty", "slow", "sharp", "bleak and odd"]
    return [
        Example(f"r{i}", text, ("bad", "good"), i % 2, instruction="Rate this review.")
        for i, text in enumerate(texts)
    ]


@pytest.mark.parametrize("share_forwards", [True, False])
def test_a_constant_coefficient_scores_like_the_fixed_vector_at_that_alpha(share_forwards):
    decoder = _decoder()
    vector = torch.nn.functional.normalize(
        torch.randn(48, generator=torch.Generator().manual_seed(1)), dim=0
    )
    examples = _examples()
    k = torch.full((len(examples), 1), 1.5, dtype=torch.float64)
    conditioned = _conditioned(vector, 0.6, k, reference=torch.tensor([1.5], dtype=torch.float64))
    fixed = _fixed(vector, 0.6 * 1.5)
    if share_forwards:
        results = evaluate_grid(
            decoder, "classification", examples, {"c": conditioned, "f": fixed}, batch_size=4
        )
        got, want = results["c"], results["f"]
    else:
        got = evaluate(decoder, "classification", examples, conditioned, batch_size=4)
        want = evaluate(decoder, "classification", examples, fixed, batch_size=4)
    torch.testing.assert_close(got.calibrated, want.calibrated, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.bias, want.bias, atol=ATOL, rtol=0)
    assert got.predictions == want.predictions
    # Rows are scored in length order: each item keeps its own coefficient.
    varied = torch.tensor([[float(i) - 2.5] for i in range(len(examples))], dtype=torch.float64)
    options = [list(e.choices) for e in examples]
    prompts = [e.question for e in examples]
    scores = score_options(decoder, prompts, options, _conditioned(vector, 0.6, varied), 4)
    for n in (0, 5):
        alone = score_options(
            decoder, [prompts[n]], [options[n]], _fixed(vector, 0.6 * float(varied[n, 0])), 4
        )
        torch.testing.assert_close(scores.total[n], alone.total[0], atol=1e-4, rtol=0)


def test_calibration_of_a_conditioned_intervention_uses_its_reference():
    vector = torch.ones(48) / 48**0.5
    coefficients = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    zero = _conditioned(vector, 0.5, coefficients).calibration()
    assert not zero.active and not zero.conditioned
    reference = _conditioned(vector, 0.5, coefficients, torch.tensor([0.25], dtype=torch.float64))
    calibrating = reference.calibration()
    assert calibrating.alpha == 0.5 and not calibrating.conditioned
    torch.testing.assert_close(calibrating.vectors[1], 0.25 * vector)
    assert _fixed(vector, 0.5).calibration() is not None
    assert reference.for_rows([1]).coefficients.tolist() == [[-1.0]]
    with pytest.raises(ValueError, match="directions"):
        Intervention({1: vector[None].repeat(2, 1)}, {1: 1.0}, 0.5, coefficients=coefficients)


def test_reading_from_a_file_refuses_a_damaged_one(tmp_path):
    x, y, _ = _two_classes(n=20)
    reading = fit_reading(x, y, classes=2, metadata={"reader": "expert", "layer": 1})
    path = save_reading(tmp_path / "reader.safetensors", reading)
    loaded = load_reading(path, {"reader": "expert"})
    assert (loaded.midpoint, loaded.half) == (reading.midpoint, reading.half)
    assert isinstance(loaded, Reading) and loaded.metadata["layer"] == 1
    with pytest.raises(Exception, match="reader"):
        load_reading(path, {"reader": "target"})


def test_the_reader_block_is_the_one_whose_reading_classifies_the_steer_split_best():
    x, y, _ = _two_classes(n=60)
    generator = torch.Generator().manual_seed(4)
    noise = torch.randn(60, 6, generator=generator, dtype=torch.float64)
    # Block 3 carries the classes, block 1 nothing, block 7 the same as block 3.
    states = {1: noise, 3: x, 7: x.clone()}
    accuracies = reader_block_accuracies(states, y, classes=2, folds=5, seed=0)
    assert accuracies[3] == accuracies[7] > 0.95 and accuracies[1] < 0.8
    assert best_block(accuracies) == 3  # a tie goes to the shallower, cheaper block
    # Folds are stratified (each class dealt evenly) and seeded.
    folds = stratified_folds(y, 5, seed=0)
    for k in range(5):
        assert int((y[folds == k] == 1).sum()) == int((y == 1).sum()) // 5
    assert torch.equal(folds, stratified_folds(y, 5, seed=0))
    with pytest.raises(ValueError, match="at least 5 steer items of every class"):
        reader_block_accuracies({0: x[:8]}, torch.tensor([0, 1, 0, 1, 0, 1, 0, 0]), 2)
    with pytest.raises(ValueError, match="separate the classes"):
        reader_block_accuracies({0: torch.zeros(60, 6, dtype=torch.float64)}, y, 2)
