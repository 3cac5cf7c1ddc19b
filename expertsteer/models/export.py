"""Export a steering artifact as a llama.cpp control vector (`.gguf`).

The file follows the format llama.cpp reads in `common_control_vector_load_one`
(common/common.cpp) and repeng writes in `ControlVector.export_gguf`:

* `general.architecture = "controlvector"`, `controlvector.model_hint` (the target's llama.cpp
  architecture, e.g. `llama` for SmolLM2, `qwen2` for Qwen2.5, `gemma3` for Gemma 3) and
  `controlvector.layer_count` (the number of direction tensors). llama.cpp reads neither key;
  they tell people which model the file is for.
* one float32 tensor `direction.<n>` of shape [n_embd] per steered layer. llama.cpp adds it,
  times the user's scale, to `l_out` of its 0-based layer `n` (`build_cvec(cur, il)` at the end
  of each block of the graph loop, `llama_adapter_cvec::apply` in src/llama-adapter.cpp).
  That is the output of HF decoder block `n`, which is what ExpertSteer calls target block `j`:
  so `direction.<j>` holds `alpha * s_j * v_j`, the same addition `expertsteer.method.steer` makes.
* llama.cpp rejects `direction.0` (it has no slot for the output of block 0, and refuses the
  whole file when it meets one), so a steering artifact that steers block 0 cannot be
  exported. It silently ignores layers at or beyond the model's block count and checks only
  that n_embd matches the model.
* extra keys `expertsteer.alpha` and `expertsteer.metadata` (the steering artifact's JSON
  metadata) record where the file came from; llama.cpp ignores them.

`alpha` is folded into the vectors, so the file is used at scale 1.0:

    llama-cli -m target.gguf --control-vector-scaled OUT.gguf 1.0

(`--control-vector OUT.gguf` is the same at scale 1). `expertsteer export-gguf RUN_DIR` passes
the alpha the evaluation chose on dev (the run's `metrics.json`); otherwise `alpha` is taken
from the artifact's recorded choice (`SteeringVectors.choice`: written beside the vectors by
the evaluation, or embedded by the Python API), steering the chosen layers; otherwise it must
be given.

llama.cpp adds a control vector to every token, prompt and generated alike: only the `all`
position mode of `expertsteer.method.steer` is representable. A steering run that used other
positions behaves differently in llama.cpp (a warning says so when the metadata records one).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from expertsteer.artifacts import STEERING_FILE
from expertsteer.cache import atomic_file
from expertsteer.errors import ExpertSteerError
from expertsteer.method.vectors import SteeringVectors, check_alpha, load_steering
from expertsteer.models.zoo import PACKAGED

log = logging.getLogger(__name__)

ARCHITECTURE = "controlvector"
MODEL_HINT_KEY = f"{ARCHITECTURE}.model_hint"
LAYER_COUNT_KEY = f"{ARCHITECTURE}.layer_count"
ALPHA_KEY = "expertsteer.alpha"
METADATA_KEY = "expertsteer.metadata"
TENSOR_PREFIX = "direction."
GGUF_ARCHITECTURES = {"gemma3_text": "gemma3"}
"""transformers `model_type` -> llama.cpp architecture name, where the two differ."""


class ExportError(ExpertSteerError, ValueError):
    """A steering artifact cannot be written as, or a file is not, a llama.cpp control vector."""


def control_vectors(steering: SteeringVectors, alpha: float) -> dict[int, torch.Tensor]:
    """llama.cpp layer n -> float32 `alpha * s_n * v_n`, the vector added after block n.

    llama.cpp's layer n is the 0-based target block n (see the module docstring); block 0 has
    no llama.cpp slot and raises.
    """
    try:
        alpha = check_alpha(alpha)
    except ValueError as error:
        raise ExportError(str(error)) from None
    if min(steering.layers) <= 0:
        raise ExportError(
            f"the artifact steers target block(s) {[j for j in steering.layers if j <= 0]}; "
            "llama.cpp control vectors cannot steer the output of block 0 (it rejects "
            "`direction.0`): re-run the steering stage without block 0 in the layer pairs"
        )
    out = {}
    for layer in steering.layers:
        scale = alpha * float(steering.norm_scale[layer])
        if not math.isfinite(scale):
            raise ExportError(f"norm scale of block {layer} is {steering.norm_scale[layer]}")
        out[layer] = (steering.vectors[layer].double() * scale).float()
    return out


def export_gguf(
    steering_path: str | Path,
    out_path: str | Path,
    alpha: float | None = None,
    model_hint: str | None = None,
) -> Path:
    """Write the steering artifact at `steering_path` as a llama.cpp control vector.

    `steering_path` is a `steering.safetensors` file or a run directory holding one. `alpha`
    defaults to the artifact's recorded choice (`SteeringVectors.choice`), whose layers are
    then the ones written; `model_hint`
    to the target's llama.cpp architecture, known from metadata `target_architecture`, a
    packaged target model, or a `.gguf` target file. `out_path` must end in `.gguf`; it is
    written beside itself and renamed, so an existing file is replaced only on success.
    """
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".gguf":
        raise ExportError(f"the output must be a .gguf file, got '{out_path}'")
    if out_path.is_dir():
        raise ExportError(f"the output '{out_path}' is a directory; name a .gguf file")
    steering = load_steering(_steering_file(steering_path))
    metadata = steering.metadata
    if metadata.get("conditioned"):
        raise ExportError(
            f"{steering_path}: an input-dependent method (its push is read from each prompt by "
            f"its {metadata['conditioned'].get('reader', 'expert')} reader) has no fixed "
            "control vector to export; use `expertsteer generate --steer RUN --method ...`"
        )
    choice = steering.choice
    if alpha is None:
        if choice is None:
            raise ExportError(
                f"{steering_path}: the artifact records no chosen alpha (the evaluation stage "
                "records it beside the vectors; older artifacts lack it); pass the steering "
                "strength with --alpha"
            )
        alpha = float(choice["alpha"])
    if choice is not None and sorted(choice["layers"]) != steering.layers:
        # The strength was chosen for these layers alone.
        steering = SteeringVectors(
            {j: steering.vectors[j] for j in choice["layers"]},
            {j: steering.norm_scale[j] for j in choice["layers"]},
            {},
            metadata,
        )
    vectors = control_vectors(steering, alpha)
    model_hint = model_hint or _model_hint(metadata)
    if not model_hint:
        raise ExportError(
            f"{steering_path}: cannot tell the target's llama.cpp architecture from the "
            f"artifact (target_model_id={metadata.get('target_model_id')!r}); pass it with "
            "--model-hint (e.g. llama, qwen2, gemma3)"
        )
    positions = choice["positions"] if choice is not None else metadata.get("positions", "all")
    if positions != "all":
        warnings.warn(
            f"the artifact records positions={positions!r}, but llama.cpp steers every token "
            "(positions 'all'); expect different behaviour than in ExpertSteer",
            stacklevel=2,
        )

    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out_path) as tmp:
            writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
            try:
                writer.add_string(MODEL_HINT_KEY, model_hint)
                writer.add_uint32(LAYER_COUNT_KEY, len(vectors))
                writer.add_float32(ALPHA_KEY, float(alpha))
                writer.add_string(METADATA_KEY, json.dumps(metadata))
                for layer, vector in vectors.items():
                    writer.add_tensor(f"{TENSOR_PREFIX}{layer}", vector.numpy())
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
    except OSError as error:
        raise ExportError(
            f"cannot write {out_path} ({error.strerror or error}); choose a writable folder"
        ) from error
    log.info(
        "wrote %s: %d control vector(s) for %s at layers %s, alpha %g",
        out_path,
        len(vectors),
        model_hint,
        sorted(vectors),
        alpha,
    )
    return out_path


def read_control_vector(path: str | Path) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """The key-value metadata and the `direction.<n>` tensors (by n) of a control vector file."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"control vector file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise ExportError(f"{path} is not a readable GGUF file ({error})") from error
    metadata = {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.")
    }
    if metadata.get("general.architecture") != ARCHITECTURE:
        raise ExportError(
            f"{path} has general.architecture={metadata.get('general.architecture')!r}, "
            f"not '{ARCHITECTURE}': it is not a control vector"
        )
    vectors = {}
    for tensor in reader.tensors:
        suffix = tensor.name.removeprefix(TENSOR_PREFIX)
        if suffix == tensor.name or not suffix.isdigit() or int(suffix) <= 0:
            raise ExportError(f"{path}: tensor '{tensor.name}' is not a valid direction.<n>")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ExportError(f"{path}: tensor '{tensor.name}' is {tensor.tensor_type.name}")
        vectors[int(suffix)] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    return metadata, dict(sorted(vectors.items()))


def _steering_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / STEERING_FILE
        if not path.is_file():
            raise ExportError(
                f"no {STEERING_FILE} in {path.parent}; run the steering stage there first "
                "or point to the artifact file"
            )
    return path


def _model_hint(metadata: dict[str, Any]) -> str | None:
    """The target's llama.cpp architecture, where the artifact's metadata tells it."""
    if metadata.get("target_architecture"):
        return str(metadata["target_architecture"])
    target = metadata.get("target_model_id")
    if not target:
        return None
    if target in PACKAGED:
        architecture = PACKAGED[target].architecture
        return GGUF_ARCHITECTURES.get(architecture, architecture)
    if str(target).endswith(".gguf") and Path(target).is_file():
        field = gguf.GGUFReader(target).get_field("general.architecture")
        return field.contents() if field is not None else None
    return None
