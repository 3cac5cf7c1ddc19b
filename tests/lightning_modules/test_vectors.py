"""VectorsModule under a real Lightning Trainer on tiny paired activations: one RFM iteration per
epoch, the same vector as a direct `fit_rfm`, baselines, the steering artifact and its checks."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from expertsteer.artifacts import STEERING_FILE, ArtifactError, load_artifact, save_artifact
from expertsteer.method.align import AffineAutoencoders, save_alignment
from expertsteer.method.rfm import RFMConfig, VectorsConfig, fit_rfm
from expertsteer.method.vectors import load_steering, orient
from lightning_modules.vectors import VectorsModule
from tests.tiny_data import prepared, tiny_datamodule


@pytest.fixture(scope="module")
def data(tiny_dirs, tmp_path_factory):
    """A prepared DataModule (expert 64-d x 4 layers, target 48-d x 3 layers)."""
    return prepared(tiny_datamodule(tiny_dirs, tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def alignment(data, tmp_path_factory):
    """An alignment artifact for the tiny pair (random affine maps, fitted standardisation)."""
    expert_key, target_key = data.keys()
    torch.manual_seed(0)
    aligner = AffineAutoencoders(len(expert_key.layers), 64, 48)
    aligner.fit_standardisation(data.split_tensors("steer")["expert"].float())
    path = tmp_path_factory.mktemp("align") / "alignment.safetensors"
    save_alignment(
        path,
        aligner,
        {
            "expert_model_id": expert_key.model_id,
            "expert_weights_sha256": expert_key.weights_sha256,
            "target_model_id": target_key.model_id,
            "target_weights_sha256": target_key.weights_sha256,
            "expert_layers": list(expert_key.layers),
            "target_layers": list(target_key.layers),
            "objective": "recon",
            "translation_pairs": [],
            "data_fingerprint": data.cache_path().name,
        },
    )
    return path, aligner


def _fit(module, data, tmp_path, max_epochs=20):
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def _xy(data, split, side, layer_index):
    tensors = data.split_tensors(split)
    return tensors[side][:, layer_index].double(), tensors["label"]


def test_target_self_rfm_runs_one_iteration_per_epoch_and_matches_fit_rfm(data, tmp_path):
    module = VectorsModule(source="target", pairs=[[0, 1]], rfm=VectorsConfig(iterations=3))
    trainer = _fit(module, data, tmp_path)
    assert trainer.current_epoch == 4, "T + 1 epochs, then the module stops itself"
    x, y = _xy(data, "steer", "target", 1)
    xv, yv = _xy(data, "dev", "target", 1)
    reference = fit_rfm(x, y, xv, yv, RFMConfig(iterations=3))
    steering = load_steering(tmp_path / STEERING_FILE)
    assert steering.layers == [1]
    cosine = float(steering.vectors[1].double() @ reference.direction)
    assert cosine > 1 - 1e-5
    fit = steering.metadata["fits"][0]
    assert fit["val_auroc"] == pytest.approx(reference.val_auroc)
    assert fit["best_iteration"] == reference.best_iteration
    norms = data.split_tensors("dev")["target"][:, 1].float().norm(dim=-1).mean()
    assert steering.norm_scale[1] == pytest.approx(float(norms), rel=1e-6)


def test_logged_auroc_equals_fitter_history_for_every_bandwidth(data, tmp_path):
    module = VectorsModule(
        source="target",
        pairs=[[0, 2]],
        rfm=VectorsConfig(iterations=2, bandwidth_scales=[1.0, 4.0]),
    )
    _fit(module, data, tmp_path)
    x, y = _xy(data, "steer", "target", 2)
    xv, yv = _xy(data, "dev", "target", 2)
    reference = fit_rfm(x, y, xv, yv, RFMConfig(iterations=2, bandwidth_scales=(1.0, 4.0)))
    rows = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for factor, history in zip((1.0, 4.0), reference.grid_auroc.values(), strict=True):
        column = header.index(f"val/auroc/pair0/bw{factor:g}")
        logged = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
        assert logged == pytest.approx(history, abs=1e-6)


def test_expert_encoded_and_raw_spaces_map_into_the_target_width(data, alignment, tmp_path):
    path, aligner = alignment
    aligner = aligner.double()
    x, y = _xy(data, "steer", "expert", 2)
    xv, yv = _xy(data, "dev", "expert", 2)
    encoded = VectorsModule(
        alignment_file=str(path), pairs=[[2, 1]], rfm=VectorsConfig(iterations=2)
    )
    _fit(encoded, data, tmp_path / "enc")
    vector = load_steering(tmp_path / "enc" / STEERING_FILE).vectors[1].double()
    with torch.no_grad():
        reference = fit_rfm(aligner.encode(2, x), y, aligner.encode(2, xv), yv, RFMConfig(2))
    assert vector.shape == (48,)
    assert abs(float(vector @ reference.direction)) > 1 - 1e-5

    raw = VectorsModule(
        alignment_file=str(path),
        pairs=[[2, 1]],
        rfm=VectorsConfig(iterations=2, space="raw"),
    )
    _fit(raw, data, tmp_path / "raw")
    steering = load_steering(tmp_path / "raw" / STEERING_FILE)
    with torch.no_grad():
        mapped = aligner.encode_direction(2, fit_rfm(x, y, xv, yv, RFMConfig(2)).direction)
    assert abs(float(steering.vectors[1].double() @ (mapped / mapped.norm()))) > 1 - 1e-5
    # Oriented in target-space coordinates: label-1 states project higher.
    with torch.no_grad():
        projections = aligner.encode(2, x) @ steering.vectors[1].double()
    assert projections[y == 1].mean() >= projections[y == 0].mean()
    assert steering.metadata["space"] == "raw"
    assert steering.metadata["alignment_objective"] == "recon"


def test_expert_vectors_carry_transfer_diagnostics(data, alignment, tmp_path):
    path, _ = alignment
    module = VectorsModule(method="mean_diff", alignment_file=str(path), pairs=[[2, 1]])
    _fit(module, data, tmp_path)
    steering = load_steering(tmp_path / STEERING_FILE)
    (entry,) = steering.metadata["transfer"]
    assert (entry["expert_layer"], entry["target_layer"]) == (2, 1)
    assert entry["alignment"] == "recon" and entry["extractor"] == "mean_diff"
    x, y = _xy(data, "steer", "target", 1)
    native = x[y == 1].mean(0) - x[y == 0].mean(0)
    # Both directions oriented on the target's steer states, as the diagnostics document (the
    # saved vector is oriented in the encoded expert space, whose sign a recon map may flip).
    vector = orient(steering.vectors[1].double(), x.double(), y)
    cosine = float(vector @ native.double() / native.norm())
    assert entry["direction"]["cos_target_native"] == pytest.approx(cosine, abs=1e-6)
    assert 0 <= entry["direction"]["null_cos_p95"] <= 1
    xv, yv = _xy(data, "dev", "target", 1)
    scores = (xv.double() @ native.double()).tolist()
    positive = [v for v, label in zip(scores, yv.tolist(), strict=True) if label == 1]
    negative = [v for v, label in zip(scores, yv.tolist(), strict=True) if label == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]  # Mann-Whitney
    assert entry["direction"]["auroc_native"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    assert set(entry["verdict"]) == {"cos_above_null", "auroc_near_native", "auroc_above_random"}
    target_only = VectorsModule(method="mean_diff", source="target", pairs=[[2, 1]])
    _fit(target_only, data, tmp_path / "target")
    assert "transfer" not in load_steering(tmp_path / "target" / STEERING_FILE).metadata


class _StandInTrainer:
    """What the module reads of a trainer outside a run: the data module."""

    def __init__(self, datamodule) -> None:
        self.datamodule = datamodule


@pytest.mark.parametrize("space", ["encoded", "raw"])
def test_fit_inputs_and_mapped_directions_follow_the_modules_device(data, alignment, space):
    """The cached states (CPU) go where Lightning put the module and its auto-encoders, the
    rank's device; the `meta` device stands in for an accelerator (it computes shapes only)."""
    module = VectorsModule(
        alignment_file=str(alignment[0]), pairs=[[2, 1]], rfm=VectorsConfig(space=space)
    )
    module.trainer = _StandInTrainer(data)
    module.preflight(data)
    module.to("meta")
    x, y = module._features("steer", (2, 1))
    assert (x.device.type, y.device.type) == ("meta", "meta")
    assert x.shape[1] == (48 if space == "encoded" else 64)
    rows = torch.ones(1, x.shape[1], dtype=x.dtype, device="meta")
    mapped = module.vector_fit.to_target((2, 1), rows)
    assert mapped.device.type == "meta" and mapped.shape == (1, 48)
    states, labels = module._states("dev", "target", 1)
    assert (states.device.type, labels.device.type) == ("meta", "meta")


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff", "logistic", "random"])
def test_baselines_fit_in_one_epoch_behind_the_same_interface(data, tmp_path, method):
    module = VectorsModule(method=method, source="target", pairs=[[0, 1]])
    trainer = _fit(module, data, tmp_path)
    assert trainer.current_epoch == 1
    steering = load_steering(tmp_path / STEERING_FILE)
    assert steering.metadata["method"] == method
    assert torch.isclose(steering.vectors[1].norm(), torch.tensor(1.0), atol=1e-5)
    if method == "mean_diff":
        x, y = _xy(data, "steer", "target", 1)
        difference = x[y == 1].mean(0) - x[y == 0].mean(0)
        assert float(steering.vectors[1].double() @ difference / difference.norm()) > 1 - 1e-5


