import copy
import json

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn

from expertsteer.artifacts import (
    ALIGNMENT_FILE,
    MI_FILE,
    MI_HEATMAP_FILE,
    PAIRS_FILE,
    R2_HEATMAP_FILE,
    ArtifactError,
    load_artifact,
    save_artifact,
)
from expertsteer.data.token_pairs import CorpusConfig
from expertsteer.method.align import (
    STD_FLOOR,
    AffineAutoencoders,
    TrainingConfig,
    explained_variance,
    load_alignment,
    save_alignment,
)
from expertsteer.method.pair import MIConfig, PairingConfig
from expertsteer.method.translate import TranslateConfig, fit_pair, r2_score
from lightning_modules.alignment import AlignmentModule
from tests.tiny_data import tiny_datamodule

# -- the auto-encoders -----------------------------------------------------------------------


def _random_autoencoders(num_layers=3, expert_dim=10, target_dim=6, seed=0):
    torch.manual_seed(seed)
    module = AffineAutoencoders(num_layers, expert_dim, target_dim).double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()
        module.expert_mean.normal_()
        module.expert_std.uniform_(0.5, 2.0)
        module.target_mean.normal_()
        module.target_scale.uniform_(0.5, 2.0)
    return module


def test_batched_forward_equals_a_loop_of_linear_layers():
    module = _random_autoencoders()
    h = torch.randn(5, 3, 10, dtype=torch.float64)
    z, reconstruction = module(h)
    expected_losses = []
    for i in range(3):
        encoder, decoder = nn.Linear(10, 6).double(), nn.Linear(6, 10).double()
        with torch.no_grad():
            encoder.weight.copy_(module.encoder_weight[i])
            encoder.bias.copy_(module.encoder_bias[i])
            decoder.weight.copy_(module.decoder_weight[i])
            decoder.bias.copy_(module.decoder_bias[i])
        x = (h[:, i] - module.expert_mean[i]) / module.expert_std[i]
        code = encoder(x)
        torch.testing.assert_close(z[:, i], code, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(reconstruction[:, i], decoder(code), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(module.encode(i, h[:, i]), code, rtol=1e-12, atol=1e-12)
        raw = decoder(code) * module.expert_std[i] + module.expert_mean[i]
        torch.testing.assert_close(module.decode(i, code), raw, rtol=1e-12, atol=1e-12)
        expected_losses.append((decoder(code) - x).pow(2).mean())
    torch.testing.assert_close(
        module.reconstruction_loss(h), torch.stack(expected_losses), rtol=1e-12, atol=1e-12
    )


def test_encode_direction_is_the_linear_part_of_the_encoder():
    module = _random_autoencoders()
    h = torch.randn(4, 10, dtype=torch.float64)
    v = torch.randn(10, dtype=torch.float64)
    for layer in range(3):
        difference = module.encode(layer, h + v) - module.encode(layer, h)
        direction = module.encode_direction(layer, v)
        assert direction.shape == (6,)
        torch.testing.assert_close(difference, direction.expand(4, 6), rtol=1e-10, atol=1e-10)
    several = torch.randn(2, 10, dtype=torch.float64)
    torch.testing.assert_close(
        module.encode_direction(1, several),
        torch.stack([module.encode_direction(1, row) for row in several]),
    )


def test_standardisation_statistics_match_numpy():
    generator = np.random.default_rng(0)
    scales = np.array([1e-2, 1.0, 1e3])[None, :, None] * generator.uniform(0.5, 2, (1, 3, 8))
    states = generator.normal(5.0, 1.0, (200, 3, 8)) * scales
    states[:, 1, 3] = 7.0  # a constant feature
    module = AffineAutoencoders(3, 8, 4).double()
    module.fit_standardisation(torch.from_numpy(states))
    np.testing.assert_allclose(module.expert_mean.numpy(), states.mean(0), rtol=1e-12)
    std = states.std(0)
    floor = STD_FLOOR * std[1].mean()
    assert module.expert_std[1, 3].item() == pytest.approx(floor, rel=1e-9)
    std[1, 3] = floor
    np.testing.assert_allclose(module.expert_std.numpy(), std, rtol=1e-12)
    standardised = module.standardise(torch.from_numpy(states)).numpy()
    np.testing.assert_allclose(standardised[:, 1, 3], 0.0, atol=1e-6)
    np.testing.assert_allclose(standardised.std(0)[0], 1.0, rtol=1e-9)

    target = generator.normal(0, 1, (200, 4)) * np.array([1.0, 2.0, 3.0, 4.0]) + 10.0
    module.fit_target_standardisation(2, torch.from_numpy(target))
    np.testing.assert_allclose(module.target_mean[2].numpy(), target.mean(0), rtol=1e-12)
    assert module.target_scale[2].item() == pytest.approx(np.sqrt(target.var(0).mean()), 1e-12)
    assert module.target_scale[0].item() == 1.0 and module.target_mean[0].abs().max() == 0


def test_translation_loss_against_reference_and_its_checks():
    module = _random_autoencoders()
    h_expert = torch.randn(7, 3, 10, dtype=torch.float64)
    h_target = torch.randn(7, 2, 6, dtype=torch.float64)
    loss = module.translation_loss(h_expert, h_target, [(0, 1), (2, 0)])
    expected = []
    p = {name: value.detach().numpy() for name, value in module.state_dict().items()}
    for i, j in [(0, 1), (2, 0)]:
        x = (h_expert[:, i].numpy() - p["expert_mean"][i]) / p["expert_std"][i]
        code = x @ p["encoder_weight"][i].T + p["encoder_bias"][i]
        goal = (h_target[:, j].numpy() - p["target_mean"][i]) / p["target_scale"][i]
        expected.append(((code - goal) ** 2).mean())
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="one translation target"):
        module.translation_loss(h_expert, h_target, [(0, 1), (0, 0)])
    with pytest.raises(IndexError, match="target layer index 2"):
        module.translation_loss(h_expert, h_target, [(0, 2)])


def _train(states, target_dim, steps=100):
    torch.manual_seed(0)
    module = AffineAutoencoders(states.shape[1], states.shape[2], target_dim)
    module.fit_standardisation(states)
    optimizer = torch.optim.Adam(module.parameters(), lr=5e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        module.reconstruction_loss(states).mean().backward()
        optimizer.step()
    return explained_variance(module, states)


def test_low_rank_data_is_reconstructed_when_the_code_is_wide_enough():
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(200, 2, 5, generator=generator)
    mixing = torch.randn(2, 5, 24, generator=generator)
    layer_scale = torch.tensor([1.0, 300.0])[None, :, None]
    states = torch.einsum("nlr,lrd->nld", latent, mixing) * layer_scale + 3.0
    assert _train(states, target_dim=8).min() > 0.99
    # Control: a code narrower than the rank cannot reach it, so the check above can fail.
    assert _train(states, target_dim=3).max() < 0.95


# -- the artifact ----------------------------------------------------------------------------


def _metadata(**overrides):
    return {
        "expert_model_id": "expert-a",
        "expert_weights_sha256": "e" * 64,
        "target_model_id": "target-b",
        "target_weights_sha256": "t" * 64,
        "expert_layers": [0, 2, 5],
        "target_layers": [1, 3],
        "objective": "recon",
        "translation_pairs": [],
        "data_fingerprint": "f" * 32,
        **overrides,
    }


def test_save_load_round_trip(tmp_path):
    module = _random_autoencoders().float()
    path = save_alignment(tmp_path / ALIGNMENT_FILE, module, _metadata())
    loaded, metadata = load_alignment(path, expect={"expert_model_id": "expert-a"})
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert metadata["expert_dim"] == 10 and metadata["target_dim"] == 6
    assert metadata["expert_layers"] == [0, 2, 5] and metadata["kind"] == "alignment"


def test_load_with_other_model_names_the_field(tmp_path):
    path = save_alignment(tmp_path / ALIGNMENT_FILE, _random_autoencoders(), _metadata())
    with pytest.raises(ArtifactError, match="target_model_id='target-b'.*'other'"):
        load_alignment(path, expect={"target_model_id": "other"})


def test_shape_mismatch_is_an_artifact_error(tmp_path):
    module = _random_autoencoders()
    tensors = dict(module.state_dict())
    path = save_artifact(
        tmp_path / ALIGNMENT_FILE, "alignment", tensors, _metadata(expert_dim=12, target_dim=6)
    )
    with pytest.raises(ArtifactError, match=r"encoder_weight' has shape \(3, 6, 10\)"):
        load_alignment(path)
    with pytest.raises(ValueError, match="lists 2 expert layers"):
        save_alignment(tmp_path / "x.safetensors", module, _metadata(expert_layers=[0, 1]))
    with pytest.raises(ValueError, match="expert_dim=9"):
        save_alignment(tmp_path / "x.safetensors", module, _metadata(expert_dim=9))


# -- the Lightning stage ---------------------------------------------------------------------


def _datamodule(tiny_dirs, cache, **overrides):
    settings = dict(test_size=2, batch_size=8, capture_batch_size=16)
    return tiny_datamodule(tiny_dirs, cache, **{**settings, **overrides})


class StartLosses(Callback):
    """Dev losses of the initial weights, val/recon_loss after each validation epoch, and the
    last trained encoder weights (before the best checkpoint is restored)."""

    def __init__(self):
        self.start = {}
        self.val_recon = []

    def on_train_start(self, trainer, module):
        dev = trainer.datamodule.split_tensors("dev")
        with torch.no_grad():
            self.start["recon"] = module.autoencoders.reconstruction_loss(dev["expert"]).mean()
            if module.translation_pairs:
                self.start["translate"] = module.autoencoders.translation_loss(
                    dev["expert"], dev["target"], module.translation_pairs
                ).mean()

    def on_train_end(self, trainer, module):
        self.last_encoder = module.autoencoders.encoder_weight.detach().clone()

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.val_recon.append(float(trainer.callback_metrics["val/recon_loss"]))


def _fit(module, datamodule, root, max_epochs=3, ckpt_path=None, monitor=True, callbacks=()):
    L.seed_everything(0, verbose=False)
    recorder = StartLosses()
    callbacks = [recorder, *callbacks]
    if monitor:
        callbacks += [
            EarlyStopping(monitor="val/recon_loss", patience=2),
            ModelCheckpoint(dirpath=root / "ckpt", monitor="val/recon_loss", save_last=True),
        ]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=monitor or bool(callbacks),
        default_root_dir=root,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, recorder


@pytest.fixture(scope="module")
def recon_run(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("recon")
    datamodule = _datamodule(tiny_dirs, root / "cache")
    module = AlignmentModule(
        training=TrainingConfig(lr=1e-2), mi=MIConfig(mi_rank=4), keep_all_layers=True
    )
    trainer, recorder = _fit(module, datamodule, root)
    return {
        "root": root,
        "tiny_dirs": tiny_dirs,
        "datamodule": datamodule,
        "module": module,
        "trainer": trainer,
        "recorder": recorder,
    }


def test_fit_writes_the_four_artifacts_and_learns(recon_run):
    root, module, recorder = recon_run["root"], recon_run["module"], recon_run["recorder"]
    for name in (ALIGNMENT_FILE, MI_FILE, PAIRS_FILE, MI_HEATMAP_FILE):
        assert (root / name).is_file(), name
    assert (root / MI_HEATMAP_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(recorder.val_recon) == 3
    assert recorder.val_recon[-1] < recorder.val_recon[0] < float(recorder.start["recon"])
    logged = recon_run["trainer"].callback_metrics
    per_layer = [float(logged[f"val/explained_variance/layer_{i}"]) for i in range(4)]
    assert float(logged["val/explained_variance_min"]) == pytest.approx(min(per_layer))
    assert 0 < float(logged["val/explained_variance_median"]) <= max(per_layer) < 1
    assert {"train/recon_loss", "val/recon_loss"} <= set(logged)

    datamodule = recon_run["datamodule"]
    expert, target = datamodule.keys()
    loaded, metadata = load_alignment(
        root / ALIGNMENT_FILE,
        expect={
            "expert_model_id": expert.model_id,
            "target_weights_sha256": target.weights_sha256,
            "expert_layers": [0, 1, 2, 3],
            "data_fingerprint": datamodule.cache_path().name,
        },
    )
    assert metadata["weights"] == "best" and metadata["objective"] == "recon"
    best = torch.load(recon_run["trainer"].checkpoint_callback.best_model_path, weights_only=True)
    torch.testing.assert_close(
        loaded.encoder_weight, best["state_dict"]["autoencoders.encoder_weight"]
    )
    assert min(metadata["dev_explained_variance"]) > 0

    tensors, mi_meta = load_artifact(root / MI_FILE, "mi")
    assert tensors["mi"].shape == (4, 3) and tensors["mi"].dtype == torch.float64
    assert torch.isfinite(tensors["mi"]).all()
    torch.testing.assert_close(tensors["mi"], module.mi)
    assert mi_meta["estimator"] == "gaussian" and mi_meta["target_layers"] == [0, 1, 2]

    pairs = json.loads((root / PAIRS_FILE).read_text())
    assert pairs["kind"] == "pairs" and len(pairs["pairs"]) == 1
    # Block j of 3 sits at depth (j + 0.5) / 3: only block 1 is inside [0.25, 0.75).
    assert pairs["pairs"][0]["target_layer"] == 1
    i = pairs["pairs"][0]["expert_index"]
    assert pairs["pairs"][0]["mi"] == pytest.approx(float(tensors["mi"][i, 1]))
    assert pairs["pairs"][0]["mi"] == pytest.approx(float(tensors["mi"][:, 1].min()))
    assert pairs["expert_model_id"] == expert.model_id


def test_checkpoint_reloads_and_resumes(recon_run, tmp_path):
    trainer = recon_run["trainer"]
    best = trainer.checkpoint_callback.best_model_path
    reloaded = AlignmentModule.load_from_checkpoint(best)
    state = torch.load(best, weights_only=True)["state_dict"]
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)
    assert reloaded.run_metadata["expert_layers"] == [0, 1, 2, 3]
    codes = reloaded.encode_all(recon_run["datamodule"].split_tensors("dev")["expert"])
    assert codes.shape == (24, 4, 48)

    last = trainer.checkpoint_callback.last_model_path
    resumed = AlignmentModule(training=TrainingConfig(lr=1e-2), mi=MIConfig(mi_rank=4))
    datamodule = _datamodule(recon_run["tiny_dirs"], recon_run["root"] / "cache")
    second, _ = _fit(resumed, datamodule, tmp_path, max_epochs=4, ckpt_path=last)
    assert second.current_epoch == 4
    assert second.global_step == trainer.global_step + 6  # one more epoch: 48 items / 8


def test_best_checkpoint_weights_are_saved_not_the_last(recon_run, tmp_path):
    # mode="max" makes the worst (first) epoch the "best", so best and last surely differ.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/recon_loss", mode="max")
    datamodule = _datamodule(recon_run["tiny_dirs"], recon_run["root"] / "cache")
    module = AlignmentModule(
        training=TrainingConfig(lr=1e-2), mi=MIConfig(mi_rank=4), keep_all_layers=True
    )
    _, recorder = _fit(
        module, datamodule, tmp_path, max_epochs=2, monitor=False, callbacks=[checkpoint]
    )
    assert checkpoint.best_model_path.endswith("epoch=0-step=6.ckpt")
    loaded, metadata = load_alignment(tmp_path / ALIGNMENT_FILE)
    assert metadata["weights"] == "best" and metadata["epoch"] == 0
    best = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]
    name = "autoencoders.encoder_weight"
    torch.testing.assert_close(loaded.encoder_weight, best[name], rtol=0, atol=0)
    assert not torch.allclose(best[name], recorder.last_encoder)
    torch.testing.assert_close(module.autoencoders.encoder_weight, best[name], rtol=0, atol=0)


def test_translate_objective_lowers_translation_loss(recon_run, tmp_path):
    pairs_file = recon_run["root"] / PAIRS_FILE
    module = AlignmentModule(
        objective="recon+translate",
        pairs_file=str(pairs_file),
        training=TrainingConfig(lr=1e-2),
        mi=MIConfig(mi_rank=4),
    )
    chosen = json.loads(pairs_file.read_text())["pairs"][0]
    assert module.translation_layers == [(chosen["expert_layer"], chosen["target_layer"])]
    datamodule = _datamodule(recon_run["tiny_dirs"], recon_run["root"] / "cache")
    _, recorder = _fit(module, datamodule, tmp_path, monitor=False)
    dev = datamodule.split_tensors("dev")
    with torch.no_grad():
        final = module.autoencoders.translation_loss(
            dev["expert"], dev["target"], module.translation_pairs
        ).mean()
    assert final < 0.5 * recorder.start["translate"]
    _, metadata = load_alignment(tmp_path / ALIGNMENT_FILE)
    assert metadata["objective"] == "recon+translate" and metadata["weights"] == "last"
    assert metadata["translation_pairs"] == [[chosen["expert_layer"], chosen["target_layer"]]]


def test_pairs_that_do_not_fit_the_data_fail_before_training(recon_run, tmp_path):
    datamodule = _datamodule(recon_run["tiny_dirs"], recon_run["root"] / "cache")
    module = AlignmentModule(objective="recon+translate", pairs=[[7, 1]])
    with pytest.raises(ValueError, match="expert layer 7 was not captured"):
        _fit(module, datamodule, tmp_path, monitor=False)
    payload = json.loads((recon_run["root"] / PAIRS_FILE).read_text())
    foreign = tmp_path / PAIRS_FILE
    foreign.write_text(json.dumps({**payload, "target_model_id": "another-model"}))
    module = AlignmentModule(objective="recon+translate", pairs_file=str(foreign))
    with pytest.raises(ValueError, match="target_model_id='another-model'"):
        _fit(module, datamodule, tmp_path, monitor=False)
    assert module.autoencoders is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(objective="transfer"), "objective must be one of"),
        (dict(objective="recon+translate"), "needs the translation pairs"),
        (dict(pairs=[[1, 2]], pairs_file="p.json"), "either pairs or pairs_file"),
        (dict(objective="recon+translate", pairs=[[1]]), "non-empty list"),
        (dict(training={"scheduler": "linear"}), "scheduler must be one of"),
        (dict(pairing={"window": (0.8, 0.2)}), "window must satisfy"),
        (dict(mi={"estimator": "mine"}), "estimator must be one of"),
    ],
)
def test_bad_settings_fail_at_init(settings, message):
    with pytest.raises(ValueError, match=message):
        AlignmentModule(**settings)


