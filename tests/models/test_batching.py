"""Token-budget batches: every batch within its budget (an over-budget text alone), order kept,
as few batches as the greedy rule allows; captures with a budget equal captures without; an
out-of-memory error names the option to lower."""

import itertools
import random
import types

import pytest
import torch

from datamodules.paired_activations import PairedActivationDataModule
from expertsteer.data.token_pairs import (
    CorpusConfig,
    PairText,
    ensure_token_pairs,
    load_token_pairs,
    read_token_meta,
)
from expertsteer.models.batching import (
    BatchMemoryError,
    is_out_of_memory,
    naming_out_of_memory,
    token_batches,
)
from expertsteer.models.capture import capture, capture_batches
from expertsteer.models.causal_lm import CausalLM
from tests.tiny import byte_tokenizer, tiny_model
from tests.tiny_data import tiny_datamodule


def _padded(lengths, group):
    return len(group) * max(lengths[k] for k in group)


@pytest.mark.parametrize("seed", range(20))
def test_batches_keep_their_budget_and_order(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 40), rng.randint(1, 400)]) for _ in range(60)]
    max_items, budget = rng.randint(1, 9), rng.randint(30, 300)
    groups = token_batches(lengths, max_items, budget)
    assert [k for group in groups for k in group] == list(range(len(lengths)))
    for group in groups:
        assert len(group) <= max_items
        assert _padded(lengths, group) <= budget or (len(group) == 1 and lengths[group[0]] > budget)
    # Greedy: a batch ends only where the next text would break a limit.
    for group, after in itertools.pairwise(groups):
        grown = [*group, after[0]]
        assert len(grown) > max_items or _padded(lengths, grown) > budget


def test_over_budget_texts_go_alone_and_no_budget_is_fixed_size_batches():
    assert token_batches([5, 50, 5, 5, 5], 4, 20) == [[0], [1], [2, 3, 4]]
    assert token_batches([3, 3, 3, 3, 3], 2) == [[0, 1], [2, 3], [4]]
    assert token_batches([], 4, 10) == []
    # Padding counts: one long text makes the whole batch wide.
    assert token_batches([2, 2, 9, 2], 8, 20) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="max_tokens must be a positive"):
        token_batches([1], 1, 0)
    with pytest.raises(ValueError, match="max_items must be >= 1"):
        token_batches([1], 0)


PROMPTS = ["a", "a somewhat longer prompt than the first", "b", "mid length one", "c" * 70, "d"]


def test_capture_with_a_budget_equals_capture_without_in_fewer_tokens_per_forward():
    decoder = CausalLM(tiny_model("llama"), byte_tokenizer(chat=True))
    lengths = decoder.token_lengths(PROMPTS)
    encoded = decoder.encode(PROMPTS)["attention_mask"].sum(-1).tolist()
    assert lengths == encoded
    budget = 2 * max(lengths[:4])
    groups = capture_batches(decoder, PROMPTS, None, batch_size=4, max_tokens=budget)
    assert all(_padded(lengths, g) <= budget or len(g) == 1 for g in groups)
    assert len(groups) > len(capture_batches(decoder, PROMPTS, None, batch_size=4))
    calls = []
    budgeted = capture(
        decoder, PROMPTS, batch_size=4, max_tokens=budget, on_batch=lambda: calls.append(1)
    )
    plain = capture(decoder, PROMPTS, batch_size=4)
    assert len(calls) == len(groups)
    for layer, states in plain.items():
        assert budgeted[layer].device.type == "cpu"
        torch.testing.assert_close(budgeted[layer], states, atol=1e-5, rtol=0)


def test_out_of_memory_errors_are_recognised_and_named():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    advice = naming_out_of_memory("capture", "lower max_batch_tokens")
    with pytest.raises(BatchMemoryError, match="during capture: lower max_batch_tokens"), advice:
        raise torch.OutOfMemoryError("CUDA out of memory")
    advice = naming_out_of_memory("capture", "lower max_batch_tokens")
    with pytest.raises(RuntimeError, match="shape mismatch"), advice:
        raise RuntimeError("shape mismatch")


