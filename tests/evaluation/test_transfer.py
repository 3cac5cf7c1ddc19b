"""Transfer diagnostics on synthetic expert / target states with a known relation."""

from __future__ import annotations

import torch

from expertsteer.evaluation.report import transfer_section
from expertsteer.evaluation.transfer import (
    direction_diagnostics,
    mapped_random_directions,
    native_direction,
    transfer_summary,
    transfer_verdict,
)
from expertsteer.method.align import AffineAutoencoders
from expertsteer.method.extractors import extract
from expertsteer.method.translate import TranslateConfig, fit_pair

D_E, D_T = 24, 16


def _states(n: int, related: bool, seed: int = 0):
    """Expert states with a label direction; target states a linear image of them (or not)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    concept = torch.randn(D_E, generator=g, dtype=torch.float64)
    expert = torch.randn(n, D_E, generator=g, dtype=torch.float64) + 1.5 * y[:, None] * concept
    mixing = torch.randn(D_T, D_E, generator=g, dtype=torch.float64) / D_E**0.5
    if related:
        target = expert @ mixing.T + 0.05 * torch.randn(n, D_T, generator=g, dtype=torch.float64)
    else:
        target = torch.randn(n, D_T, generator=g, dtype=torch.float64)
        target = target + 1.5 * y[:, None] * torch.randn(D_T, generator=g, dtype=torch.float64)
    return expert, target, y


def _translate(expert, target) -> AffineAutoencoders:
    aligner = AffineAutoencoders(1, D_E, D_T).double()
    aligner.fit_standardisation(expert[:, None].float())
    aligner.fit_target_standardisation(0, target.float())
    x = aligner.standardise_layer(0, expert)
    z = aligner.standardise_target(0, target)
    fit = fit_pair(x[:800], z[:800], x[800:], z[800:], TranslateConfig(lambdas=[1e-4, 1e-2]))
    aligner.set_linear_maps(0, fit.encoder, fit.decoder)
    return aligner


def _diagnose(aligner, expert, target, y, method="mean_diff"):
    steer, dev = slice(0, 600), slice(600, None)
    codes = aligner.encode(0, expert)
    mapped = extract(method, codes[steer] - codes[steer].mean(0), y[steer], codes[dev], y[dev])
    native = native_direction(method, target[steer], y[steer], target[dev], y[dev])
    null = mapped_random_directions(
        lambda v: aligner.encode_direction(0, v), aligner.expert_std[0], seed=1
    )
    return direction_diagnostics(
        mapped.detach(), native, null, target[steer], y[steer], target[dev], y[dev]
    )


def test_a_known_linear_map_transfers_the_direction():
    expert, target, y = _states(1000, related=True)
    aligner = _translate(expert, target)
    for method in ("mean_diff", "rfm"):
        result = _diagnose(aligner, expert, target, y, method)
        assert result["cos_target_native"] > 0.9 > result["null_cos_p95"], result
        assert result["auroc_mapped"] > result["auroc_native"] - 0.05
        assert result["auroc_mapped"] > result["auroc_random"] + 0.1
        assert all(transfer_verdict({method: result})[method].values())


def test_independent_states_stay_at_the_null():
    """The map is fitted on corpus positions where the two models' states are unrelated; on
    the labelled items both sides hold the concept, each in its own way."""
    expert, target, y = _states(1000, related=False)
    corpus_expert, _, _ = _states(1000, related=False, seed=1)
    corpus_target = torch.randn(1000, D_T, generator=torch.Generator().manual_seed(2))
    aligner = _translate(corpus_expert, corpus_target.double())
    result = _diagnose(aligner, expert, target, y)
    assert abs(result["cos_target_native"]) < result["null_cos_p95"] + 0.1
    assert not transfer_verdict({"mean_diff": result})["mean_diff"]["cos_above_null"]
    assert result["auroc_native"] > 0.8  # the target has the concept; the map does not carry it


def _recon(expert, seed: int, steps: int = 300) -> AffineAutoencoders:
    torch.manual_seed(seed)
    aligner = AffineAutoencoders(1, D_E, D_T).double()
    aligner.fit_standardisation(expert[:, None].float())
    optimizer = torch.optim.Adam(aligner.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        aligner.reconstruction_loss(expert[:, None]).mean().backward()
        optimizer.step()
    return aligner


def test_two_recon_seeds_map_one_direction_to_unrelated_directions():
    """The reconstruction loss leaves the code basis to the initialisation."""
    expert, _, y = _states(1000, related=True)
    direction = expert[y == 1].mean(0) - expert[y == 0].mean(0)
    a, b = _recon(expert, seed=0), _recon(expert, seed=1)
    for aligner in (a, b):
        assert aligner.reconstruction_loss(expert[:, None]).mean() < 0.5
    mapped = [m.encode_direction(0, direction).detach() for m in (a, b)]
    cosine = torch.nn.functional.cosine_similarity(mapped[0], mapped[1], dim=0)
    null = mapped_random_directions(lambda v: a.encode_direction(0, v).detach(), a.expert_std[0])
    null_b = mapped_random_directions(lambda v: b.encode_direction(0, v).detach(), b.expert_std[0])
    null_p95 = torch.quantile((null * null_b).sum(-1).abs(), 0.95)
    assert abs(float(cosine)) < float(null_p95) + 0.1
    # the same two maps agree on nothing a translate map would fix: both are exact on x
    assert abs(float(cosine)) < 0.6


def _item(expert_layer, alignment, cos, extractor="rfm"):
    figures = {
        "cos_target_native": cos,
        "null_cos_p95": 0.1,
        "auroc_mapped": 0.7,
        "auroc_native": 0.72,
        "auroc_random": 0.5,
    }
    return {
        "expert_layer": expert_layer,
        "target_layer": 9,
        "alignment": alignment,
        "positions": 1000,
        "heldout_r2": 0.6,
        "shuffled_r2": -0.01,
        "steer_items_r2": 0.5,
        "dev_items_r2": 0.3,
        "extractor": extractor,
        "direction": figures,
        "verdict": transfer_verdict({extractor: figures})[extractor],
    }


def test_transfer_summary_groups_methods_by_pair_and_alignment_and_the_report_shows_it():
    metadata = {
        "expertsteer": {"transfer": [_item(19, "recon", 0.02)]},
        "expert_mean_diff": {"transfer": [_item(19, "recon", 0.05, "mean_diff")]},
        "expertsteer_translate": {"transfer": [_item(19, "translate", 0.6)]},
        "target_rfm": {"method": "rfm"},
    }
    entries = transfer_summary(metadata)
    assert [(e["alignment"], sorted(e["directions"])) for e in entries] == [
        ("recon", ["expert_mean_diff", "expertsteer"]),
        ("translate", ["expertsteer_translate"]),
    ]
    assert entries[1]["heldout_r2"] == 0.6 and entries[1]["positions"] == 1000
    lines = transfer_section({"transfer": entries})
    rows = [line for line in lines if line.startswith("| recon") or line.startswith("| translate")]
    assert len(rows) == 3
    assert rows[-1].endswith("| yes |") and rows[0].endswith("| no |")
    assert transfer_section({"transfer": []}) == []


def test_dev_aurocs_do_not_depend_on_the_scale_of_the_states():
    """Projections of real residual states run to hundreds; an AUROC that squashes scores
    (a sigmoid saturates to ties in float32) would drift with the scale of the states."""
    expert, target, y = _states(1000, related=True)
    aligner = _translate(expert, target)
    small = _diagnose(aligner, expert, target, y)
    large = _diagnose(aligner, expert, 200.0 * target, y)
    for name in ("auroc_mapped", "auroc_native", "auroc_random"):
        assert large[name] == small[name], name


def test_the_null_is_drawn_on_the_cpu_and_mapped_where_the_encoder_is():
    """The same draws on every device, mapped on the encoder's (`meta` stands in for an
    accelerator: it computes shapes only)."""
    aligner = AffineAutoencoders(1, D_E, D_T).double()
    on_cpu = mapped_random_directions(
        lambda v: aligner.encode_direction(0, v), aligner.expert_std[0], count=7, seed=3
    )
    assert on_cpu.shape == (7, D_T) and torch.isfinite(on_cpu).all()
    aligner.to("meta")
    on_meta = mapped_random_directions(
        lambda v: aligner.encode_direction(0, v), aligner.expert_std[0], count=7, seed=3
    )
    assert on_meta.device.type == "meta" and on_meta.shape == (7, D_T)
