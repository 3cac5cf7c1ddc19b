"""Every model runs on the rank's device (the trainer's root device) in the configured dtype:
the capture of the paired data module and the evaluation's target and expert decoders.

On a CPU-only machine the root device is the CPU, so the Lightning runs below check that the
decoders sit where the module sits and in the configured dtype; the `meta` device stands in for
an accelerator to show that placement follows the trainer's root device, not a default."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules.paired_activations import PairedActivationDataModule
from datamodules.task_examples import TaskExamplesDataModule
from expertsteer.artifacts import STEERING_FILE
from expertsteer.data.activations import fingerprint
from expertsteer.models.batching import BatchMemoryError
from expertsteer.models.zoo import resolve_dtype
from lightning_modules.steer import SteeringModule
from tests.tiny_data import tiny_datamodule
from tests.tiny_task import review_task, target_steering

META = torch.device("meta")


class _Strategy:
    root_device = META


class _Trainer:
    """What `setup` reads of a trainer, with an accelerator's root device."""

    strategy = _Strategy()
    global_rank, local_rank, world_size = 0, 0, 1

    def __init__(self, datamodule=None) -> None:
        self.datamodule = datamodule


def _quiet_trainer(tmp_path, **settings) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        **settings,
    )


def _paired(tiny_dirs, tmp_path, **overrides) -> PairedActivationDataModule:
    settings = dict(
        steer_size=4,
        dev_size=2,
        test_size=2,
        shard_size=4,
        batch_size=4,
        capture_splits=["steer", "dev"],
    )
    return tiny_datamodule(tiny_dirs, tmp_path / "cache", **{**settings, **overrides})


def _steering_module(tiny_dirs, tmp_path, **scoring) -> SteeringModule:
    target = str(tiny_dirs["target"])
    target_steering(tmp_path / "run" / STEERING_FILE, target, "reviews", 3, 10.0)
    return SteeringModule(
        target=target,
        expert=str(tiny_dirs["expert"]),
        methods={"expertsteer": STEERING_FILE},
        run_dir=str(tmp_path / "run"),
        scoring={"batch_size": 4, **scoring},
    )


def _examples(tmp_path) -> TaskExamplesDataModule:
    return TaskExamplesDataModule(
        task=str(review_task(tmp_path, "reviews", [i % 2 for i in range(12)])),
        steer_size=2,
        dev_size=4,
        test_size=4,
        batch_size=4,
    )