# -- token-level corpus, translate objective, translatable pairing --------------------------


def _corpus(tmp_path, **overrides):
    lines = [
        f"On day {k} the weather was {'sunny' if k % 2 else 'rainy'} and warm." for k in range(40)
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return CorpusConfig(**{"tasks": [], "files": [str(path)], "size": 40, **overrides})


@pytest.fixture(scope="module")
def translate_run(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("translate")
    datamodule = _datamodule(tiny_dirs, root / "cache", corpus=_corpus(root))
    module = AlignmentModule(
        objective="translate",
        pairing=PairingConfig(select="translatable"),
        mi=MIConfig(mi_rank=4),
        translate=TranslateConfig(lambdas=[1e-2, 1.0], heldout_rows=200),
    )
    trainer, _ = _fit(module, datamodule, root, max_epochs=1, monitor=False)
    return {"root": root, "datamodule": datamodule, "module": module, "trainer": trainer}


def test_translate_fits_ridge_maps_in_closed_form(translate_run):
    module, datamodule = translate_run["module"], translate_run["datamodule"]
    tokens = datamodule.token_pairs()
    assert tokens["positions"] == tokens["expert"].shape[0] > 100
    assert tokens["source"].unique().tolist() == [0, 1]  # corpus and steer items
    aligner = module.autoencoders
    fit_rows, heldout = ~tokens["heldout"], tokens["heldout"]
    for i, fit in module.layer_fits.items():
        j = fit["target_index"]
        y_fit = tokens["target"][fit_rows, j].double()
        expected = fit_pair(
            aligner.standardise_layer(i, tokens["expert"][fit_rows, i].float()),
            aligner.standardise_target(i, y_fit.float()),
            aligner.standardise_layer(i, tokens["expert"][heldout, i].float()),
            aligner.standardise_target(i, tokens["target"][heldout, j].float()),
            module.translate_config,
        )
        torch.testing.assert_close(aligner.encoder_weight[i], expected.encoder.float())
        assert fit["heldout_r2"] == pytest.approx(expected.heldout_r2)
        # the encoder predicts its target layer better than shuffled pairs do
        assert fit["heldout_r2"] > fit["shuffled_r2"]
        # its codes live in the target's (standardised) coordinates
        code = aligner.encode(i, tokens["expert"][heldout, i].float())
        goal = aligner.standardise_target(i, tokens["target"][heldout, j].float())
        assert r2_score(code, goal) == pytest.approx(fit["heldout_r2"], abs=0.05)
        # a raw expert direction maps through the linear part: f(h + eps v) - f(h) = eps W v/s
        h = tokens["expert"][:5, i].double()
        v = torch.randn(aligner.expert_dim, generator=torch.Generator().manual_seed(i))
        double = copy.deepcopy(aligner).double()
        with torch.no_grad():
            moved = (double.encode(i, h + 1e-3 * v) - double.encode(i, h)) / 1e-3
            expected = double.encode_direction(i, v.double())
        torch.testing.assert_close(moved, expected.expand_as(moved), rtol=1e-6, atol=1e-8)


def test_translatable_pairing_and_artifacts(translate_run):
    root, module = translate_run["root"], translate_run["module"]
    r2 = module.r2
    window = torch.isfinite(r2[0])
    assert 0 < int(window.sum()) < r2.shape[1]  # only the window's target layers
    (i, j), *_ = module.selected_pairs
    assert r2[i, j] == r2.nan_to_num(-1e9).max()
    payload = json.loads((root / PAIRS_FILE).read_text())
    entry = payload["pairs"][0]
    assert entry["translatability_r2"] == pytest.approx(float(r2[i, j]))
    assert entry["mi_shuffled"] < entry["mi"] or entry["mi"] < 0.05
    tensors, mi_meta = load_artifact(root / MI_FILE, "mi")
    assert {"mi", "mi_shuffled", "r2"} <= set(tensors)
    assert mi_meta["split"] == "held-out token positions"
    assert (root / R2_HEATMAP_FILE).read_bytes()[:4] == b"\x89PNG"
    aligner, metadata = load_alignment(root / ALIGNMENT_FILE)
    assert metadata["objective"] == "translate" and metadata["corpus_positions"] > 100
    # only the used pair's expert layer is stored, with the weights it had in the module
    assert metadata["expert_layers"] == [metadata["captured_expert_layers"][i]]
    torch.testing.assert_close(aligner.encoder_weight[0], module.autoencoders.encoder_weight[i])
    (pair_map,) = metadata["pair_maps"]
    assert set(pair_map) >= {"heldout_r2", "shuffled_r2", "steer_items_r2", "dev_items_r2"}
    assert len(metadata["layer_fits"]) == module.autoencoders.num_layers


def test_translate_and_translatable_need_a_corpus(tiny_dirs, tmp_path):
    datamodule = _datamodule(tiny_dirs, tmp_path / "cache")
    for settings in (dict(objective="translate"), dict(pairing={"select": "translatable"})):
        with pytest.raises(ValueError, match="needs paired token states"):
            _fit(AlignmentModule(**settings), datamodule, tmp_path, monitor=False)


def test_translate_refined_by_gradient_on_token_batches(translate_run, tiny_dirs, tmp_path):
    closed = translate_run["module"]
    datamodule = _datamodule(
        tiny_dirs,
        translate_run["root"] / "cache",
        corpus=_corpus(translate_run["root"]),
        train_on="tokens",
        batch_size=256,
    )
    module = AlignmentModule(
        objective="translate",
        refine=True,
        training=TrainingConfig(lr=1e-4),
        mi=MIConfig(mi_rank=4),
        translate=TranslateConfig(lambdas=[1e-2, 1.0], heldout_rows=200),
    )
    trainer, _ = _fit(module, datamodule, tmp_path, max_epochs=1, monitor=False)
    fit_rows = int((~datamodule.token_pairs()["heldout"]).sum())
    assert trainer.num_training_batches == -(-fit_rows // 256)  # token batches, not items
    start, end = closed.autoencoders, module.autoencoders
    assert not torch.equal(start.encoder_weight, end.encoder_weight)
    tokens = datamodule.token_pairs()
    batch = {"expert": tokens["expert"][:512].float(), "target": tokens["target"][:512].float()}
    with torch.no_grad():
        before = closed._losses(batch)["translate_loss"]
        after = module._losses(batch)["translate_loss"]
    # a small step from the closed-form optimum leaves the translation about as good
    assert float(after) < 1.1 * float(before)
    _, metadata = load_alignment(tmp_path / ALIGNMENT_FILE)
    assert metadata["pair_maps"][0]["heldout_r2"] is not None


def test_refine_needs_translate_and_tokens_need_a_corpus(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="refine applies"):
        AlignmentModule(objective="recon", refine=True)
    with pytest.raises(ValueError, match="train_on 'tokens' needs"):
        _datamodule(tiny_dirs, tmp_path, train_on="tokens")


def test_translate_without_the_matrix_maps_unpaired_layers_by_depth(translate_run, tmp_path):
    datamodule = translate_run["datamodule"]
    (i, j), *_ = translate_run["module"].selected_pairs
    meta = AlignmentModule.describe(datamodule)
    pair = [meta["expert_layers"][i], meta["target_layers"][j]]
    module = AlignmentModule(
        objective="translate",
        pairs=[pair],
        mi=MIConfig(mi_rank=4),
        translate=TranslateConfig(lambdas=[1e-2], heldout_rows=200, matrix=False),
    )
    _fit(module, datamodule, tmp_path, max_epochs=1, monitor=False)
    assert module.r2 is None
    assert module.layer_fits[i]["target_index"] == j
    depth = {
        k: (layer + 0.5) / meta["expert_num_layers"]
        for k, layer in enumerate(meta["expert_layers"])
    }
    for k, fit in module.layer_fits.items():
        if k != i:
            target_depth = (fit["target_layer"] + 0.5) / meta["target_num_layers"]
            assert abs(target_depth - depth[k]) <= 0.5 / meta["target_num_layers"] + 1e-9
    with pytest.raises(ValueError, match="translate.matrix"):
        bad = AlignmentModule(
            pairing=PairingConfig(select="translatable"),
            translate=TranslateConfig(matrix=False),
            mi=MIConfig(mi_rank=4),
        )
        _fit(bad, datamodule, tmp_path / "bad", max_epochs=1, monitor=False)
