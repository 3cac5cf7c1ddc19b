import pytest
import torch

from expertsteer.method.extractors import EXTRACTORS, extract
from expertsteer.method.rfm import RFMError


def _shifted(n=200, d=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.arange(n) % 2
    truth = torch.zeros(d, dtype=torch.float64)
    truth[4] = 1.0
    return x + 2.0 * y[:, None] * truth, y, truth


@pytest.mark.parametrize("method", sorted(EXTRACTORS))
def test_every_extractor_returns_a_unit_vector(method):
    x, y, truth = _shifted()
    xv, yv, _ = _shifted(seed=1)
    direction = extract(method, x, y, xv, yv)
    assert direction.shape == (12,)
    assert torch.isclose(direction.norm(), torch.tensor(1.0, dtype=torch.float64))
    if method != "random":
        assert float(direction @ truth) > 0.8, method


def test_random_direction_is_seeded_and_unrelated_to_labels():
    x, y, truth = _shifted(d=512)
    first, again = extract("random", x, y, seed=3), extract("random", x, y, seed=3)
    assert torch.equal(first, again)
    assert not torch.equal(first, extract("random", x, y, seed=4))
    assert abs(float(first @ truth)) < 0.2


def test_unknown_method_and_bad_labels_are_named():
    x, y, _ = _shifted()
    with pytest.raises(ValueError, match="unknown extractor 'caa'"):
        extract("caa", x, y)
    with pytest.raises(ValueError, match="needs validation data"):
        extract("rfm", x, y)
    with pytest.raises(RFMError, match="both 0 and 1"):
        extract("mean_diff", x, torch.zeros_like(y))


def test_the_random_control_is_drawn_on_the_cpu_and_put_where_the_states_are():
    """`meta` stands in for an accelerator; the draw itself does not depend on the device."""
    x = torch.zeros(6, 5, dtype=torch.float32)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    on_cpu = EXTRACTORS["random"](x, y, seed=4)
    on_meta = EXTRACTORS["random"](x.to("meta"), y.to("meta"), seed=4)
    assert on_meta.device.type == "meta" and on_meta.shape == on_cpu.shape
    assert on_meta.dtype == on_cpu.dtype == torch.float32
