import json

import pytest
import torch
import yaml

from expertsteer.data import activations
from expertsteer.data.activations import META, CacheMismatchError
from expertsteer.data.tasks import TaskError
from expertsteer.errors import ExpertSteerError
from expertsteer.models.capture import capture
from expertsteer.models.causal_lm import CausalLM
from expertsteer.models.zoo import load_model
from tests.tiny_data import tiny_datamodule


def _module(tiny_dirs, tmp_path, **overrides):
    settings = dict(
        steer_size=6, dev_size=4, test_size=4, shard_size=4, capture_batch_size=3, batch_size=5
    )
    return tiny_datamodule(tiny_dirs, tmp_path / "cache", **{**settings, **overrides})


def _bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_batches_hold_paired_states_equal_to_direct_capture(tiny_dirs, tmp_path):
    module = _module(tiny_dirs, tmp_path)
    module.prepare_data()
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["expert"].shape == (5, 4, 64) and batch["target"].shape == (5, 3, 48)
    assert set(batch["label"].tolist()) <= {0, 1} and len(batch["id"]) == 5
    dev = module.split_tensors("dev")
    assert len(dev["id"]) == 8 and dev["label"].tolist() == [1, 0] * 4
    items = module.split_items()["dev"]
    expert = CausalLM.from_loaded(load_model(str(tiny_dirs["expert"])))
    direct = capture(expert, [i.prompt for i in items], completions=[i.completion for i in items])
    for layer in range(4):
        torch.testing.assert_close(dev["expert"][:, layer], direct[layer])


def test_complete_cache_is_reused_without_loading_models(tiny_dirs, tmp_path, monkeypatch):
    module = _module(tiny_dirs, tmp_path)
    module.prepare_data()
    monkeypatch.setattr(
        "datamodules.paired_activations.load_model",
        lambda *a, **k: pytest.fail("models loaded for a complete cache"),
    )
    _module(tiny_dirs, tmp_path).prepare_data()


def test_fingerprint_changes_with_every_input_and_only_then(tiny_dirs, tmp_path):
    base = _module(tiny_dirs, tmp_path).cache_path()
    assert _module(tiny_dirs, tmp_path, batch_size=2, num_workers=0).cache_path() == base
    changed = {
        "layers": dict(expert_layers=[0, 2]),
        "position": dict(position="mean"),
        "dtype": dict(storage_dtype="float16"),
        "data": dict(seed=1),
        "sizes": dict(test_size=3),
        # (a dev split of 4 concept texts holds one label here; 6 hold both)
        "task": dict(task="sentiment_concept", dev_size=6),
        "template": dict(chat_template=False),
        "shards": dict(shard_size=5),
        "model": dict(target=str(tiny_dirs["expert"])),
    }
    paths = {name: _module(tiny_dirs, tmp_path, **kw).cache_path() for name, kw in changed.items()}
    assert base not in paths.values()
    assert len(set(paths.values())) == len(paths)


def test_interrupted_capture_resumes_without_redoing_finished_shards(
    tiny_dirs, tmp_path, monkeypatch
):
    reference = _module(tiny_dirs, tmp_path / "ref")
    reference.prepare_data()
    written = []
    real_write = activations.write_shard

    def crash_on_third(path, *args):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(path.name)
        real_write(path, *args)

    monkeypatch.setattr("datamodules.paired_activations.write_shard", crash_on_third)
    module = _module(tiny_dirs, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        module.prepare_data()
    directory = module.cache_path()
    assert not (directory / META).exists(), "an interrupted cache must not look complete"
    assert sorted(p.name for p in directory.iterdir()) == sorted(written)

    resumed = []
    monkeypatch.setattr(
        "datamodules.paired_activations.write_shard",
        lambda path, *a: (resumed.append(path.name), real_write(path, *a)),
    )
    _module(tiny_dirs, tmp_path).prepare_data()
    assert not set(resumed) & set(written)
    got, want = _bytes(directory), _bytes(reference.cache_path())
    got.pop(META), want.pop(META)
    assert got == want


def test_layer_that_does_not_exist_fails_before_capture(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "datamodules.paired_activations.load_model",
        lambda *a, **k: pytest.fail("models loaded before validation"),
    )
    # An ExpertSteerError: the CLI prints it as one line, not a traceback.
    with pytest.raises(ExpertSteerError, match=r"layer\(s\) \[3\] do not exist"):
        _module(tiny_dirs, tmp_path, target_layers=[0, 3]).prepare_data()


def test_one_class_concept_data_is_refused_before_capture(tiny_dirs, tmp_path, monkeypatch):
    rows = tmp_path / "pos.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"great {i}", "label": 1}) for i in range(20)))
    task = tmp_path / "pos.yaml"
    task.write_text(
        yaml.safe_dump(
            {
                "name": "only_positive",
                "type": "concept",
                "files": {"all": "pos.jsonl"},
                "fields": {"question": "text", "answer": "label"},
            }
        )
    )
    monkeypatch.setattr(
        "datamodules.paired_activations.load_model",
        lambda *a, **k: pytest.fail("models loaded before validation"),
    )
    with pytest.raises(TaskError, match=r"needs both labels 0 and 1, found \[1\]"):
        _module(tiny_dirs, tmp_path, task=str(task)).prepare_data()


def test_empty_split_fails_before_capture(tiny_dirs, tmp_path):
    with pytest.raises(TaskError, match="is empty"):
        _module(tiny_dirs, tmp_path, steer_size=1000).prepare_data()


def test_nan_activations_leave_no_complete_cache(tiny_dirs, tmp_path):
    from tests.tiny import save_tiny, tiny_model

    broken = tiny_model("qwen2", seed=5)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    save_tiny(tmp_path / "broken", "qwen2", model=broken)
    module = _module(tiny_dirs, tmp_path, expert=str(tmp_path / "broken"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        module.prepare_data()
    assert not (module.cache_path() / META).exists()
    assert not any(module.cache_path().glob("*.safetensors"))


def test_corrupt_shard_is_a_clear_error(tiny_dirs, tmp_path):
    module = _module(tiny_dirs, tmp_path)
    module.prepare_data()
    shard = module.cache_path() / activations.shard_name("test", 0)
    shard.write_bytes(b"garbage")
    with pytest.raises(CacheMismatchError, match="cannot read activation shard"):
        module.setup("test")


def test_storage_dtype_is_respected(tiny_dirs, tmp_path):
    module = _module(tiny_dirs, tmp_path, storage_dtype="bfloat16")
    module.prepare_data()
    module.setup()
    assert module.split_tensors("steer")["expert"].dtype == torch.bfloat16
    assert next(iter(module.val_dataloader()))["expert"].dtype == torch.float32


def test_same_size_corruption_of_a_shard_is_caught_by_its_checksum(tiny_dirs, tmp_path):
    module = _module(tiny_dirs, tmp_path)
    module.prepare_data()
    shard = module.cache_path() / activations.shard_name("steer", 0)
    assert json.loads((module.cache_path() / META).read_text())["shard_sha256"][shard.name]
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(8)  # the last float of the labels / states: still a valid safetensors file
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheMismatchError, match="sha256 differs"):
        module.setup("fit")
