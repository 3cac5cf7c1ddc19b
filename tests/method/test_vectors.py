"""`SteeringVectors` as a public object: the recorded choice (embedded or beside the file),
artifacts without one, and vector arithmetic."""

import logging

import pytest
import torch

from expertsteer.artifacts import STEERING_FILE, ArtifactError
from expertsteer.errors import ExpertSteerError
from expertsteer.method.vectors import (
    SteeringVectors,
    choice_path,
    load_steering,
    record_choices,
    save_steering,
    write_choice,
)
from expertsteer.models.causal_lm import CausalLM, left_pad_positions
from expertsteer.models.export import ExportError, export_gguf, read_control_vector
from expertsteer.pipeline.try_steering import RunSteering
from tests.tiny import byte_tokenizer, tiny_model

PROMPTS = ["Hello there", "A longer second prompt"]


@pytest.fixture(scope="module")
def decoder():
    return CausalLM(tiny_model("llama", seed=5), byte_tokenizer(), name="tiny")


def _unit(width: int, seed: int) -> torch.Tensor:
    v = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _vectors(layers: dict[int, float], seed: int = 0, width: int = 48, **metadata):
    return SteeringVectors(
        {layer: _unit(width, seed + layer) for layer in layers},
        dict(layers),
        metadata={"method": "mean_diff", "target_model_id": "tiny", **metadata},
    )


def _log_probs(decoder, steering=None, **apply):
    encoding = decoder.encode(PROMPTS)
    position_ids = left_pad_positions(encoding["attention_mask"])

    def forward():
        with torch.inference_mode():
            return decoder.hf_model(**encoding, position_ids=position_ids).logits.log_softmax(-1)

    if steering is None:
        return forward()
    with steering.apply(decoder.hf_model, **apply):
        return forward()


def test_choice_round_trip_steers_without_an_alpha(decoder, tmp_path):
    chosen = _vectors({1: 3.0, 2: 4.0}).with_choice(0.7, layers=[1], positions="prompt")
    path = chosen.save(tmp_path / "v.safetensors")
    back = SteeringVectors.load(path)
    assert back.choice == {"alpha": 0.7, "layers": [1], "positions": "prompt"}
    torch.testing.assert_close(back.vectors[2], chosen.vectors[2], rtol=0, atol=0)
    by_choice = _log_probs(decoder, back)
    explicit = _log_probs(decoder, back, alpha=0.7, positions="prompt", layers=[1])
    torch.testing.assert_close(by_choice, explicit, rtol=0, atol=0)
    assert (by_choice - _log_probs(decoder)).abs().max() > 1e-3
    # An explicit alpha keeps the chosen layers and positions.
    assert back.resolve(alpha=2.0) == (2.0, "prompt", [1])


def test_the_evaluations_sibling_choice_is_read_while_it_belongs_to_the_file(
    decoder, tmp_path, caplog
):
    path = save_steering(tmp_path / STEERING_FILE, _vectors({1: 3.0, 2: 4.0}))
    assert load_steering(path).choice is None
    written = write_choice(path, -0.9, [2], "all", task="sst2", method="expertsteer")
    assert written == choice_path(path) == tmp_path / "steering.choice.json"
    steering = load_steering(path)
    assert steering.choice["alpha"] == -0.9 and steering.choice["layers"] == [2]
    assert steering.choice["task"] == "sst2"
    # export-gguf needs no alpha and writes the chosen layers at the chosen alpha.
    _, directions = read_control_vector(export_gguf(path, tmp_path / "o.gguf", model_hint="llama"))
    assert set(directions) == {2}
    expected = -0.9 * steering.norm_scale[2] * steering.vectors[2].double()
    torch.testing.assert_close(directions[2], expected.float())
    # New vectors in the file: the old choice no longer applies.
    save_steering(path, _vectors({1: 3.0, 2: 4.0}, seed=9))
    with caplog.at_level(logging.WARNING):
        assert load_steering(path).choice is None
    assert "written for other vectors" in caplog.text


