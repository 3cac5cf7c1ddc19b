"""The Python API (`expertsteer.api`, re-exported by `import expertsteer`): light to import,
the same vectors as the pipeline's vectors stage for the same texts and settings, mappings,
and the errors users can cause."""

import subprocess
import sys

import lightning as L
import pytest
import torch

import expertsteer as es
from expertsteer.artifacts import STEERING_FILE
from expertsteer.method.rfm import VectorsConfig
from expertsteer.method.vectors import load_steering
from lightning_modules.vectors import VectorsModule
from tests.tiny_data import prepared, tiny_datamodule

PIPELINE_ONLY = ("lightning", "lightning_fabric", "pytorch_lightning", "matplotlib", "torchmetrics")


def test_import_needs_neither_lightning_nor_matplotlib():
    code = (
        "import sys, expertsteer as es\n"
        "names = [es.load_model, es.wrap_model, es.train_vector, es.fit_mapping,\n"
        "         es.train_expert_vector, es.SteeringVectors, es.Mapping, es.Model]\n"
        "import expertsteer.api, expertsteer.method.hooks, expertsteer.models.export\n"
        f"print(','.join(m for m in sys.modules if m.split('.')[0] in {PIPELINE_ONLY!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"pipeline modules imported: {result.stdout}"
    assert es.__version__ and "train_vector" in dir(es)
    with pytest.raises(AttributeError):
        es.no_such_name  # noqa: B018


# -- the same vectors as the vectors stage ---------------------------------------------------


@pytest.fixture(scope="module")
def concept(tiny_dirs, tmp_path_factory):
    """The tiny pair on a concept task: the data module the stage fits on, and the API's
    models loaded by the same names."""
    data = prepared(
        tiny_datamodule(tiny_dirs, tmp_path_factory.mktemp("cache"), task="sentiment_concept")
    )
    models = {side: es.load_model(str(tiny_dirs[side])) for side in ("expert", "target")}
    return data, models


def _texts(data, split):
    items = data.split_items()[split]
    return (
        [item.prompt for item in items if item.label == 1],
        [item.prompt for item in items if item.label == 0],
    )


def _stage(module, data, tmp_path):
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=20,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=data)
    return load_steering(tmp_path / STEERING_FILE)


def _assert_same(api, stage, layer):
    cosine = float(api.vectors[layer].double() @ stage.vectors[layer].double())
    assert cosine > 1 - 1e-5, cosine
    assert api.norm_scale[layer] == pytest.approx(stage.norm_scale[layer], rel=1e-5)
    assert api.directions[layer].shape == stage.directions[layer].shape


@pytest.mark.parametrize("method", ["mean_diff", "rfm"])
def test_target_vectors_equal_the_stages(concept, tmp_path, method):
    data, models = concept
    config = VectorsConfig(iterations=2)
    stage = _stage(
        VectorsModule(method=method, source="target", pairs=[[0, 1]], rfm=config), data, tmp_path
    )
    positive, negative = _texts(data, "steer")
    api = es.train_vector(
        models["target"],
        positive,
        negative,
        layers=[1],
        method=method,
        position="last",  # the data module's default
        validation=_texts(data, "dev"),
        config=config,
    )
    _assert_same(api, stage, 1)
    assert api.metadata["target_model_id"] == stage.metadata["target_model_id"]
    assert api.metadata["target_weights_sha256"] == stage.metadata["target_weights_sha256"]
    if method == "rfm":
        assert api.metadata["fits"][0]["val_auroc"] == pytest.approx(
            stage.metadata["fits"][0]["val_auroc"]
        )


@pytest.fixture(scope="module")
def mapping(concept, tmp_path_factory):
    _, models = concept
    texts = [f"Sentence number {k} says something plain about the weather." for k in range(24)]
    mapping = es.fit_mapping(models["expert"], models["target"], texts, pairs=[(2, 1)])
    path = mapping.save(tmp_path_factory.mktemp("mapping") / "alignment.safetensors")
    return mapping, path