def test_tuning_by_gradient_moves_the_hyperparameters(data, tmp_path):
    module = VectorsModule(
        source="target",
        pairs=[[0, 1]],
        rfm=VectorsConfig(iterations=1, tune_steps=5, tune_lr=0.1),
    )
    before = module.log_bandwidth_scales.detach().clone()
    _fit(module, data, tmp_path)
    after = module.log_bandwidth_scales.detach()
    assert not torch.allclose(before, after) and torch.isfinite(after).all()
    steering = load_steering(tmp_path / STEERING_FILE)
    assert steering.metadata["rfm"]["bandwidth_scales"] == pytest.approx(after.exp().tolist())


def test_configuration_errors_are_named_before_any_work(data, alignment, tmp_path):
    with pytest.raises(ValueError, match="alignment_file"):
        VectorsModule(pairs=[[0, 1]])
    with pytest.raises(ValueError, match="exactly one of"):
        VectorsModule(source="target")
    with pytest.raises(ValueError, match="method must be one of"):
        VectorsModule(method="svm", source="target", pairs=[[0, 1]])
    with pytest.raises(ValueError, match="not among the captured"):
        _fit(VectorsModule(source="target", pairs=[[0, 7]]), data, tmp_path)
    with pytest.raises(ValueError, match="max_epochs=2 is too small"):
        three = VectorsModule(source="target", pairs=[[0, 1]], rfm=VectorsConfig(iterations=3))
        _fit(three, data, tmp_path, 2)


