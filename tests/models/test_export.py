import gguf
import numpy as np
import pytest
import torch

from expertsteer.artifacts import STEERING_FILE, ArtifactError
from expertsteer.method.vectors import SteeringVectors, save_steering
from expertsteer.models.export import (
    ExportError,
    control_vectors,
    export_gguf,
    read_control_vector,
)

WIDTH = 16
SCALES = {3: 2.5, 7: 11.0}
ALPHA = 0.75


def _steering(scales=SCALES, **metadata) -> SteeringVectors:
    generator = torch.Generator().manual_seed(0)
    vectors = {
        layer: torch.nn.functional.normalize(torch.randn(WIDTH, generator=generator), dim=0)
        for layer in scales
    }
    return SteeringVectors(vectors=vectors, norm_scale=dict(scales), metadata=metadata)


def _expected(steering: SteeringVectors, alpha: float) -> dict[int, torch.Tensor]:
    """Independent of `control_vectors`: float64 numpy, then float32."""
    return {
        layer: torch.from_numpy(
            (alpha * steering.norm_scale[layer] * steering.vectors[layer].double().numpy()).astype(
                np.float32
            )
        )
        for layer in steering.layers
    }


def _saved(tmp_path, steering: SteeringVectors):
    return save_steering(tmp_path / "run" / STEERING_FILE, steering)


def _field(reader: gguf.GGUFReader, name: str):
    field = reader.get_field(name)
    assert field is not None, f"missing GGUF key {name}"
    return field.contents()


def test_export_writes_llama_cpp_control_vector(tmp_path):
    steering = _steering(alpha=ALPHA, target_model_id="smollm2-135m-instruct")
    out = export_gguf(_saved(tmp_path, steering), tmp_path / "out.gguf")
    assert out == tmp_path / "out.gguf"

    reader = gguf.GGUFReader(out)
    assert _field(reader, "general.architecture") == "controlvector"
    assert _field(reader, "controlvector.model_hint") == "llama"
    assert _field(reader, "controlvector.layer_count") == 2
    assert _field(reader, "expertsteer.alpha") == pytest.approx(ALPHA)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert sorted(tensors) == ["direction.3", "direction.7"]
    expected = _expected(steering, ALPHA)
    for layer in (3, 7):
        tensor = tensors[f"direction.{layer}"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(n) for n in tensor.shape] == [WIDTH]
        got = torch.from_numpy(np.array(tensor.data))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected[layer], rtol=1e-6, atol=1e-7)
        # alpha and s_j are folded in: the norm is alpha * s_j, not 1.
        assert float(got.norm()) == pytest.approx(ALPHA * SCALES[layer], rel=1e-5)


def test_explicit_alpha_and_hint_override_metadata(tmp_path):
    steering = _steering(alpha=ALPHA, target_model_id="smollm2-135m-instruct")
    out = export_gguf(_saved(tmp_path, steering), tmp_path / "o.gguf", alpha=-2.0, model_hint="x")
    metadata, vectors = read_control_vector(out)
    assert metadata["controlvector.model_hint"] == "x"
    assert metadata["expertsteer.alpha"] == pytest.approx(-2.0)
    for layer, vector in _expected(steering, -2.0).items():
        torch.testing.assert_close(vectors[layer], vector, rtol=1e-6, atol=1e-7)


def test_read_control_vector_round_trip(tmp_path):
    steering = _steering(alpha=ALPHA, target_model_id="qwen2.5-coder-0.5b-instruct")
    out = export_gguf(_saved(tmp_path, steering), tmp_path / "out.gguf")
    metadata, vectors = read_control_vector(out)
    assert metadata["general.architecture"] == "controlvector"
    assert metadata["controlvector.model_hint"] == "qwen2"
    assert list(vectors) == [3, 7]
    for layer, vector in _expected(steering, ALPHA).items():
        torch.testing.assert_close(vectors[layer], vector, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("metadata", "hint"),
    [
        ({"target_model_id": "gemma-3-270m"}, "gemma3"),
        ({"target_model_id": "some/hub-model", "target_architecture": "phi3"}, "phi3"),
    ],
)
def test_model_hint_from_metadata(tmp_path, metadata, hint):
    out = export_gguf(_saved(tmp_path, _steering(**metadata)), tmp_path / "o.gguf", alpha=1.0)
    assert read_control_vector(out)[0]["controlvector.model_hint"] == hint