class _Placement(L.Callback):
    """Records, at every validation batch, where the module and its decoders are."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
        decoders = (pl_module.target_decoder, pl_module.expert_decoder)
        self.seen.append(
            {
                "module": pl_module.device,
                "root": trainer.strategy.root_device,
                "devices": {p.device for d in decoders for p in d.hf_model.parameters()},
                "dtypes": {p.dtype for d in decoders for p in d.hf_model.parameters()},
            }
        )


@pytest.mark.parametrize(("model_dtype", "dtype"), [("auto", torch.float32), ("bfloat16", None)])
def test_evaluation_decoders_sit_on_the_modules_device_in_the_configured_dtype(
    tiny_dirs, tmp_path, model_dtype, dtype
):
    placement = _Placement()
    module = _steering_module(tiny_dirs, tmp_path, model_dtype=model_dtype)
    trainer = _quiet_trainer(tmp_path, callbacks=[placement])
    trainer.validate(module, datamodule=_examples(tmp_path))
    assert placement.seen, "no validation batch ran"
    for seen in placement.seen:
        assert seen["devices"] == {seen["module"]} and seen["module"] == seen["root"]
        assert seen["dtypes"] == {dtype or torch.bfloat16}


def _recording_loads(monkeypatch, where: str) -> list[tuple]:
    """Record (name, dtype, device) of every model `where` loads; load them on the CPU (the
    meta device stands in for an accelerator, and nothing can run on it)."""
    from expertsteer.models.zoo import load_model

    calls = []

    def recording(name, dtype="float32", device="cpu"):
        calls.append((name, dtype, torch.device(device)))
        return load_model(name, dtype)

    monkeypatch.setattr(f"{where}.load_model", recording)
    return calls


def test_evaluation_decoders_are_loaded_on_the_trainers_root_device(
    tiny_dirs, tmp_path, monkeypatch
):
    calls = _recording_loads(monkeypatch, "lightning_modules.steer")
    module = _steering_module(tiny_dirs, tmp_path)
    module.trainer = _Trainer(_examples(tmp_path))
    module.setup("validate")
    assert calls == [
        (str(tiny_dirs["target"]), "float32", META),
        (str(tiny_dirs["expert"]), "float32", META),
    ]


class _Fitted(L.LightningModule):
    """A one-parameter stage that records where the capture ran and where it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.fit_device: torch.device | None = None

    def on_fit_start(self) -> None:
        self.fit_device = self.device

    def training_step(self, batch, batch_idx):
        return (self.weight - batch["target"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("model_dtype", ["auto", "bfloat16"])
def test_capture_runs_on_the_fitted_modules_device_in_the_configured_dtype(
    tiny_dirs, tmp_path, monkeypatch, model_dtype
):
    from datamodules import paired_activations

    used = []
    real_capture = paired_activations.capture

    def recording(decoder, *args, **kwargs):
        parameters = list(decoder.hf_model.parameters())
        used.append(({p.device for p in parameters}, {p.dtype for p in parameters}))
        return real_capture(decoder, *args, **kwargs)

    monkeypatch.setattr(paired_activations, "capture", recording)
    data = _paired(tiny_dirs, tmp_path, model_dtype=model_dtype)
    module = _Fitted()
    _quiet_trainer(tmp_path, max_epochs=1).fit(module, datamodule=data)
    expected = torch.float32 if model_dtype == "auto" else torch.bfloat16
    # Every shard, both models.
    assert len(used) == 2 * len(list(data.cache_path().glob("*.safetensors"))) >= 4
    assert all(devices == {module.fit_device} for devices, _ in used)
    assert all(dtypes == {expected} for _, dtypes in used)


def test_capture_models_are_loaded_on_the_trainers_root_device(tiny_dirs, tmp_path, monkeypatch):
    calls = _recording_loads(monkeypatch, "datamodules.paired_activations")
    data = _paired(tiny_dirs, tmp_path, model_dtype="bfloat16")
    data.trainer = _Trainer()
    assert data.root_device() == META
    data._decoders()
    assert calls == [
        (str(tiny_dirs["expert"]), "bfloat16", META),
        (str(tiny_dirs["target"]), "bfloat16", META),
    ]


def test_model_dtype_other_than_float32_has_its_own_cache_entry_float32_keeps_its_own(
    tiny_dirs, tmp_path
):
    data = _paired(tiny_dirs, tmp_path)
    plain = fingerprint(*data.keys(), "last", "float32", 4, data.split_items())
    assert data.cache_path().name == plain
    assert _paired(tiny_dirs, tmp_path, model_dtype="float32").cache_path().name == plain
    others = {
        _paired(tiny_dirs, tmp_path, model_dtype=name).cache_path().name
        for name in ("bfloat16", "float16")
    }
    assert len(others) == 2 and plain not in others


def test_auto_dtype_is_float32_off_cuda():
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", META) == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="model_dtype must be one of"):
        PairedActivationDataModule(model_dtype="fp8")
    with pytest.raises(ValueError, match="model_dtype must be one of"):
        SteeringModule(methods={"a": "x.safetensors"}, scoring={"model_dtype": "half"})


def test_scoring_out_of_memory_names_the_batch_size(tiny_dirs, tmp_path, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("lightning_modules.steer.evaluate", exhausted)
    module = _steering_module(tiny_dirs, tmp_path, batch_size=6)
    trainer = _quiet_trainer(tmp_path)
    with pytest.raises(BatchMemoryError, match=r"lower the evaluation's batch_size \(now 6\)"):
        trainer.validate(module, datamodule=_examples(tmp_path))