def test_artifacts_without_a_choice_load_and_ask_for_an_alpha(decoder, tmp_path):
    run = tmp_path / "run"
    path = save_steering(run / STEERING_FILE, _vectors({1: 3.0}))
    steering = SteeringVectors.load(path)
    assert steering.layers == [1] and steering.choice is None
    with pytest.raises(ArtifactError, match=r"alpha=0\.3"):
        steering.apply(decoder.hf_model)
    with pytest.raises(ExportError, match="--alpha"):
        export_gguf(path, tmp_path / "o.gguf", model_hint="llama")
    with pytest.raises(ExpertSteerError, match="--alpha"):
        RunSteering.load(run, decoder=decoder)
    # With an explicit alpha everything works, on every layer.
    tried = RunSteering.load(run, alpha=0.5, decoder=decoder)
    assert tried.layers == [1] and tried.alpha == 0.5
    # An older artifact's top-level metadata alpha counts as a choice on every layer.
    legacy = save_steering(tmp_path / "legacy.safetensors", _vectors({1: 3.0}, alpha=1.5))
    assert load_steering(legacy).choice == {"alpha": 1.5, "layers": [1], "positions": "all"}


def test_record_choices_writes_one_file_per_method_and_skips_null_draws(tmp_path):
    paths = {
        name: save_steering(tmp_path / name / STEERING_FILE, _vectors({1: 1.0}))
        for name in ("a", "b")
    }
    chosen = {"a": ((1,), 0.3), "b": ((1,), -0.9), "null/0": ((1,), 0.1)}
    record_choices(paths, chosen, "prompt", task="t")
    assert load_steering(paths["a"]).choice["alpha"] == 0.3
    assert load_steering(paths["b"]).choice["positions"] == "prompt"
    assert sorted(p.parent.name for p in tmp_path.glob("*/*.choice.json")) == ["a", "b"]


def test_scaling_and_negation_scale_the_addition_and_keep_the_choice():
    v = _vectors({1: 3.0}).with_choice(0.5)
    added = v.additions(0.5, [1], torch.float64, "cpu")[1]
    twice, negated = 2 * v, -v
    torch.testing.assert_close(twice.additions(0.5, [1], torch.float64, "cpu")[1], 2 * added)
    torch.testing.assert_close(negated.additions(0.5, [1], torch.float64, "cpu")[1], -added)
    assert twice.choice["alpha"] == 0.5 and "2 x" in twice.metadata["derived"]
    with pytest.raises(ValueError, match="finite"):
        v * float("inf")


def test_sums_add_the_additions_per_layer_and_combine_different_layers(decoder):
    a = _vectors({1: 3.0}, seed=1).with_choice(0.4)
    b = _vectors({1: 5.0, 2: 2.0}, seed=2)
    total = a + b
    assert total.layers == [1, 2] and total.choice is None
    parts = [x.additions(1.0, x.layers, torch.float64, "cpu") for x in (a, b)]
    summed = total.additions(1.0, [1, 2], torch.float64, "cpu")
    torch.testing.assert_close(summed[1], parts[0][1] + parts[1][1])
    torch.testing.assert_close(summed[2], parts[1][2])
    # Steering with the sum = steering with both at once (nested hooks).
    with a.apply(decoder.hf_model, alpha=1.0):
        nested = _log_probs(decoder, b, alpha=1.0)
    torch.testing.assert_close(_log_probs(decoder, total, alpha=1.0), nested, atol=1e-5, rtol=0)
    difference = (a - a).additions(1.0, [1], torch.float64, "cpu")[1]
    assert difference.abs().max() == 0
    with pytest.raises(ValueError, match="two targets"):
        a + _vectors({1: 1.0}, target_model_id="other")
    with pytest.raises(ValueError, match="widths"):
        a + _vectors({1: 1.0}, width=32)
    with pytest.raises(ArtifactError, match="alpha"):
        total.apply(decoder.hf_model)