def test_model_hint_from_gguf_target_file(tmp_path):
    target = tmp_path / "target.gguf"
    writer = gguf.GGUFWriter(target, "qwen3")
    writer.add_tensor("token_embd.weight", np.zeros((4, WIDTH), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    steering = _steering(target_model_id=str(target))
    out = export_gguf(_saved(tmp_path, steering), tmp_path / "o.gguf", alpha=1.0)
    assert read_control_vector(out)[0]["controlvector.model_hint"] == "qwen3"


def test_directory_input(tmp_path):
    steering = _steering(alpha=ALPHA, target_model_id="smollm2-135m-instruct")
    _saved(tmp_path, steering)
    _, vectors = read_control_vector(export_gguf(tmp_path / "run", tmp_path / "out.gguf"))
    torch.testing.assert_close(vectors[7], _expected(steering, ALPHA)[7], rtol=1e-6, atol=1e-7)


def test_directory_without_artifact(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=f"no {STEERING_FILE} in"):
        export_gguf(tmp_path / "empty", tmp_path / "out.gguf", alpha=1.0, model_hint="llama")


def test_missing_artifact_file(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        export_gguf(tmp_path / "nope.safetensors", tmp_path / "o.gguf", 1.0, "llama")


def test_block_zero_cannot_be_exported(tmp_path):
    steering = _steering({0: 1.0, 4: 2.0}, alpha=ALPHA, target_model_id="smollm2-135m-instruct")
    with pytest.raises(ExportError, match=r"block\(s\) \[0\].*direction\.0"):
        control_vectors(steering, ALPHA)
    with pytest.raises(ValueError, match="block 0"):
        export_gguf(_saved(tmp_path, steering), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_non_finite_alpha(alpha):
    with pytest.raises(ExportError, match="finite"):
        control_vectors(_steering(), alpha)


def test_control_vectors_values():
    steering = _steering()
    vectors = control_vectors(steering, ALPHA)
    assert list(vectors) == [3, 7]
    for layer, vector in _expected(steering, ALPHA).items():
        assert vectors[layer].dtype == torch.float32
        torch.testing.assert_close(vectors[layer], vector, rtol=1e-6, atol=1e-7)


def test_missing_alpha(tmp_path):
    path = _saved(tmp_path, _steering(target_model_id="smollm2-135m-instruct"))
    with pytest.raises(ExportError, match="--alpha"):
        export_gguf(path, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_unknown_model_hint(tmp_path):
    path = _saved(tmp_path, _steering(alpha=ALPHA, target_model_id="some/hub-model"))
    with pytest.raises(ExportError, match="--model-hint"):
        export_gguf(path, tmp_path / "out.gguf")


@pytest.mark.parametrize("name", ["out.safetensors", "out", "out.gguf.tmp"])
def test_output_needs_gguf_suffix(tmp_path, name):
    path = _saved(tmp_path, _steering(alpha=ALPHA, target_model_id="smollm2-135m-instruct"))
    with pytest.raises(ExportError, match=r"\.gguf"):
        export_gguf(path, tmp_path / name)
    assert not (tmp_path / name).exists()


def test_positions_other_than_all_warn(tmp_path):
    steering = _steering(alpha=ALPHA, target_model_id="smollm2-135m-instruct", positions="prompt")
    with pytest.warns(UserWarning, match="every token"):
        export_gguf(_saved(tmp_path, steering), tmp_path / "out.gguf")


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_failed_export_keeps_existing_file(tmp_path, monkeypatch):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous control vector")
    good = _saved(tmp_path, _steering(alpha=ALPHA, target_model_id="smollm2-135m-instruct"))

    # Refused before writing (no alpha).
    no_alpha = save_steering(tmp_path / "b.safetensors", _steering(target_model_id="x"))
    with pytest.raises(ExportError):
        export_gguf(no_alpha, out)
    assert out.read_bytes() == b"previous control vector"

    # Fails half-way through writing the tensors.
    def broken(self, *args, **kwargs):
        self.fout[0].write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(ExportError, match="disk full"):
        export_gguf(good, out)
    assert out.read_bytes() == b"previous control vector"
    assert _leftovers(tmp_path) == []

    monkeypatch.undo()
    export_gguf(good, out)
    assert read_control_vector(out)[0]["general.architecture"] == "controlvector"
    assert _leftovers(tmp_path) == []


def test_read_control_vector_rejects_other_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((2, WIDTH), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ExportError, match="not a control vector"):
        read_control_vector(path)


def test_unwritable_output_is_one_clear_error(tmp_path):
    path = _saved(tmp_path, _steering(alpha=ALPHA, target_model_id="smollm2-135m-instruct"))
    blocker = tmp_path / "a_file"  # a folder cannot be made under a file, even by root
    blocker.write_text("")
    with pytest.raises(ExportError, match="cannot write .*choose a writable folder"):
        export_gguf(path, blocker / "out.gguf")