def test_alignment_of_another_model_is_refused(data, alignment, tmp_path):
    path, _ = alignment
    tensors, metadata = load_artifact(path, "alignment")
    metadata = {k: v for k, v in metadata.items() if k not in ("kind", "version")}
    other = tmp_path / "other.safetensors"
    save_artifact(other, "alignment", tensors, {**metadata, "expert_model_id": "someone-else"})
    module = VectorsModule(
        alignment_file=str(other), pairs=[[2, 1]], rfm=VectorsConfig(iterations=1)
    )
    with pytest.raises(ArtifactError, match="expert_model_id='someone-else'"):
        _fit(module, data, tmp_path)
    assert not (tmp_path / STEERING_FILE).exists()


def test_steering_artifact_checks_models_and_layers(data, tmp_path):
    one = VectorsModule(source="target", pairs=[[0, 1]], rfm=VectorsConfig(iterations=1))
    _fit(one, data, tmp_path)
    path = tmp_path / STEERING_FILE
    target = data.keys()[1]
    steering = load_steering(path, expect={"target_model_id": target.model_id}, num_layers=3)
    assert steering.metadata["target_weights_sha256"] == target.weights_sha256
    assert steering.metadata["data_fingerprint"] == data.cache_path().name
    with pytest.raises(ArtifactError, match="target_model_id"):
        load_steering(path, expect={"target_model_id": "smollm2-135m-instruct"})
    with pytest.raises(ArtifactError, match="has 1 blocks"):
        load_steering(path, num_layers=1)
    with pytest.raises(ArtifactError, match="not an ExpertSteer artifact|not found"):
        load_steering(tmp_path / "nothing.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ArtifactError):
        load_steering(tmp_path / "garbage.safetensors")
