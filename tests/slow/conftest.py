import pytest

from expertsteer.models.causal_lm import CausalLM
from expertsteer.models.zoo import load_model

PAIR = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")


@pytest.fixture(autouse=True)
def isolated_cache():
    """Slow tests use the user's real cache: converting packaged models once is the point."""


SECOND_TARGET = "gemma-3-270m"


@pytest.fixture(scope="session")
def decoders():
    """Packaged models loaded through the zoo (converted on first use), wrapped for nnsight."""
    loaded: dict[str, CausalLM] = {}

    def get(name: str) -> CausalLM:
        if name not in loaded:
            loaded[name] = CausalLM.from_loaded(load_model(name))
        return loaded[name]

    return get


@pytest.fixture(params=PAIR)
def packaged(request, decoders):
    """The default instruct pair (SmolLM2 target, Qwen expert)."""
    return decoders(request.param)


@pytest.fixture(params=[*PAIR, SECOND_TARGET])
def any_packaged(request, decoders):
    """Every packaged model the default install provides, base model included."""
    return decoders(request.param)
