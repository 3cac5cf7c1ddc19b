"""ExpertSteer: steer a target LLM with steering vectors derived from an expert model.

The Python API (`expertsteer.api`, re-exported here):

    import expertsteer as es

    expert = es.load_model("qwen2.5-coder-0.5b-instruct")
    target = es.load_model("smollm2-135m-instruct")
    mapping = es.fit_mapping(expert, target, corpus_texts)
    vector = es.train_expert_vector(expert, target, positive_texts, negative_texts, mapping)
    with vector.apply(target.model, alpha=0.3):
        print(target.generate(["Tell me about your day."]))
    vector.save("v.safetensors")

The names load on first use, so `import expertsteer` is cheap and needs neither Lightning nor
matplotlib (the pipeline's extras: `pip install expertsteer[pipeline]`). The algorithms live in
`models`, `data`, `method` (the four steps), `evaluation` and `pipeline`; see README.md and
docs/python-api.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "Model": "expertsteer.api",
    "Mapping": "expertsteer.api",
    "load_model": "expertsteer.api",
    "wrap_model": "expertsteer.api",
    "train_vector": "expertsteer.api",
    "fit_mapping": "expertsteer.api",
    "train_expert_vector": "expertsteer.api",
    "SteeringVectors": "expertsteer.method.vectors",
    "VectorsConfig": "expertsteer.method.rfm",
    "TranslateConfig": "expertsteer.method.translate",
}

__all__ = [
    "Mapping",
    "Model",
    "SteeringVectors",
    "TranslateConfig",
    "VectorsConfig",
    "__version__",
    "fit_mapping",
    "load_model",
    "train_expert_vector",
    "train_vector",
    "wrap_model",
]

if TYPE_CHECKING:
    from expertsteer.api import (
        Mapping,
        Model,
        fit_mapping,
        load_model,
        train_expert_vector,
        train_vector,
        wrap_model,
    )
    from expertsteer.method.rfm import VectorsConfig
    from expertsteer.method.translate import TranslateConfig
    from expertsteer.method.vectors import SteeringVectors


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'expertsteer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