def test_capture_out_of_memory_names_max_batch_tokens(tiny_dirs, tmp_path, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr("datamodules.paired_activations.capture", exhausted)
    module = tiny_datamodule(
        tiny_dirs,
        tmp_path / "cache",
        steer_size=4,
        dev_size=2,
        test_size=2,
        max_batch_tokens=512,
        capture_batch_size=6,
    )
    with pytest.raises(BatchMemoryError, match=r"max_batch_tokens \(now 512\).*\(now 6\)"):
        module.prepare_data()
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive"):
        PairedActivationDataModule(max_batch_tokens=0)


def test_paired_capture_with_a_budget_equals_the_cache_without(tiny_dirs, tmp_path):
    settings = dict(steer_size=6, dev_size=4, test_size=2, capture_batch_size=8)
    plain = tiny_datamodule(tiny_dirs, tmp_path / "a", **settings)
    budgeted = tiny_datamodule(tiny_dirs, tmp_path / "b", **settings, max_batch_tokens=96)
    assert plain.cache_path().name == budgeted.cache_path().name, "same states, same entry"
    for module in (plain, budgeted):
        module.prepare_data()
        module.setup("fit")
    for split in ("steer", "dev", "test"):
        a, b = plain.split_tensors(split), budgeted.split_tensors(split)
        assert a["id"] == b["id"]
        for side in ("expert", "target"):
            torch.testing.assert_close(a[side], b[side], atol=1e-5, rtol=0)


def test_token_pair_forwards_keep_the_budget_and_the_states(tmp_path, monkeypatch):
    from expertsteer.data import token_pairs
    from tests.data.test_token_pairs import _pair_models

    decoders, keys = _pair_models()
    texts = [PairText(f"t{k}", ("the weather " * (1 + (7 * k) % 5),), False) for k in range(7)]
    config = CorpusConfig(size=7, shard_texts=7)
    widths = []
    real = token_pairs.capture_positions

    def recording(decoder, input_ids, *args):
        widths.append(len(input_ids) * max(len(ids) for ids in input_ids))
        return real(decoder, input_ids, *args)

    monkeypatch.setattr(token_pairs, "capture_positions", recording)
    plain = ensure_token_pairs(tmp_path, keys, texts, config, "float32", lambda: decoders, 4)
    unbudgeted = len(widths)
    budget = 80
    budgeted = ensure_token_pairs(
        tmp_path / "b", keys, texts, config, "float32", lambda: decoders, 4, budget
    )
    assert plain.name == budgeted.name, "same states, same entry"
    assert len(widths) - unbudgeted > unbudgeted
    assert max(widths[unbudgeted:]) <= budget < max(widths[:unbudgeted])
    a = load_token_pairs(plain, read_token_meta(plain))
    b = load_token_pairs(budgeted, read_token_meta(budgeted))
    assert torch.equal(a["text"], b["text"])
    for side in ("expert", "target"):
        torch.testing.assert_close(a[side], b[side], atol=1e-4, rtol=1e-4)
    bf16 = ensure_token_pairs(
        tmp_path, keys, texts, config, "float32", lambda: decoders, 4, model_dtype="bfloat16"
    )
    assert bf16.name != plain.name


def test_experiment_passes_the_capture_budget_to_every_capturing_stage():
    from expertsteer.pipeline.experiment import AlignmentSettings, Experiment, ExperimentError
    from expertsteer.pipeline.stages import stage_configs

    def capture_settings(experiment):
        stages = stage_configs(experiment, "arithmetic")
        data = [config["data"] for _, config, _ in stages.values()]
        return [d["init_args"] for d in data if d["class_path"] == "PairedActivationDataModule"]

    budgeted = Experiment(tasks=["arithmetic"], alignment=AlignmentSettings(max_batch_tokens=2048))
    settings = capture_settings(budgeted)
    assert settings and all(s.get("max_batch_tokens") == 2048 for s in settings)
    assert all(
        "max_batch_tokens" not in s for s in capture_settings(Experiment(tasks=["arithmetic"]))
    )
    with pytest.raises(ExperimentError, match="alignment.max_batch_tokens"):
        AlignmentSettings(max_batch_tokens=0)


def test_experiment_passes_the_scoring_budget_to_the_evaluation_stage():
    from expertsteer.evaluation.evaluate import ScoringConfig
    from expertsteer.pipeline.experiment import EvalSettings, Experiment, ExperimentError
    from expertsteer.pipeline.stages import stage_configs

    def scoring(experiment):
        _, config, _ = stage_configs(experiment, "arithmetic")["evaluate"]
        return config["model"]["init_args"]["scoring"]

    budgeted = Experiment(tasks=["arithmetic"], evaluation=EvalSettings(max_batch_tokens=4096))
    assert scoring(budgeted)["max_batch_tokens"] == 4096
    # Unset, it is not written: the stage's fingerprint stays that of earlier runs.
    assert "max_batch_tokens" not in scoring(Experiment(tasks=["arithmetic"]))
    with pytest.raises(ExperimentError, match="evaluation.max_batch_tokens"):
        EvalSettings(max_batch_tokens=0)
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive number"):
        ScoringConfig(max_batch_tokens=-5)


def test_the_evaluation_names_its_token_budget_when_memory_runs_out(tiny_dirs, tmp_path):
    from lightning_modules.steer import SteeringModule

    module = SteeringModule(
        target=str(tiny_dirs["target"]),
        expert=None,
        methods={"expertsteer": "steering.safetensors"},
        run_dir=str(tmp_path),
        scoring={"max_batch_tokens": 512},
    )
    module.target_decoder = types.SimpleNamespace(device=torch.device("cpu"))
    budget_named = pytest.raises(BatchMemoryError, match=r"max_batch_tokens \(now 512\)")
    with budget_named, module._out_of_memory("scoring"):
        raise torch.OutOfMemoryError("CUDA out of memory")
