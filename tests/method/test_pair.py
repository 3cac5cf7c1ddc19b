"""MI estimators against the analytic MI of correlated Gaussians, a float64 NumPy CCA reference
and a brute-force KSG; pair selection in depth windows; the pairs payload and the heatmap."""

import json
import logging
import math

import numpy as np
import pytest
import torch

from expertsteer.evaluation.plots import mi_heatmap
from expertsteer.method.pair import (
    MIConfig,
    PairingConfig,
    PairingError,
    gaussian_mi,
    ksg_mi,
    mi_matrix,
    pairs_payload,
    select_pairs,
)

RHOS_8 = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])


def correlated(n, rhos, seed, mix=True):
    """x, y whose canonical correlations are `rhos`, seen through random invertible linear maps
    and shifts; returns (x, y, analytic MI in nats)."""
    rng = np.random.default_rng(seed)
    rhos = np.asarray(rhos, dtype=float)
    d = len(rhos)
    u = rng.normal(size=(n, d))
    v = rhos * u + np.sqrt(1 - rhos**2) * rng.normal(size=(n, d))
    if mix:
        u = u @ rng.normal(size=(d, d)) + rng.normal(size=d)
        v = v @ rng.normal(size=(d, d)) - 3.0
    return torch.from_numpy(u), torch.from_numpy(v), float(-0.5 * np.log(1 - rhos**2).sum())


