import pytest

from expertsteer.decoder import Decoder
from expertsteer.zoo import load_model

PAIR = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")


@pytest.fixture(autouse=True)
def isolated_cache():
    """Slow tests use the user's real cache: converting packaged models once is the point."""


@pytest.fixture(scope="session", params=PAIR)
def packaged(request):
    """A packaged model loaded through the zoo (converted on first use), wrapped for nnsight."""
    return Decoder.from_loaded(load_model(request.param))
