"""Transfer diagnostics: does an expert-derived direction say anything about the target?

Measured before any steering, per (expert layer, target layer) pair and extractor:

* `cos_target_native`: cosine between the expert direction mapped into the target's space and
  the target's own direction from the same extractor on the same items (both oriented so that
  correct answers project higher on the steer split);
* `null_cos_p95`: the 95th percentile of |cosine| between the target's own direction and
  mapped *random* expert directions (u ~ N(0, I) in standardised expert coordinates, pushed
  through the encoder's linear part). A mapped direction is concentrated where the map is
  strong; the null has the same concentration, so a cosine above it is more than the map's
  shape;
* `auroc_mapped`, `auroc_native`, `auroc_random`: dev AUROC of the target's dev states
  projected on the mapped direction, on the target's own direction, and (mean over draws) on
  random unit directions of the target's space — each oriented on the steer split only.

A transfer is claimed for a pair when the cosine beats the null's 95th percentile and the
mapped direction reads the target's dev states about as well as the target's own direction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from expertsteer.method.extractors import extract
from expertsteer.method.rfm import auroc
from expertsteer.method.vectors import orient

NULL_DRAWS = 200
RANDOM_DRAWS = 50


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def mapped_random_directions(
    encode_direction: Callable[[torch.Tensor], torch.Tensor],
    expert_std: torch.Tensor,
    count: int = NULL_DRAWS,
    seed: int = 0,
) -> torch.Tensor:
    """Unit rows [count, d_T]: random directions of standardised expert space (u ~ N(0, I)),
    in raw coordinates u * std, mapped by the encoder's linear part. Drawn on the CPU (the
    same draws on every device), mapped where `expert_std` is."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(count, expert_std.shape[0], generator=generator, dtype=torch.float64)
    u = u.to(expert_std.device)
    with torch.no_grad():
        mapped = encode_direction((u * expert_std.double()).to(expert_std.dtype))
    return _unit(mapped.double())


def direction_diagnostics(
    mapped: torch.Tensor,
    native: torch.Tensor,
    null: torch.Tensor,
    target_steer: torch.Tensor,
    y_steer: torch.Tensor,
    target_dev: torch.Tensor,
    y_dev: torch.Tensor,
    seed: int = 0,
) -> dict[str, float]:
    """The figures of one mapped direction [d_T] against the target's own [d_T] (see module
    docstring); `null` holds mapped random expert directions [K, d_T]."""
    mapped, native = _unit(mapped.double()), _unit(native.double())
    mapped, native = orient(torch.stack([mapped, native]), target_steer, y_steer)
    generator = torch.Generator().manual_seed(seed)
    random = _unit(
        torch.randn(RANDOM_DRAWS, native.shape[0], generator=generator, dtype=torch.float64)
    ).to(native.device)
    random = orient(random, target_steer, y_steer)
    dev = target_dev.double()
    null_cos = (_unit(null.double()) @ native).abs()
    return {
        "cos_target_native": float(mapped @ native),
        "null_cos_p95": float(torch.quantile(null_cos, 0.95)),
        "auroc_mapped": auroc(dev @ mapped, y_dev),
        "auroc_native": auroc(dev @ native, y_dev),
        "auroc_random": sum(auroc(dev @ r, y_dev) for r in random) / len(random),
    }


def native_direction(
    method: str,
    target_steer: torch.Tensor,
    y_steer: torch.Tensor,
    target_dev: torch.Tensor,
    y_dev: torch.Tensor,
    seed: int = 0,
) -> torch.Tensor:
    """The target's own direction [d_T] from extractor `method` (fitted as the target-self
    baselines are: steer split, dev for the RFM's model choice)."""
    x, x_val = target_steer.double(), target_dev.double()
    center = x.mean(0)
    return extract(method, x - center, y_steer, x_val - center, y_dev, seed=seed)


def transfer_verdict(directions: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per extractor: whether the mapped direction beats the cosine null and reads the
    target's dev states within 0.05 AUROC of the native direction and 0.1 above random."""
    return {
        method: {
            "cos_above_null": d["cos_target_native"] > d["null_cos_p95"],
            "auroc_near_native": d["auroc_mapped"] >= d["auroc_native"] - 0.05,
            "auroc_above_random": d["auroc_mapped"] >= d["auroc_random"] + 0.1,
        }
        for method, d in directions.items()
    }


MAP_FIELDS = ("positions", "heldout_r2", "shuffled_r2", "steer_items_r2", "dev_items_r2")


def transfer_summary(metadata: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The `transfer` list of metrics.json from each method's steering metadata (method name
    -> metadata): one entry per (expert layer, target layer, alignment objective), holding the
    map's R^2 figures and, per expert method at that pair, its direction diagnostics."""
    entries: dict[tuple, dict[str, Any]] = {}
    for method, meta in metadata.items():
        for item in meta.get("transfer") or []:
            key = (item["expert_layer"], item["target_layer"], item.get("alignment"))
            entry = entries.setdefault(
                key,
                {
                    "expert_layer": item["expert_layer"],
                    "target_layer": item["target_layer"],
                    "alignment": item.get("alignment"),
                    **{name: item.get(name) for name in MAP_FIELDS},
                    "directions": {},
                },
            )
            entry["directions"][method] = {
                **item["direction"],
                "extractor": item.get("extractor"),
                "verdict": item.get("verdict"),
            }
    return list(entries.values())