def numpy_gaussian_mi(x, y, rank, shrinkage):
    """Textbook CCA from covariance matrices: PCA by eigh of each covariance, then the singular
    values of Sxx^-1/2 Sxy Syy^-1/2, each scaled by (1 - shrinkage)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)

    def pca(z):
        z = z - z.mean(0)
        _, vectors = np.linalg.eigh(z.T @ z / (n - 1))
        return z @ vectors[:, ::-1][:, : min(rank, n - 1, z.shape[1])]

    def inv_sqrt(cov):
        values, vectors = np.linalg.eigh(cov)
        return vectors @ np.diag(values**-0.5) @ vectors.T

    a, b = pca(x), pca(y)
    sab = a.T @ b / (n - 1)
    whitened = inv_sqrt(a.T @ a / (n - 1)) @ sab @ inv_sqrt(b.T @ b / (n - 1))
    rho = (1 - shrinkage) * np.linalg.svd(whitened, compute_uv=False)
    return float(-0.5 * np.log(1 - rho**2).sum())


def brute_force_ksg(x, y, k):
    """Kraskov algorithm 1 with explicit loops on PCA-whitened inputs (all components kept)."""

    def whiten(z):
        z = z - z.mean(0)
        values, vectors = np.linalg.eigh(z.T @ z / (len(z) - 1))
        return z @ vectors / np.sqrt(values)

    x, y = whiten(np.asarray(x, float)), whiten(np.asarray(y, float))
    n = len(x)
    total = 0.0
    for i in range(n):
        joint = sorted(
            max(np.abs(x[i] - x[j]).max(), np.abs(y[i] - y[j]).max()) for j in range(n) if j != i
        )
        eps = joint[k - 1]
        nx = sum(np.abs(x[i] - x[j]).max() < eps for j in range(n) if j != i)
        ny = sum(np.abs(y[i] - y[j]).max() < eps for j in range(n) if j != i)
        total += digamma(nx + 1) + digamma(ny + 1)
    return digamma(k) + digamma(n) - total / n


def digamma(value):
    return float(torch.special.digamma(torch.tensor(float(value), dtype=torch.float64)))


def layered(n, widths, latent, seed, noise=1.0):
    """[n, L, max_width] states sharing `latent`, each layer with its own mixing and noise
    level, zero-padded to a common width (the padding is rank-deficient on purpose)."""
    rng = np.random.default_rng(seed)
    width = max(widths)
    out = np.zeros((n, len(widths), width))
    for index, w in enumerate(widths):
        mixing = rng.normal(size=(latent.shape[1], w))
        out[:, index, :w] = latent @ mixing + noise * (index + 0.5) * rng.normal(size=(n, w))
    return torch.from_numpy(out)


# --- Gaussian estimator ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_matches_analytic_mi_within_5_percent(seed):
    x, y, truth = correlated(2000, RHOS_8, seed)
    assert truth == pytest.approx(2.1996, abs=1e-4)
    assert gaussian_mi(x, y) == pytest.approx(truth, rel=0.05)


@pytest.mark.parametrize("rank", [16, 4])
def test_gaussian_matches_numpy_cca_reference(rank):
    rng = np.random.default_rng(3)
    latent = rng.normal(size=(300, 5))
    x = latent @ rng.normal(size=(5, 10)) + rng.normal(size=(300, 10))
    y = latent @ rng.normal(size=(5, 7)) + 0.5 * rng.normal(size=(300, 7))
    expected = numpy_gaussian_mi(x, y, rank, 0.01)
    got = gaussian_mi(torch.from_numpy(x), torch.from_numpy(y), rank=rank, shrinkage=0.01)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got > 0.5


def test_gaussian_invariant_to_invertible_maps_and_shifts():
    x, y, _ = correlated(500, RHOS_8, 4, mix=False)
    rng = np.random.default_rng(5)
    mx = torch.from_numpy(rng.normal(size=(8, 8)))
    my = torch.from_numpy(rng.normal(size=(8, 8)) @ np.diag(np.logspace(-2, 2, 8)))
    base = gaussian_mi(x, y)
    assert gaussian_mi(x @ mx + 7.0, y) == pytest.approx(base, rel=1e-9)
    assert gaussian_mi(x, y @ my - 100.0) == pytest.approx(base, rel=1e-9)
    assert gaussian_mi(x @ mx, y @ my) == pytest.approx(base, rel=1e-9)
    assert gaussian_mi(y, x) == pytest.approx(base, rel=1e-9)


def test_gaussian_independent_is_near_zero():
    x, y, truth = correlated(2000, np.zeros(8), 6)
    assert truth == 0.0
    # Plug-in bias under independence is about d_x d_y / (2n) = 0.016 nats.
    assert 0.0 <= gaussian_mi(x, y) < 0.05


def test_shrinkage_caps_each_component_of_identical_inputs():
    x, _, _ = correlated(200, RHOS_8, 7)
    for shrinkage in (1e-3, 0.1):
        cap = -0.5 * math.log(1 - (1 - shrinkage) ** 2)
        assert gaussian_mi(x, x, shrinkage=shrinkage) == pytest.approx(8 * cap, rel=1e-9)
    assert gaussian_mi(x, x, rank=3, shrinkage=0.1) == pytest.approx(
        -1.5 * math.log(1 - 0.81), rel=1e-9
    )


# --- KSG estimator --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_ksg_matches_analytic_mi_within_10_percent(seed):
    # KSG is reliable in low dimension with moderate MI: 2 + 2 dims, MI = 0.734 nats, n = 2000.
    x, y, truth = correlated(2000, [0.8, 0.6], seed)
    assert ksg_mi(x, y, k=3) == pytest.approx(truth, rel=0.10)


def test_ksg_independent_is_near_zero():
    x, y, _ = correlated(2000, np.zeros(4), 8)
    assert abs(ksg_mi(x, y)) < 0.06


def test_ksg_matches_brute_force_reference():
    x, y, _ = correlated(60, [0.7, 0.3, 0.5], 9)
    for k in (1, 3):
        expected = brute_force_ksg(x.numpy(), y.numpy(), k)
        assert ksg_mi(x, y, k=k, rank=8) == pytest.approx(expected, rel=1e-9, abs=1e-12)


# --- MI matrix ------------------------------------------------------------------------------


def test_mi_matrix_gaussian_equals_pair_loop():
    latent = np.random.default_rng(10).normal(size=(120, 4))
    expert = layered(120, [10, 6, 10], latent, 11)
    target = layered(120, [7, 7, 5, 7], latent, 12, noise=2.0)
    config = MIConfig(mi_rank=4, shrinkage=0.01)
    mi = mi_matrix(expert, target.float(), config)
    assert mi.shape == (3, 4) and mi.dtype == torch.float64
    loop = [
        [gaussian_mi(expert[:, i], target[:, j].float(), rank=4, shrinkage=0.01) for j in range(4)]
        for i in range(3)
    ]
    torch.testing.assert_close(mi, torch.tensor(loop, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert mi.std() > 0.1


def test_mi_matrix_ksg_equals_pair_loop():
    latent = np.random.default_rng(13).normal(size=(150, 2))
    expert = layered(150, [5, 3], latent, 14)
    target = layered(150, [4, 6, 4], latent, 15)
    config = MIConfig(estimator="ksg", ksg_k=4, ksg_rank=3)
    mi = mi_matrix(expert, target, config)
    loop = [[ksg_mi(expert[:, i], target[:, j], k=4, rank=3) for j in range(3)] for i in range(2)]
    torch.testing.assert_close(mi, torch.tensor(loop, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert mi.std() > 0.05


def test_ksg_max_samples_is_seeded():
    latent = np.random.default_rng(16).normal(size=(200, 2))
    expert, target = layered(200, [3, 3], latent, 17), layered(200, [3], latent, 18)
    full = mi_matrix(expert, target, MIConfig(estimator="ksg"))
    assert torch.equal(mi_matrix(expert, target, MIConfig(estimator="ksg", max_samples=200)), full)
    sub = mi_matrix(expert, target, MIConfig(estimator="ksg", max_samples=80, seed=1))
    again = mi_matrix(expert, target, MIConfig(estimator="ksg", max_samples=80, seed=1))
    other = mi_matrix(expert, target, MIConfig(estimator="ksg", max_samples=80, seed=2))
    assert torch.equal(sub, again)
    assert not torch.equal(sub, other) and not torch.equal(sub, full)


@pytest.mark.parametrize("estimator", ["gaussian", "ksg"])
def test_constant_layer_gives_nan_and_is_never_selected(estimator, caplog):
    latent = np.random.default_rng(19).normal(size=(100, 3))
    expert = layered(100, [6, 6, 6], latent, 20)
    expert[:, 0] = torch.arange(6.0)
    target = layered(100, [5, 5, 5, 5], latent, 21)
    with caplog.at_level(logging.WARNING, logger="expertsteer.method.pair"):
        mi = mi_matrix(expert.float(), target.float(), MIConfig(estimator=estimator))
    assert "expert layer indices [0]" in caplog.text
    assert torch.isnan(mi[0]).all() and torch.isfinite(mi[1:]).all()
    pairs = select_pairs(mi, PairingConfig(top_k=2, window=(0.0, 1.0)))
    assert len(pairs) == 2 and all(i != 0 for i, _ in pairs)


def test_saturated_sample_warns(caplog):
    x, y, _ = correlated(20, RHOS_8, 22)
    with caplog.at_level(logging.WARNING, logger="expertsteer.method.pair"):
        value = gaussian_mi(torch.cat([x, x**2], 1), torch.cat([y, y**2], 1), rank=16)
    assert "saturate" in caplog.text and math.isfinite(value)


def test_non_finite_and_mismatched_inputs_raise():
    expert = torch.randn(50, 2, 4)
    target = torch.randn(50, 3, 5)
    bad = target.clone()
    bad[7, 2, 1] = math.nan
    with pytest.raises(PairingError, match="target layer index 2"):
        mi_matrix(expert, bad)
    bad = expert.clone()
    bad[0, 1, 0] = math.inf
    with pytest.raises(PairingError, match="expert layer index 1"):
        mi_matrix(bad, target, MIConfig(estimator="ksg"))
    with pytest.raises(PairingError, match="NaN or inf"):
        gaussian_mi(expert[:, 0], torch.full((50, 3), math.nan))
    with pytest.raises(PairingError, match="same prompts"):
        mi_matrix(expert, target[:40])
    with pytest.raises(PairingError, match="at least 3 prompts"):
        gaussian_mi(expert[:2, 0], target[:2, 0])
    with pytest.raises(PairingError, match=r"\[n, layers, d\]"):
        mi_matrix(expert[:, 0], target)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"estimator": "mine"}, "estimator"),
        ({"mi_rank": 0}, "mi_rank"),
        ({"shrinkage": 1.0}, "shrinkage"),
        ({"shrinkage": -0.1}, "shrinkage"),
        ({"ksg_k": 0}, "ksg_k"),
        ({"ksg_rank": 0}, "ksg_rank"),
        ({"max_samples": 3}, "max_samples"),
    ],
)
def test_mi_config_rejects_bad_values(kwargs, option):
    with pytest.raises(ValueError, match=option):
        MIConfig(**kwargs)


# --- selection ------------------------------------------------------------------------------


def _selection_matrix():
    mi = torch.arange(32, dtype=torch.float64).reshape(4, 8) + 100.0
    mi[1, 0] = 0.0  # global minimum, outside the default target window (blocks 2..5 of 8)
    mi[2, 3] = 1.0
    mi[0, 3] = 2.0  # same target block as the best pair
    mi[3, 5] = 3.0
    mi[0, 2] = 4.0
    return mi


def test_select_pairs_lowest_mi_inside_window():
    mi = _selection_matrix()
    assert select_pairs(mi) == [(2, 3)]
    assert select_pairs(mi, PairingConfig(top_k=3)) == [(2, 3), (3, 5), (0, 2)]
    assert select_pairs(mi, PairingConfig(top_k=3, unique_target=False)) == [
        (2, 3),
        (0, 3),
        (3, 5),
    ]
    assert select_pairs(mi, PairingConfig(window=(0.0, 1.0))) == [(1, 0)]
    assert select_pairs(mi, PairingConfig(expert_window=(0.5, 1.0), top_k=2)) == [(2, 3), (3, 5)]


def test_select_pairs_dev_candidates():
    config = PairingConfig(select="dev", candidates=2, top_k=1)
    assert select_pairs(_selection_matrix(), config) == [(2, 3), (3, 5)]


def test_select_pairs_returns_fewer_with_warning(caplog):
    mi = torch.rand(2, 4, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="expertsteer.method.pair"):
        pairs = select_pairs(mi, PairingConfig(top_k=5))
    assert len(pairs) == 2 and "only 2 pairs" in caplog.text


def test_window_is_judged_on_real_depth():
    mi = torch.tensor([[5.0, 1.0, 2.0, 0.5]], dtype=torch.float64)
    # Blocks 0, 10, 20, 29 of 30 sit at depths 0.017, 0.35, 0.68, 0.98: only 10 and 20 qualify.
    got = select_pairs(
        mi,
        PairingConfig(top_k=4),
        expert_layers=[12],
        target_layers=[0, 10, 20, 29],
        num_expert_layers=24,
        num_target_layers=30,
    )
    assert got == [(0, 1), (0, 2)]
    with pytest.raises(ValueError, match="num_target_layers"):
        select_pairs(mi, target_layers=[0, 10, 20, 29])
    with pytest.raises(PairingError, match="distinct block indices"):
        select_pairs(mi, target_layers=[0, 10, 20, 30], num_target_layers=30)


def test_default_window_is_middle_half():
    for blocks, expected in [(24, list(range(6, 18))), (30, list(range(7, 22))), (2, [0])]:
        mi = torch.zeros(1, blocks, dtype=torch.float64)
        chosen = select_pairs(mi, PairingConfig(top_k=blocks))
        assert sorted(j for _, j in chosen) == expected


def test_empty_window_raises_naming_window_and_depth():
    with pytest.raises(PairingError, match=r"`window` \(0\.9, 1\.0\).*L=2"):
        select_pairs(torch.rand(3, 2), PairingConfig(window=(0.9, 1.0)))
    with pytest.raises(PairingError, match="expert_window"):
        select_pairs(torch.rand(2, 8), PairingConfig(expert_window=(0.1, 0.2)))


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"top_k": 0}, "top_k"),
        ({"window": (0.8, 0.2)}, "window"),
        ({"window": (-0.1, 0.5)}, "window"),
        ({"window": (0.1, 0.5, 0.9)}, "window"),
        ({"expert_window": (0.0, 1.5)}, "expert_window"),
        ({"select": "best"}, "select"),
        ({"candidates": 0}, "candidates"),
        ({"select": "dev", "top_k": 3, "candidates": 2}, "candidates"),
    ],
)
def test_pairing_config_rejects_bad_values(kwargs, option):
    with pytest.raises(ValueError, match=option):
        PairingConfig(**kwargs)


def test_pairing_config_accepts_lists_from_yaml():
    assert PairingConfig(window=[0.2, 0.8]).window == (0.2, 0.8)


# --- payload and heatmap --------------------------------------------------------------------


def test_pairs_payload_holds_real_layer_numbers():
    mi = _selection_matrix()
    pairs = select_pairs(mi, PairingConfig(top_k=2))
    payload = pairs_payload(
        mi, pairs, MIConfig(), PairingConfig(top_k=2), [0, 4, 8, 12], list(range(10, 18))
    )
    assert json.loads(json.dumps(payload)) == payload
    assert payload["kind"] == "pairs" and payload["estimator"] == "gaussian"
    assert payload["pairs"] == [
        {"expert_layer": 8, "target_layer": 13, "expert_index": 2, "target_index": 3, "mi": 1.0},
        {"expert_layer": 12, "target_layer": 15, "expert_index": 3, "target_index": 5, "mi": 3.0},
    ]
    assert payload["pairing_config"]["window"] == [0.25, 0.75]
    with pytest.raises(PairingError, match="does not match"):
        pairs_payload(mi, pairs, MIConfig(), PairingConfig(), [0, 1], list(range(8)))


def test_mi_heatmap_writes_png_atomically(tmp_path):
    mi = _selection_matrix()
    mi[0, 0] = math.nan
    out = mi_heatmap(
        mi,
        [(2, 3), (3, 5)],
        tmp_path / "figures" / "mi.png",
        "expert-model",
        "target-model",
        expert_layers=[0, 4, 8, 12],
        target_layers=list(range(10, 18)),
    )
    assert out == tmp_path / "figures" / "mi.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 2000
    assert [p.name for p in out.parent.iterdir()] == ["mi.png"]
    with pytest.raises(ValueError, match="layer labels"):
        mi_heatmap(mi, [], tmp_path / "bad.png", "e", "t", expert_layers=[0, 1])
    assert not (tmp_path / "bad.png").exists()