@pytest.mark.parametrize(("method", "space"), [("rfm", "encoded"), ("mean_diff", "raw")])
def test_expert_vectors_through_a_mapping_equal_the_stages(
    concept, mapping, tmp_path, method, space
):
    data, models = concept
    mapping, path = mapping
    config = VectorsConfig(iterations=2, space=space)
    module = VectorsModule(method=method, alignment_file=str(path), pairs=[[2, 1]], rfm=config)
    stage = _stage(module, data, tmp_path)
    positive, negative = _texts(data, "steer")
    api = es.train_expert_vector(
        models["expert"],
        models["target"],
        positive,
        negative,
        mapping,
        method=method,
        space=space,
        position="last",  # the data module's default
        validation=_texts(data, "dev"),
        config=config,
    )
    _assert_same(api, stage, 1)
    assert api.metadata["space"] == stage.metadata["space"] == space
    assert api.metadata["expert_model_id"] == stage.metadata["expert_model_id"]


def test_mapping_records_its_fit_and_round_trips(concept, mapping):
    _, models = concept
    mapping, path = mapping
    (entry,) = mapping.metadata["pair_maps"]
    assert (entry["expert_layer"], entry["target_layer"]) == (2, 1)
    assert entry["heldout_r2"] > entry["shuffled_r2"]
    assert mapping.metadata["positions"] > 100
    back = es.Mapping.load(path)
    assert back.pairs == [(2, 1)] and back.expert_layers == [2]
    states = torch.randn(5, 64)
    torch.testing.assert_close(back.aligner.encode(0, states), mapping.aligner.encode(0, states))
    # Default pairing: the target's default block with the expert block at the same depth.
    texts = [f"Another plain sentence, number {k}." for k in range(12)]
    default = es.fit_mapping(models["expert"], models["target"], texts)
    assert default.pairs == [(1, 1)]  # target block 1 of 3 ~ expert block 1 of 4


def test_api_steers_the_plain_model_and_round_trips(concept, tmp_path):
    _, models = concept
    target = models["target"]
    vector = es.train_vector(target, ["good day"] * 3 + ["nice one"], ["bad day", "awful one"] * 2)
    assert vector.layers == [1]  # a third of the way up 3 blocks
    prompts = ["Hello", "A longer prompt here"]
    plain = target.generate(prompts, max_new_tokens=4)
    with vector.apply(target.model, alpha=20.0):
        steered = target.generate(prompts, max_new_tokens=4)
    assert steered != plain and target.generate(prompts, max_new_tokens=4) == plain
    path = vector.with_choice(20.0).save(tmp_path / "v.safetensors")
    with es.SteeringVectors.load(path).apply(target):
        assert target.generate(prompts, max_new_tokens=4) == steered


def test_user_errors_are_named(concept):
    _, models = concept
    target = models["target"]
    with pytest.raises(TypeError, match="list of texts"):
        es.train_vector(target, "one string", ["a", "b"])
    with pytest.raises(ValueError, match="at least 2 positive"):
        es.train_vector(target, ["only one"], ["a", "b"])
    with pytest.raises(ValueError, match="method"):
        es.train_vector(target, ["a", "b"], ["c", "d"], method="magic")
    with pytest.raises(ValueError, match="does not exist"):
        es.train_vector(target, ["a", "b"], ["c", "d"], layers=[7])
    with pytest.raises(ValueError, match="several target blocks"):
        es.fit_mapping(models["expert"], target, ["some text"] * 4, pairs=[(1, 0), (1, 2)])
    other = es.Mapping(models["expert"], [(1, 1)], {"expert_model_id": "someone-else"})
    with pytest.raises(ValueError, match="fitted for expert"):
        es.train_expert_vector(models["expert"], target, ["a", "b"], ["c", "d"], other)
